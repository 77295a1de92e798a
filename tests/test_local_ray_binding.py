"""A local Ray (the one `ecgsearch tune` and a lead search start on one node) listens on loopback
only: none of its processes accepts connections from outside this machine."""
from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from ray_fixtures import ray_session  # noqa: F401


def _listening(path: str, family: int) -> dict[int, str]:
    """{socket inode: local address} of the TCP sockets in LISTEN state in /proc/net/tcp{,6}."""
    out = {}
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if f[3] != "0A":     # TCP_LISTEN
            continue
        raw = bytes.fromhex(f[1].split(":")[0])
        # /proc prints each 32-bit word of the address in host (little-endian) order
        addr = socket.inet_ntop(family, b"".join(struct.pack("<I", w) for w in struct.unpack(f">{len(raw) // 4}I", raw)))
        out[int(f[9])] = addr
    return out


def _ray_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray::" in cmd or b"gcs_server" in cmd or b"raylet" in cmd or b"/ray/" in cmd:
            pids.append(int(pid))
    return pids


def test_a_local_ray_listens_on_loopback_only(ray_session):
    import ray

    host = ray_session.rsplit(":", 1)[0]
    assert host == "127.0.0.1", ray_session
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    listening = {**_listening("/proc/net/tcp", socket.AF_INET), **_listening("/proc/net/tcp6", socket.AF_INET6)}
    seen, exposed = 0, []
    for pid in _ray_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in listening:
                seen += 1
                addr = listening[int(link[8:-1])]
                if not (addr.startswith(("127.", "::ffff:127.")) or addr == "::1"):   # v4, v4-mapped, v6 loopback
                    exposed.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0][-40:], addr))
    assert seen >= 3, "found too few listening sockets of Ray's processes to judge"   # GCS, raylet, dashboard...
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
