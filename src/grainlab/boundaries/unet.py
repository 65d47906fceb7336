"""The U-Net of Ronneberger et al. 2015 in plain torch, returning boundary logits.

`depth` counts resolution levels: depth 5 with base 64 is the published 64->1024 network
(four 2x downsamplings). Inputs must have sides divisible by 2**(depth - 1); tiled
inference pads its tiles to that (see `UNet.multiple`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from grainlab.errors import GrainlabError


@dataclass(frozen=True)
class UNetArgs:
    """Everything needed to rebuild a UNet (stored in every checkpoint)."""

    depth: int = 4
    base_channels: int = 8
    dropout: float = 0.0
    norm: str = "batch"
    in_channels: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class ChannelDropout(nn.Dropout2d):
    """nn.Dropout2d that draws its channel mask from `generator` when one is set (a training
    thread's own, see `cpu_parallel.SplitBatch`), else from torch's global generator."""

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.generator is None or not self.training or self.p == 0:
            return super().forward(x)
        keep = torch.empty(x.shape[:2] + (1, 1), device=x.device)
        keep.bernoulli_(1 - self.p, generator=self.generator).div_(1 - self.p)
        return x * keep.to(x.dtype)


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by normalisation and ReLU; optional dropout."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float = 0.0):
        layers = [
            nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(ChannelDropout(dropout))
        super().__init__(*layers)


class UNet(nn.Module):
    """Encoder-decoder with skip connections; one output channel of logits."""

    def __init__(self, args: UNetArgs):
        super().__init__()
        if args.norm not in ("batch", "group", "none"):
            raise GrainlabError(f"unet.norm = {args.norm!r}: expected batch, group or none")
        if args.depth < 2:
            raise GrainlabError(f"unet.depth = {args.depth}: expected at least 2 levels")
        self.args = args
        widths = [args.base_channels * 2**i for i in range(args.depth)]
        deep = {args.depth - 1, args.depth - 2}  # dropout at the two deepest levels
        self.down = nn.ModuleList()
        cin = args.in_channels
        for level, w in enumerate(widths):
            self.down.append(DoubleConv(cin, w, args.norm, args.dropout if level in deep else 0.0))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1], strict=False):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.merge.append(DoubleConv(2 * w, w, args.norm))
        self.head = nn.Conv2d(widths[0], 1, 1)
        # start at a boundary probability of ~0.1 (a typical share of boundary pixels), so that
        # early training is not spent learning the class prior
        nn.init.constant_(self.head.bias, -2.0)

    @property
    def multiple(self) -> int:
        """Input sides must be a multiple of this."""
        return 2 ** (self.args.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise GrainlabError(
                f"U-Net input {h}x{w}: sides must be multiples of {self.multiple} (2**(depth-1)); pad the image"
            )
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, merge in zip(self.up, self.merge, strict=False):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def build_unet(args: UNetArgs | dict) -> UNet:
    """A UNet from its arguments (a UNetArgs, or the dict stored in a checkpoint)."""
    if isinstance(args, dict):
        args = UNetArgs(**args)
    return UNet(args)
