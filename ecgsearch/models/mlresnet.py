"""Multi-lead residual network after Han & Shi 2020 (ML-ResNet, Comput. Methods Programs
Biomed. 185:105138): one residual branch per lead, branch features fused into a global
feature, classifier on top.

Contract (the lead search relies on it):
    branch i:  (B, 1, T) -> pooled feature f_i (B, d)
    fusion:    g = (1/|S|) * sum_{i in S} W_i f_i + b       (S = present leads)
    output:    head(g)
Taking the MEAN over present branches (not the sum) keeps g on the same scale whatever
the number of leads, so a model evaluated on a subset S is exactly "the same weights,
built for S" -- `select_leads` -- and, with lead dropout in training, stays calibrated.

Speed: branch weights are stored per lead in one tensor (leading axis = lead), and a
forward runs every present branch at once as a grouped convolution with groups=|S|. A
missing lead's weights are simply not selected, so its branch costs nothing. Because the
whole tensor is one Parameter, every parameter takes part in each step (dropped slices get
zero gradient), which DistributedDataParallel requires.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .base import ECGModel, ModelConfig, Variant
from .layers import Dropout, dropout
from .registry import register_model
from .resnet1d import strided_padding

Index = torch.Tensor | None  # indices of present leads; None = all (fast path, no copies)


class _LeadWise(nn.Module):
    """A module whose listed tensors have one slice per lead along dim 0."""

    lead_tensors: tuple[str, ...] = ()

    @staticmethod
    def take(t: torch.Tensor, idx: Index) -> torch.Tensor:
        return t if idx is None else t.index_select(0, idx)


class LeadConv(_LeadWise):
    """n_leads independent Conv1d(c_in, c_out, k) without bias, run as one grouped conv."""

    lead_tensors = ("weight",)

    def __init__(self, n_leads: int, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.padding = strided_padding(k, stride)
        self.weight = nn.Parameter(torch.empty(n_leads, c_out, c_in, k))
        for w in self.weight.data:  # same init as nn.Conv1d, per lead (fan_in = c_in * k)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, idx: Index) -> torch.Tensor:
        w = self.take(self.weight, idx)
        g = w.shape[0]
        return F.conv1d(x, w.reshape(g * self.c_out, self.c_in, -1), None, self.stride,
                        self.padding, 1, g)


class LeadBatchNorm(_LeadWise):
    """Per-lead BatchNorm1d(c). On a subset only the present leads' running stats move."""

    lead_tensors = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, n_leads: int, c: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(n_leads, c))
        self.bias = nn.Parameter(torch.zeros(n_leads, c))
        self.register_buffer("running_mean", torch.zeros(n_leads, c))
        self.register_buffer("running_var", torch.ones(n_leads, c))

    def forward(self, x: torch.Tensor, idx: Index) -> torch.Tensor:
        # index_select copies; F.batch_norm updates those copies in place, so write them back.
        rm = self.take(self.running_mean, idx)
        rv = self.take(self.running_var, idx)
        w, b = self.take(self.weight, idx), self.take(self.bias, idx)
        out = F.batch_norm(x, rm.view(-1), rv.view(-1), w.reshape(-1), b.reshape(-1),
                           self.training, self.momentum, self.eps)
        if self.training and idx is not None:
            with torch.no_grad():
                self.running_mean.index_copy_(0, idx, rm)
                self.running_var.index_copy_(0, idx, rv)
        return out


class LeadLinear(_LeadWise):
    """The fusion: g = mean_{i in S} W_i f_i + b."""

    lead_tensors = ("weight",)

    def __init__(self, n_leads: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's init scale per lead
        self.weight = nn.Parameter(torch.empty(n_leads, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(d_out).uniform_(-bound, bound))

    def forward(self, f: torch.Tensor, idx: Index) -> torch.Tensor:
        w = self.take(self.weight, idx)
        return torch.einsum("bsd,sde->be", f, w) / w.shape[0] + self.bias


class LeadResBlock(nn.Module):
    """Per-lead residual block: conv-BN-ReLU-dropout-conv(strided)-BN + skip, then ReLU."""

    def __init__(self, n_leads: int, c_in: int, c_out: int, k: int, stride: int,
                 dropout: float) -> None:
        super().__init__()
        self.conv1 = LeadConv(n_leads, c_in, c_out, k)
        self.bn1 = LeadBatchNorm(n_leads, c_out)
        self.conv2 = LeadConv(n_leads, c_out, c_out, k, stride)
        self.bn2 = LeadBatchNorm(n_leads, c_out)
        self.skip = LeadConv(n_leads, c_in, c_out, 1) if c_in != c_out else None
        self.stride, self.dropout = stride, dropout

    def forward(self, x: torch.Tensor, idx: Index) -> torch.Tensor:
        y = F.max_pool1d(x, self.stride) if self.stride > 1 else x
        if self.skip is not None:
            y = self.skip(y, idx)
        h = F.relu(self.bn1(self.conv1(x, idx), idx))
        h = dropout(h, self.dropout, self.training)
        h = self.bn2(self.conv2(h, idx), idx)
        return F.relu(h + y)


LEAD_DROPOUT_MODES = ("branch", "subset")


@dataclass(frozen=True)
class MLResNetConfig(ModelConfig):
    stem_filters: int = 32
    stem_kernel: int = 17
    stem_stride: int = 1                        # >1 shortens the signal before the blocks (speed)
    filters: tuple[int, ...] = (32, 64, 128)     # one residual block per entry
    kernels: tuple[int, ...] = (17, 11, 5)
    downsample: tuple[int, ...] = (4, 4, 4)
    fusion_dim: int = 128                       # size of the fused global feature g
    dropout: float = 0.2
    lead_dropout: float = 0.0                   # per-branch drop probability in training
    # "branch": each branch dropped independently with probability lead_dropout (sees mostly
    # near-complete sets). "subset": with probability lead_dropout a batch keeps a random subset
    # whose size is uniform in 1..n, so one model learns to read every subset size; that is what
    # scoring every RLE step by masking one model needs.
    lead_dropout_mode: str = "branch"

    def validate(self) -> None:
        self._positive_int("stem_filters")
        self._odd_kernel("stem_kernel")
        self._positive_int("stem_stride")
        self._int_tuple("filters")
        self._int_tuple("kernels", odd=True)
        self._int_tuple("downsample")
        if not len(self.filters) == len(self.kernels) == len(self.downsample):
            raise ValueError(f"model settings filters={self.filters}, kernels={self.kernels}, "
                             f"downsample={self.downsample}: need the same length (one per block)")
        self._positive_int("fusion_dim")
        self._probability("dropout")
        self._probability("lead_dropout")
        if self.lead_dropout_mode not in LEAD_DROPOUT_MODES:
            raise ValueError(f"model setting lead_dropout_mode={self.lead_dropout_mode!r}: choose one of "
                             f"{', '.join(LEAD_DROPOUT_MODES)}")
        super().validate()

    def sample_multiple(self) -> int:
        ds = self.downsample if isinstance(self.downsample, tuple) else ()
        return math.prod(ds) * (self.stem_stride if isinstance(self.stem_stride, int) else 1)

    def multiple_reason(self) -> str:
        return f"stem_stride={self.stem_stride} times the product of downsample={self.downsample}"


LeadMask = torch.Tensor | Sequence[bool] | None


class MLResNet(ECGModel):
    default_name = "mlresnet"

    def __init__(self, cfg: MLResNetConfig) -> None:
        super().__init__(cfg)
        L = cfg.n_leads
        self.stem = LeadConv(L, 1, cfg.stem_filters, cfg.stem_kernel, cfg.stem_stride)
        self.stem_bn = LeadBatchNorm(L, cfg.stem_filters)
        widths_in = (cfg.stem_filters,) + cfg.filters[:-1]
        self.blocks = nn.ModuleList(LeadResBlock(L, ci, co, k, s, cfg.dropout) for ci, co, k, s
                                    in zip(widths_in, cfg.filters, cfg.kernels, cfg.downsample))
        self.branch_dim = cfg.filters[-1]
        self.fusion = LeadLinear(L, self.branch_dim, cfg.fusion_dim)
        self.num_features = cfg.fusion_dim
        self.head = nn.Sequential(nn.ReLU(), Dropout(cfg.dropout),
                                  nn.Linear(cfg.fusion_dim, cfg.num_outputs))
        self.lead_dropout = float(cfg.lead_dropout)
        self.lead_dropout_mode = cfg.lead_dropout_mode
        self.last_lead_mask: torch.Tensor | None = None  # branches used by the last forward

    # ---- lead masks -------------------------------------------------------------------
    def _check_mask(self, lead_mask: LeadMask) -> torch.Tensor:
        if lead_mask is None:
            return torch.ones(self.n_leads, dtype=torch.bool)
        m = torch.as_tensor(lead_mask)
        if m.dtype != torch.bool or m.shape != (self.n_leads,):
            raise ValueError(f"{self.name}: lead_mask must be a bool sequence of length n_leads="
                             f"{self.n_leads}, got dtype {m.dtype} shape {tuple(m.shape)}")
        if not bool(m.any()):
            raise ValueError(f"{self.name}: lead_mask drops every lead; at least one must be present")
        return m.cpu()

    def draw_lead_mask(self, present: torch.Tensor) -> torch.Tensor:
        """Lead dropout (see MLResNetConfig.lead_dropout_mode); never drops every lead."""
        cand = present.nonzero().flatten()
        if self.lead_dropout_mode == "subset":
            if float(torch.rand(())) >= self.lead_dropout:
                return present
            k = int(torch.randint(1, len(cand) + 1, ()))
            keep = torch.zeros_like(present)
            keep[cand[torch.randperm(len(cand))[:k]]] = True
            return keep
        keep = present & (torch.rand(self.n_leads) >= self.lead_dropout)
        if not bool(keep.any()):
            # Keep one present branch at random so the batch still has a prediction to learn from.
            keep = torch.zeros_like(present)
            keep[cand[torch.randint(len(cand), (1,))]] = True
        return keep

    # ---- forward ----------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, lead_mask: LeadMask = None) -> torch.Tensor:
        """(B, n_leads, T) -> fused global feature g (B, fusion_dim). Masked leads are ignored
        (their branches are not computed, so their values may be anything, even NaN)."""
        self.check_input(x)
        mask = self._check_mask(lead_mask)
        if self.training and self.lead_dropout > 0:
            mask = self.draw_lead_mask(mask)
        self.last_lead_mask = mask
        idx: Index = None
        if not bool(mask.all()):
            idx = mask.nonzero().flatten().to(x.device)
            x = x.index_select(1, idx)
        h = F.relu(self.stem_bn(self.stem(x, idx), idx))
        for block in self.blocks:
            h = block(h, idx)
        f = h.mean(dim=-1).unflatten(1, (-1, self.branch_dim))  # (B, |S|, d): one row per branch
        return self.fusion(f, idx)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor, lead_mask: LeadMask = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, lead_mask))

    # ---- sub-models ---------------------------------------------------------------------
    def select_leads(self, indices: Sequence[int]) -> MLResNet:
        """A new model for leads `indices` (in that order) holding copies of their weights.

        model(x, mask) == model.select_leads(idx)(x[:, idx]) for idx = the True positions.
        """
        idx = [int(i) for i in indices]
        if not idx or len(set(idx)) != len(idx) or any(not 0 <= i < self.n_leads for i in idx):
            raise ValueError(f"{self.name}: select_leads needs distinct lead indices in "
                             f"[0, {self.n_leads}), got {list(indices)}")
        new = MLResNet(replace(self.cfg, n_leads=len(idx)))
        new.name = self.name
        it = torch.tensor(idx, dtype=torch.long)
        per_lead = {f"{mn}.{tn}" if mn else tn for mn, m in self.named_modules()
                    if isinstance(m, _LeadWise) for tn in m.lead_tensors}
        state = {k: (v.index_select(0, it.to(v.device)) if k in per_lead else v).clone()
                 for k, v in self.state_dict().items()}
        new.load_state_dict(state)
        return new.to(next(self.parameters()).device).train(self.training)


register_model("mlresnet")(Variant(MLResNet, MLResNetConfig))
# The tiny variant shortens the signal 4x in the stem: twelve narrow branches at full
# resolution cost far more per FLOP on a CPU (grouped conv, dropout masks) than one wide net.
register_model("mlresnet_tiny")(Variant(MLResNet, MLResNetConfig, stem_filters=8, stem_kernel=9,
                                        stem_stride=4, filters=(8, 16, 16), kernels=(9, 7, 5),
                                        downsample=(2, 2, 4), fusion_dim=32))
