"""The loss registry: each boundary loss with its name, constructor and Optuna search space.

Every loss takes logits and a {0, 1} target of the same shape (N, 1, H, W) and returns a
scalar. A search space is plain data, read by tuning.py:

    {"alpha": ("float", 0.05, 0.95), "iterations": ("int", 3, 15),
     "mode": ("categorical", ("balanced", "distance"))}

Add a loss with one decorated class (and its test in tests/test_losses.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from grainlab.errors import GrainlabError, clip, short


@dataclass(frozen=True)
class LossSpec:
    name: str
    factory: Callable[..., nn.Module]
    space: dict[str, tuple] = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, space: dict[str, tuple] | None = None):
    """Class decorator: add a loss to the registry under `name`, with its search space."""

    def decorate(cls):
        LOSSES[name] = LossSpec(name, cls, dict(space or {}))
        return cls

    return decorate


def loss_names() -> list[str]:
    return sorted(LOSSES)


def search_space(name: str) -> dict[str, tuple]:
    return dict(_spec(name).space)


def _spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise GrainlabError(f"unknown loss {name!r}; expected one of {loss_names()}")
    return LOSSES[name]


def make_loss(name: str, **kwargs) -> nn.Module:
    """Build a registered loss; unknown names or arguments are GrainlabErrors."""
    spec = _spec(name)
    try:
        return spec.factory(**kwargs)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. gamma='abc': float('abc')
        raise GrainlabError(
            f"boundaries.loss_args.{name} = {short(kwargs)}: {clip(exc)}; "
            f"expected the arguments of loss {name!r}: {clip(inspect.signature(spec.factory, eval_str=True), 200)}"
        ) from None


# --------------------------------------------------------------------------- losses


@register_loss("bce")
class BCELoss(nn.Module):
    """Binary cross-entropy on logits (the published choice)."""

    def forward(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits, target)


@register_loss("mse")
class MSELoss(nn.Module):
    """Mean squared error between sigmoid probabilities and the target."""

    def forward(self, logits, target):
        return F.mse_loss(torch.sigmoid(logits), target)


@register_loss("focal", {"alpha": ("float", 0.05, 0.95), "gamma": ("float", 0.5, 5.0)})
class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.alpha, self.gamma = float(alpha), float(gamma)

    def forward(self, logits, target):
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        alpha_t = self.alpha * target + (1 - self.alpha) * (1 - target)
        return (alpha_t * (1 - p_t) ** self.gamma * ce).mean()


def _tversky_index(p, t, alpha: float, beta: float, smooth: float):
    tp = (p * t).sum()
    fp = (p * (1 - t)).sum()
    fn = ((1 - p) * t).sum()
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


@register_loss("dice", {"smooth": ("float", 0.01, 10.0)})
class DiceLoss(nn.Module):
    """1 - soft Dice over the whole batch."""

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = float(smooth)

    def forward(self, logits, target):
        return 1 - _tversky_index(torch.sigmoid(logits), target, 0.5, 0.5, self.smooth)


@register_loss("tversky", {"alpha": ("float", 0.05, 0.95), "beta": ("float", 0.05, 0.95)})
class TverskyLoss(nn.Module):
    """1 - Tversky index; alpha weighs false positives, beta false negatives."""

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0):
        super().__init__()
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)

    def forward(self, logits, target):
        return 1 - _tversky_index(torch.sigmoid(logits), target, self.alpha, self.beta, self.smooth)


@register_loss("bce_dice", {"dice_weight": ("float", 0.1, 2.0)})
class BCEDiceLoss(nn.Module):
    """BCE + dice_weight * soft Dice loss."""

    def __init__(self, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.dice = DiceLoss(smooth)

    def forward(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits, target) + self.dice_weight * self.dice(
            logits, target
        )


def soft_skeleton(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """Differentiable skeleton of a soft mask (Shit et al. 2021, clDice) by iterated min/max pooling."""

    def erode(y):
        return torch.minimum(-F.max_pool2d(-y, (3, 1), 1, (1, 0)), -F.max_pool2d(-y, (1, 3), 1, (0, 1)))

    def dilate(y):
        return F.max_pool2d(y, 3, 1, 1)

    skel = F.relu(x - dilate(erode(x)))
    for _ in range(iterations):
        x = erode(x)
        delta = F.relu(x - dilate(erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


@register_loss("cldice", {"weight": ("float", 0.1, 1.0), "iterations": ("int", 3, 15)})
class ClDiceLoss(nn.Module):
    """BCE + weight * (1 - soft clDice): rewards tracings whose centre lines match the truth's."""

    def __init__(self, weight: float = 0.5, iterations: int = 5, smooth: float = 1.0):
        super().__init__()
        self.weight, self.iterations, self.smooth = float(weight), int(iterations), float(smooth)

    def forward(self, logits, target):
        p = torch.sigmoid(logits)
        skel_p = soft_skeleton(p, self.iterations)
        skel_t = soft_skeleton(target, self.iterations)
        precision = ((skel_p * target).sum() + self.smooth) / (skel_p.sum() + self.smooth)
        sensitivity = ((skel_t * p).sum() + self.smooth) / (skel_t.sum() + self.smooth)
        cl_dice = 2 * precision * sensitivity / (precision + sensitivity)
        return F.binary_cross_entropy_with_logits(logits, target) + self.weight * (1 - cl_dice)


def distance_weights(target: torch.Tensor, w0: float, sigma: float) -> torch.Tensor:
    """1 + w0 * exp(-d^2 / (2 sigma^2)), d = distance (px) to the nearest boundary pixel."""
    t = target.detach().cpu().numpy() > 0.5
    d = np.stack(
        [
            ndimage.distance_transform_edt(~m) if m.any() else np.full(m.shape, np.inf)
            for m in t.reshape(-1, *t.shape[-2:])
        ]
    )
    w = 1 + w0 * np.exp(-(d**2) / (2 * sigma**2))
    return torch.from_numpy(w.reshape(t.shape).astype(np.float32)).to(target.device)


@register_loss(
    "weighted_bce",
    {
        "mode": ("categorical", ("balanced", "distance")),
        "w0": ("float", 1.0, 10.0),
        "sigma": ("float", 1.0, 10.0),
    },
)
class WeightedBCELoss(nn.Module):
    """BCE with per-pixel weights, normalised by their sum.

    mode 'balanced': boundary pixels weigh n_background / n_boundary (per batch);
    mode 'distance': weights from `distance_weights` (w0, sigma), peaking near boundaries.
    """

    def __init__(self, mode: str = "balanced", w0: float = 5.0, sigma: float = 3.0):
        super().__init__()
        if mode not in ("balanced", "distance"):
            raise GrainlabError(f"weighted_bce mode = {mode!r}: expected 'balanced' or 'distance'")
        self.mode, self.w0, self.sigma = mode, float(w0), float(sigma)

    def forward(self, logits, target):
        if self.mode == "balanced":
            n_pos = target.sum()
            n_neg = target.numel() - n_pos
            w_pos = torch.where(n_pos > 0, n_neg / n_pos.clamp(min=1), torch.ones_like(n_pos))
            weights = 1 + (w_pos - 1) * target
        else:
            weights = distance_weights(target, self.w0, self.sigma)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (weights * ce).sum() / weights.sum()
