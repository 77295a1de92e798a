"""resnet1d's convolutions under CPU bf16 autocast, with a faster weight gradient where oneDNN lacks one.

Why: on CPUs with AVX512-BF16 but no AMX (e.g. AMD EPYC), oneDNN has a
direct bf16 kernel for the forward pass and for the input gradient of a (1, k) convolution on
channels-last tensors, but computes the *weight* gradient with a generic GEMM fallback
(`x64:gemm:jit` in ONEDNN_VERBOSE): 35 ms for resnet1d's 64 -> 64 layer at 1024 samples, batch
64, against 11 ms for the forward pass with the same FLOPs. The weight gradient is a correlation,

    dW[o, i, j] = sum over (b, m) of  dY[b, o, m] * Xpad[b, i, stride * m + j],

that is one matrix product U^T (k*I x B*M) @ dY (B*M x O) with U the unfolded input. Here U is
built a few samples at a time into a small reused buffer (about ROWS rows, a few MB, so it stays
in cache) and each block's product is accumulated in float32: about 20 ms for that layer. Where
oneDNN's fallback measured as fast (stride-1 convolutions that widen the channels) it is kept.
bench/train_throughput.py prints the whole step's profile.

The forward pass and the input gradient are oneDNN's own, unchanged. The weight gradient is the
same sum in a different order: float32 accumulation of bf16 products, rounded to bf16 once per
block instead of once overall (tests/test_layers.py compares both with the exact gradient), and
it is returned in float32 straight to the float32 parameter. GPUs and fp32 training never come here.

With AMX (Intel Sapphire Rapids and later) oneDNN's weight gradient runs on the tile unit and is
the faster one: bench/train_throughput.py on a 2-core Xeon with AMX, whole engine against the plain
fp32 loop, 4.62x with oneDNN's against 4.10x with this one (bf16 convolutions 164 vs 195 ms a step).
So `auto` takes this path only on CPUs without AMX; $ECGSEARCH_CPU_WEIGHT_GRAD=engine|onednn forces one.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

ROWS = 2048   # rows of the unfolded input per product: 2048 x 1088 bf16 = 4.5 MB (measured best of 512-8192)
# Below this many unfolded columns (in_channels x kernel) the blocks are too thin to beat oneDNN:
# the stem (12 x 17 = 204 columns) 26 -> 32 ms and a 1x1 skip 3.8 -> 4.2 ms, forward and backward;
# 64 x 17 = 1088 columns: 72 -> 57 ms.
MIN_COLUMNS = 256
PROFILE_LABEL = "ecgsearch::conv_weight_grad"
WEIGHT_GRAD_ENV = "ECGSEARCH_CPU_WEIGHT_GRAD"
WEIGHT_GRAD_MODES = ("auto", "engine", "onednn")


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    try:   # torch's own probe of the CPU (cpuinfo); absent from some builds
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def weight_grad_mode() -> str:
    """Who computes bf16 weight gradients on this CPU: "engine" (`weight_grad`) or "onednn"."""
    mode = os.environ.get(WEIGHT_GRAD_ENV, "auto")
    if mode not in WEIGHT_GRAD_MODES:
        raise ValueError(f"{WEIGHT_GRAD_ENV}={mode!r}: expected one of {', '.join(WEIGHT_GRAD_MODES)}")
    if mode == "auto":
        return "onednn" if cpu_has_amx() else "engine"
    return mode


def weight_grad(dy: torch.Tensor, x: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
    """dW (O, I, k) float32 of `conv2d(x, W[:, :, None, :], stride=(1, stride), padding=(0, pad))`
    from the output gradient dy (B, O, 1, M) and the input x (B, I, 1, L)."""
    B, I, _, L = x.shape
    O, M = dy.shape[1], dy.shape[3]
    xs = x.permute(0, 2, 3, 1).reshape(B, L, I)      # a view when x is channels-last, else a copy
    gs = dy.permute(0, 2, 3, 1).reshape(B, M, O)
    xp = F.pad(xs, (0, 0, pad, pad)) if pad else xs.contiguous()
    lp = xp.shape[1]
    # u[b, m, j, i] = xp[b, stride * m + j, i]: the unfolded input as a view, copied block by block
    u = xp.as_strided((B, M, k, I), (lp * I, stride * I, I, 1))
    per = max(1, ROWS // M)
    g2 = gs.reshape(B * M, O)
    buf = torch.empty((min(per, B), M, k, I), dtype=x.dtype, device=x.device)
    acc = None
    for b0 in range(0, B, per):
        n = min(per, B - b0)
        block = buf[:n]
        block.copy_(u[b0:b0 + n])
        # U^T dY rather than dY^T U: the product with the long output dimension first runs faster
        part = block.view(n * M, k * I).T @ g2[b0 * M:(b0 + n) * M]
        acc = part.float() if acc is None else acc.add_(part)   # float32 sum of the blocks, (k*I, O)
    return acc.view(k, I, O).permute(2, 1, 0).contiguous()


class _Bf16Conv(torch.autograd.Function):
    """conv2d of a bf16 (B, I, 1, L) input with a float32 (O, I, k) weight cast to bf16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
        w = weight.to(torch.bfloat16).unsqueeze(2)
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.pad = stride, pad
        return F.conv2d(x, w, None, (1, stride), (0, pad))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_cl = dy.contiguous(memory_format=torch.channels_last)
            dx = torch.ops.aten.convolution_backward(dy_cl, x, w, None, [1, ctx.stride], [0, ctx.pad], [1, 1],
                                                     False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            with torch.profiler.record_function(PROFILE_LABEL):   # counted as convolution by the bench
                dw = weight_grad(dy, x, w.shape[3], ctx.stride, ctx.pad)
        return dx, dw, None, None


def use_fast_path(x: torch.Tensor, conv: torch.nn.Conv1d) -> bool:
    """Training under CPU bf16 autocast on a CPU whose oneDNN lacks a fast bf16 weight gradient
    (`weight_grad_mode`), a bias-free float32 Conv1d without groups or dilation, wide enough to
    gain (MIN_COLUMNS)."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and conv.bias is None
            and conv.groups == 1 and conv.dilation == (1,) and conv.weight.dtype == torch.float32
            and conv.in_channels * conv.kernel_size[0] >= MIN_COLUMNS
            # oneDNN's own is as fast or faster where a stride-1 convolution widens the channels
            # (resnet1d's 64->128, 128->196, 196->256: 45 vs 45, 21 vs 30, 12 vs 13 ms)
            and not (conv.stride[0] == 1 and conv.out_channels > conv.in_channels)
            and weight_grad_mode() == "engine")


def conv_2d(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """`conv` applied to a (B, C, 1, L) tensor as a (1, k) 2-D convolution, same parameters.

    On a channels-last input oneDNN picks its NHWC kernels; measured on resnet1d's layers
    (bf16, batch 64, forward + backward): 64->64 at 1024 samples 81 -> 69 ms, 64->128 142 -> 97 ms,
    128->128 stride 4 70 -> 53 ms. The parameters stay Conv1d-shaped, so checkpoints and
    published weights load unchanged. Training under CPU bf16 autocast takes `_Bf16Conv`.
    """
    if use_fast_path(x, conv):
        return _Bf16Conv.apply(x.to(torch.bfloat16), conv.weight, conv.stride[0], conv.padding[0])
    return F.conv2d(x, conv.weight.unsqueeze(2), conv.bias, (1, conv.stride[0]), (0, conv.padding[0]))
