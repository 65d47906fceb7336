"""The triplet network: a small CNN on the crop with its log-magnification injected, and the triplet loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAG_EMBED = 16


def log_magnification(px_per_um) -> torch.Tensor:
    """The network's magnification input: log10(px/um) centred on 10 px/um."""
    return torch.log10(torch.as_tensor(px_per_um, dtype=torch.float32)).reshape(-1, 1) - 1.0


class TripletNet(nn.Module):
    """Crop (and its px/um) -> descriptor vector.

    The magnification enters after the convolutional features: concatenated before the
    head ('concat') or as a feature-wise scale and shift ('film'), or not at all.
    """

    def __init__(
        self,
        in_channels: int = 2,
        widths=(16, 32, 64, 128),
        descriptor_dim: int = 2,
        use_magnification: bool = True,
        magnification_mode: str = "concat",
    ):
        super().__init__()
        self.use_magnification = use_magnification
        self.magnification_mode = magnification_mode
        layers = [
            nn.Conv2d(in_channels, widths[0], 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        layers += [
            nn.Conv2d(widths[-1], widths[-1], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        self.features = nn.Sequential(*layers)
        features = widths[-1]
        head_in = features
        if use_magnification:
            self.mag = nn.Sequential(
                nn.Linear(1, MAG_EMBED),
                nn.ReLU(inplace=True),
                nn.Linear(MAG_EMBED, MAG_EMBED),
                nn.ReLU(inplace=True),
            )
            if magnification_mode == "film":
                self.film = nn.Linear(MAG_EMBED, 2 * features)
            else:
                head_in += MAG_EMBED
        self.head = nn.Sequential(
            nn.Linear(head_in, 64), nn.ReLU(inplace=True), nn.Linear(64, descriptor_dim)
        )

    def forward(self, x: torch.Tensor, log_mag: torch.Tensor) -> torch.Tensor:
        # channels-last: about twice as fast on the CPU (benchmarks/RESULTS.md), the layout CUDA prefers
        f = self.features(x.contiguous(memory_format=torch.channels_last))
        if self.use_magnification:
            e = self.mag(log_mag)
            if self.magnification_mode == "film":
                gamma, beta = self.film(e).chunk(2, dim=1)
                f = f * (1 + gamma) + beta
            else:
                f = torch.cat([f, e], dim=1)
        return self.head(f)


def triplet_loss(z: torch.Tensor, labels: torch.Tensor, margin: float, mining: str = "batch-hard"):
    """Triplet loss with online mining in the batch; returns (loss, fraction of active triplets).

    batch-hard: each anchor with its farthest positive and nearest negative.
    semi-hard: each anchor-positive pair with the nearest negative farther than the positive
    (the farthest negative when none is).
    """
    d = torch.cdist(z, z)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    pos, neg = same & ~eye, ~same
    big = d.detach().max() + 1.0
    if mining == "batch-hard":
        d_ap = (d * pos).max(dim=1).values
        d_an = torch.where(neg, d, big).min(dim=1).values
        losses = F.relu(d_ap - d_an + margin)
    else:
        d_ap = d[:, :, None]  # anchor a, positive p
        d_an = d[:, None, :]  # anchor a, negative n
        outside = neg[:, None, :] & (d_an > d_ap)
        nearest_outside = torch.where(outside, d_an, big).min(dim=2).values
        farthest = torch.where(neg[:, None, :], d_an, -big).max(dim=2).values
        chosen = torch.where(outside.any(dim=2), nearest_outside, farthest)
        losses = F.relu(d - chosen + margin)[pos]
    return losses.mean(), (losses > 0).float().mean()
