"""Real servers for tests: `mlflow server` and a Ray head started with `ray start`, on 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ecgsearch.distributed.cluster import _free_port

BIN = Path(sys.executable).parent
MLFLOW = BIN / "mlflow"


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store in `root`; kill() is SIGKILL to its whole
    process group (the uvicorn workers too), start() again serves the same store on the same port."""

    def __init__(self, root: Path, backend: str | None = None) -> None:
        self.root, self.port = root, _free_port()
        self.backend = backend or f"sqlite:///{root / 'mlflow.db'}"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 180.0) -> None:
        self.starts += 1
        log = open(self.root / f"server{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend,
             "--default-artifact-root", str(self.root / "art"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / f'server{self.starts}.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.kill()
        pytest.fail(f"mlflow server on {self.uri} did not answer /health within {timeout_s:.0f} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:   # the port is free again (for start())
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for port 0 (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class RayHead:
    """A Ray head started the way a cluster user starts one (`ray start --head`), bound to
    127.0.0.1, with token auth, in a private temp folder. Only its own processes are stopped:
    `ray stop` would kill every Ray on the machine (the test session's too)."""

    def __init__(self, num_cpus: int = 2) -> None:
        import secrets
        import tempfile

        self.temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")   # short: it holds the raylet's sockets
        # Worker ports apart from Ray's default range (10002-19999), which a session Ray may hold,
        # and below the kernel's ephemeral range, where the free ports picked for the head's other
        # components lie (Ray refuses to start when one of them falls inside the worker range).
        slots = max(1, (_ephemeral_low() - 20000) // 100)
        base = 20000 + (os.getpid() % slots) * 100
        self.worker_ports = (base, base + 99)
        self.gcs_port, self.dash_port = self.free_port(), self.free_port()
        self.address = f"http://127.0.0.1:{self.dash_port}"
        self.num_cpus = num_cpus
        # As from an activated venv: a job's `python` entrypoint is the venv's, as on a cluster node.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            self.env.pop(key, None)

    def free_port(self) -> int:
        """A free port outside this head's worker range."""
        while True:
            port = _free_port()
            if not self.worker_ports[0] <= port <= self.worker_ports[1]:
                return port

    def ray(self, *args: str, cwd: Path | None = None, token: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if not token:
            env.pop("RAY_AUTH_TOKEN")
        return subprocess.run([str(BIN / "ray"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> None:
        proc = self.ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
                        f"--ray-client-server-port={self.free_port()}", f"--num-cpus={self.num_cpus}",
                        # Another Ray on this machine (the test session's) holds the agents' default
                        # ports: a head on them would never get a job agent.
                        f"--dashboard-agent-listen-port={self.free_port()}",
                        f"--dashboard-agent-grpc-port={self.free_port()}",
                        f"--runtime-env-agent-port={self.free_port()}",
                        f"--metrics-export-port={self.free_port()}", f"--min-worker-port={self.worker_ports[0]}",
                        f"--max-worker-port={self.worker_ports[1]}",
                        f"--temp-dir={self.temp}", "--include-dashboard=true", "--disable-usage-stats",
                        timeout=180)
        if proc.returncode != 0:
            self.stop()
            pytest.fail(f"ray start --head failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:   # the job server answers (with the token)
            if self.ray("job", "list", "--address", self.address, timeout=60).returncode == 0:
                return
            time.sleep(1)
        self.stop()
        pytest.fail(f"the Ray job server at {self.address} did not answer within 120 s")

    def stop(self) -> None:
        import shutil

        ours = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if self.temp.encode() in (proc / "cmdline").read_bytes():
                    ours.append(int(proc.name))
            except OSError:
                continue
        for pid in ours:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ours):
            time.sleep(0.2)
        shutil.rmtree(self.temp, ignore_errors=True)


class Postgres:
    """A throwaway PostgreSQL cluster (Debian's postgresql package) in a temp folder, on 127.0.0.1,
    trust auth for its one user. As root it runs as the `postgres` user (initdb refuses root)."""

    def __init__(self) -> None:
        import glob
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            pytest.skip("PostgreSQL is not installed (Debian: apt-get install -y postgresql; `make test` "
                        "installs it when run as root)")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        self.port = _free_port()
        self.uri = f"postgresql://mlflow@127.0.0.1:{self.port}/mlflow"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start(self) -> None:
        if self._as:
            import shutil

            shutil.chown(self.dir, "postgres", "postgres")
        data = str(self.dir / "data")
        self._run(str(self.bin / "initdb"), "-D", data, "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", data, "-l", str(self.dir / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "mlflow")

    def stop(self) -> None:
        import shutil

        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
