"""Device, precision, distributed rank and seeding: the few facts a training run needs about where it runs."""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("ecgsearch.engine")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_bf16_supported() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 / AMX): there autocast pays off."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = cpu_bf16_supported()
    if requested == "bf16" and not ok:
        raise ValueError(f"precision=bf16 requested but {device} has no bf16 support; use precision=fp32 or auto")
    return "bf16" if ok else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's sample order for an epoch, with DistributedSampler's exact semantics.

    Using the same permutation for the plain engine and for one Ray worker is what makes
    a one-worker TorchTrainer reproduce the plain engine bit for bit.
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    total = -(-n // world_size) * world_size
    if total > n:  # pad by repeating the head, as DistributedSampler does
        perm = np.concatenate([perm, perm[: total - n]])
    return perm[rank:total:world_size]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
