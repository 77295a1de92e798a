"""U-shaped residual network for lead reconstruction, after Gedon et al. 2021: an
encoder-decoder with residual blocks and skip connections that maps the available leads
to all twelve at the same length.

    stem conv + BN + ReLU                      (n_leads, T)      -> (c0, T)
    encoder: block at c0; then `depth` times   max-pool /2, block c_{i-1} -> c_i
    decoder: `depth` times                     transposed conv x2 c_{i+1} -> c_i,
                                               concat encoder skip, block 2c_i -> c_i
    features = decoder's last map (c0, T); head = 1x1 conv to num_outputs leads.
Widths c_i = min(base_filters * 2**i, max_filters). T must divide by 2**depth so every
upsampled map lines up with its skip connection exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import ECGModel, ModelConfig, Variant
from .layers import Dropout
from .registry import register_model


@dataclass(frozen=True)
class UResNetConfig(ModelConfig):
    base_filters: int = 32
    max_filters: int = 256
    depth: int = 4
    kernel_size: int = 9
    dropout: float = 0.0
    # A 1x1 conv from input to output leads, added to the decoder's output. Limb leads are
    # exact linear combinations of each other (Einthoven, Goldberger), so this path rebuilds
    # them on its own and leaves the U-Net to learn only what is not linear in the inputs.
    linear_bypass: bool = True

    def validate(self) -> None:
        self._positive_int("base_filters")
        self._positive_int("max_filters")
        self._positive_int("depth")
        self._odd_kernel("kernel_size")
        self._probability("dropout")
        if not isinstance(self.linear_bypass, bool):
            raise ValueError(f"model setting linear_bypass={self.linear_bypass!r}: must be true or false")
        super().validate()

    def sample_multiple(self) -> int:
        return 2 ** self.depth if isinstance(self.depth, int) and self.depth >= 0 else 1

    def multiple_reason(self) -> str:
        return f"2**depth with depth={self.depth}"

    def widths(self) -> list[int]:
        return [min(self.base_filters * 2 ** i, self.max_filters) for i in range(self.depth + 1)]


class ResBlock(nn.Module):
    """conv-BN-ReLU-dropout-conv-BN, plus identity (or 1x1 conv) skip, then ReLU."""

    def __init__(self, c_in: int, c_out: int, k: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, k, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.drop = Dropout(dropout)
        self.conv2 = nn.Conv1d(c_out, c_out, k, padding=k // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.skip = nn.Conv1d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.bn1(self.conv1(x))))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class UResNet(ECGModel):
    default_name = "uresnet"

    def __init__(self, cfg: UResNetConfig) -> None:
        super().__init__(cfg)
        k, p = cfg.kernel_size, cfg.dropout
        c = cfg.widths()
        self.stem = nn.Sequential(nn.Conv1d(cfg.n_leads, c[0], k, padding=k // 2, bias=False),
                                  nn.BatchNorm1d(c[0]), nn.ReLU())
        self.enc = nn.ModuleList([ResBlock(c[0], c[0], k, p)] +
                                 [ResBlock(c[i - 1], c[i], k, p) for i in range(1, cfg.depth + 1)])
        self.up = nn.ModuleList(nn.ConvTranspose1d(c[i + 1], c[i], 2, stride=2)
                                for i in range(cfg.depth))
        self.dec = nn.ModuleList(ResBlock(2 * c[i], c[i], k, p) for i in range(cfg.depth))
        self.num_features = c[0]
        self.head = nn.Conv1d(c[0], cfg.num_outputs, 1)
        self.bypass = nn.Conv1d(cfg.n_leads, cfg.num_outputs, 1) if cfg.linear_bypass else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_leads, T) -> decoder's last feature map (B, c0, T)."""
        self.check_input(x)
        h = self.enc[0](self.stem(x))
        skips = [h]
        for block in self.enc[1:]:
            h = block(F.max_pool1d(h, 2))
            skips.append(h)
        h = skips.pop()  # bottleneck
        for i in reversed(range(len(self.dec))):
            h = self.dec[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return h

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """(B, c0, T) -> reconstructed leads (B, num_outputs, T)."""
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_head(self.forward_features(x))
        return out if self.bypass is None else out + self.bypass(x)


register_model("uresnet")(Variant(UResNet, UResNetConfig))
register_model("uresnet_tiny")(Variant(UResNet, UResNetConfig, base_filters=8, max_filters=32,
                                       depth=2, kernel_size=9))
