"""The GPU check, prepared to run in under 5 minutes on one CUDA machine:

1. a 1-worker Ray Train `TorchTrainer` training resnet1d at (12, 4096) in bf16 on a 400 Hz
   model-geometry cache: samples/s, peak GPU memory, achieved TFLOP/s and the fraction of the
   device's dense bf16 peak;
2. the loader against the GPU: the loader's own rate (int16 over PCIe, normalised on the GPU)
   and the fraction of each step the GPU waits for data (the step timed with the loader against
   the same steps on one batch already on the GPU);
3. a 2-worker DDP run on the one GPU with NCCL (two ranks sharing it): the engine's own `train`,
   and every rank's weights compared after it (lockstep). NCCL refuses two ranks on one device
   in some versions; the check then says so and repeats the lockstep check with gloo.

Without a GPU it prints one line saying it skipped, and why, and exits 0. `--rehearse` runs the
same code on the CPU at toy sizes (gloo), so the script is known to run before GPU time is spent.

    .venv/bin/python bench/gpu_check.py [--records 1024] [--batch 256] [--steps 60] [--rehearse]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets.
PEAK_BF16 = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}


def device_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def prepare_data(records: int, fs: str, geometry: tuple[int, int], work: Path) -> Path:
    from ecgsearch.data.cache import prepare
    from ecgsearch.data.synth import synthesize

    synthesize(work / "root", records, seed=0, fs=fs, enrich=True)
    t0 = time.perf_counter()
    prepare(work / "root", work / "cache", int(fs), workers=4, target_fs=geometry[0], n_samples=geometry[1])
    print(f"data: {records} synthetic records at {fs} Hz -> model-geometry cache {geometry[0]} Hz x {geometry[1]} "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return work / "cache"


def throughput_worker(config: dict) -> None:
    """Ray Train worker: bf16 training steps fed by the loader, then the same steps on one resident batch."""
    import ray.train
    import torch     # here, not the module's: torch.backends.cudnn cannot be pickled with this function

    from ecgsearch.engine import TrainConfig
    from ecgsearch.engine import prep as P
    from ecgsearch.engine.loader import Loader, chunked
    from ecgsearch.engine.runtime import autocast
    from ecgsearch.data.cache import load_cache
    from ecgsearch.models import create_model
    from train_throughput import train_flops_per_sample

    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    data = load_cache(config["cache"])
    cfg = TrainConfig(model="resnet1d", task="rhythm", target_fs=config["fs"], n_samples=config["n"], bootstrap=0)
    prep, train_idx = P.fit(cfg, data)
    model = create_model("resnet1d", n_leads=12, num_outputs=prep.num_outputs, n_samples=prep.n_samples).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loader = Loader(prep, data, device, threads=config["threads"], prefetch=4)
    batch, steps = config["batch"], config["steps"]
    order = np.resize(np.random.default_rng(0).permutation(train_idx), batch * steps)
    chunks = chunked(order, batch)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(x, y):
        with autocast(device, "bf16"):
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for b in loader.batches(chunks[:5], reuse=True):       # warm-up: cuDNN autotuning, allocator
        step(b.x, b.y)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for b in loader.batches(chunks, reuse=True):
        step(b.x, b.y)
    sync()
    t_fed = time.perf_counter() - t0
    resident = next(iter(loader.batches(chunks[:1])))
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(resident.x, resident.y)
    sync()
    t_compute = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in loader.batches(chunks, reuse=True):            # the loader alone, to the device
        pass
    sync()
    t_load = time.perf_counter() - t0
    flops = train_flops_per_sample(create_model("resnet1d", n_leads=12, num_outputs=prep.num_outputs,
                                                n_samples=prep.n_samples), (12, prep.n_samples))
    n = batch * steps
    _report(config, "throughput", {"samples_per_s": n / t_fed, "compute_samples_per_s": n / t_compute,
                      "loader_samples_per_s": n / t_load, "wait_fraction": max(0.0, 1 - t_compute / t_fed),
                      "tflops": n * flops / t_fed / 1e12,
                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
                      "device": torch.cuda.get_device_name(device) if cuda else "cpu"})


def lockstep_worker(config: dict) -> None:
    """Ray Train worker: the engine's own DDP training, then every rank's weight digest gathered."""
    import ray.train
    import torch
    import torch.distributed as dist

    from ecgsearch.engine import TrainConfig, train

    cfg = TrainConfig(**config["cfg"])
    res = train(cfg, config["cache"])
    digest = hashlib.sha256(b"".join(v.detach().cpu().contiguous().numpy().tobytes()
                                     for v in res.model.state_dict().values())).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, (digest, res.best_epoch, len(res.history)))
    _report(config, "lockstep", {"digests": digests, "backend": dist.get_backend()})


def _report(config: dict, name: str, metrics: dict) -> None:
    """Rank 0 writes the figures beside the run (one node): Train V2 keeps only metrics that come
    with a checkpoint, and these need none."""
    import json

    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["storage"], f"{name}.json").write_text(json.dumps(metrics))


def run_trainer(fn, config: dict, workers: int, use_gpu: bool, backend: str, gpu_share: float = 1.0):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = {"CPU": 1, **({"GPU": gpu_share} if use_gpu else {})}
    import json

    Path(config["storage"]).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(fn, train_loop_config=config, torch_config=TorchConfig(backend=backend),
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                        resources_per_worker=res),
                           run_config=RunConfig(storage_path=config["storage"], name=f"{fn.__name__}-{backend}"))
    trainer.fit()
    return json.loads(Path(config["storage"], f"{fn.__name__.replace('_worker', '')}.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=4, help="loader worker threads")
    ap.add_argument("--rehearse", action="store_true", help="the same code on the CPU at toy sizes (gloo)")
    args = ap.parse_args()
    if not args.rehearse and not torch.cuda.is_available():
        print(f"gpu_check: skipped: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is "
              f"False{'; a CPU build' if torch.version.cuda is None else ''})")
        return 0
    import ray

    t_start = time.perf_counter()
    cuda = not args.rehearse
    if args.rehearse:
        args.records, args.batch, args.steps = 96, 8, 4
    geometry = (400, 4096)
    with tempfile.TemporaryDirectory(prefix="ecgsearch-gpu-check-") as tmp:
        work = Path(tmp)
        cache = prepare_data(args.records, "500", geometry, work)
        ray.init(num_cpus=max(4, args.threads + 2), num_gpus=1 if cuda else 0, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}"}}, log_to_driver=False)
        try:
            m = run_trainer(throughput_worker, {"cache": str(cache), "fs": geometry[0], "n": geometry[1],
                                                "batch": args.batch, "steps": args.steps, "threads": args.threads,
                                                "storage": str(work / "ray")}, 1, cuda, "nccl" if cuda else "gloo")
            peak = device_peak(m["device"]) if cuda else None
            print(f"1. TorchTrainer, 1 worker, resnet1d (12, {geometry[1]}) bf16, batch {args.batch} on {m['device']}: "
                  f"{m['samples_per_s']:.0f} samples/s, peak memory {m['peak_mem_gib']:.1f} GiB, "
                  f"{m['tflops']:.1f} TFLOP/s" + (f" = {m['tflops'] / peak:.1%} of the {peak:g} TFLOP/s bf16 peak"
                                                  if peak else " (device peak unknown)"))
            print(f"2. loader alone {m['loader_samples_per_s']:.0f} samples/s against the GPU's "
                  f"{m['compute_samples_per_s']:.0f} samples/s on a resident batch: the GPU waits for data "
                  f"{m['wait_fraction']:.1%} of each step ({args.threads} loader threads)")
            ddp = {"cache": str(cache), "storage": str(work / "ray"),
                   "cfg": {"model": "resnet1d_tiny", "task": "rhythm", "epochs": 3, "batch_size": 32,
                           "target_fs": geometry[0], "n_samples": geometry[1], "bootstrap": 0,
                           "precision": "bf16" if cuda else "fp32", "seed": 1}}
            for backend in (("nccl", "gloo") if cuda else ("gloo",)):
                try:
                    d = run_trainer(lockstep_worker, ddp, 2, cuda, backend, gpu_share=0.5)
                except Exception as exc:    # NCCL: "Duplicate GPU detected" on one device
                    why = str(exc).strip().splitlines()[-1][:300]
                    print(f"3. 2-worker DDP on one GPU with {backend}: refused ({why}); trying the next backend")
                    continue
                same = len({x[0] for x in d["digests"]}) == 1 and len({tuple(x[1:]) for x in d["digests"]}) == 1
                print(f"3. 2-worker DDP on one {'GPU' if cuda else 'CPU'} with {d['backend']}: ranks "
                      f"{'in lockstep' if same else 'DIVERGED'} (weights sha256 {d['digests'][0][0][:12]}..., best epoch "
                      f"{d['digests'][0][1]}, {d['digests'][0][2]} epochs on every rank)")
                if not same:
                    return 1
                break
        finally:
            ray.shutdown()
    print(f"gpu_check: done in {time.perf_counter() - t_start:.0f} s" + (" (CPU rehearsal)" if args.rehearse else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
