"""Random crops of random physical size, resampled to a fixed size; the crop's px/um is its magnification."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from grainlab.errors import GrainlabError
from grainlab.images import parallel_map, worker_threads


def check_px_per_um(value, what: str = "px_per_um") -> float:
    """The magnification as a positive finite float; a GrainlabError naming `what` otherwise."""
    try:
        m = float(value)
    except (TypeError, ValueError):
        raise GrainlabError(
            f"{what} = {value!r}: expected the magnification in pixels per micrometre, a positive number"
        ) from None
    if not math.isfinite(m) or m <= 0:
        raise GrainlabError(
            f"{what} = {value!r}: expected the magnification in pixels per micrometre, a positive number"
        )
    return m


def check_size(shape, crop_min_px: int, what: str = "image") -> None:
    h, w = shape[:2]
    if min(h, w) < crop_min_px:
        raise GrainlabError(
            f"{what}: {w}x{h} pixels is smaller than the smallest crop ({crop_min_px} px, recognition.crop_min_px); "
            "expected an image at least that large"
        )


def sample_boxes(rng: np.random.Generator, shape, n: int, crop_min_px: int, crop_max_px: int) -> np.ndarray:
    """n square boxes (top, left, side) inside an image; sides log-uniform in [crop_min_px, crop_max_px]."""
    h, w = shape[:2]
    hi = min(crop_max_px, h, w)
    side = np.exp(rng.uniform(np.log(crop_min_px), np.log(hi + 1), n)).astype(int).clip(crop_min_px, hi)
    top = (rng.uniform(size=n) * (h - side + 1)).astype(int)
    left = (rng.uniform(size=n) * (w - side + 1)).astype(int)
    return np.stack([top, left, side], axis=1)


def extract(img: np.ndarray, boxes: np.ndarray, out_px: int) -> np.ndarray:
    """The boxes of a grey image resampled to (n, out_px, out_px) float32 (area-averaged when shrinking).

    The crops are cut and resized in one thread per core (OpenCV releases the GIL)."""
    out = np.empty((len(boxes), out_px, out_px), np.float32)

    def work(part: np.ndarray):
        for i in part:
            out[i] = resample(img, boxes[i], out_px)

    parallel_map(work, np.array_split(np.arange(len(boxes)), worker_threads(len(boxes))))
    return out


def resample(img: np.ndarray, box: np.ndarray, out_px: int) -> np.ndarray:
    """One box (top, left, side) of a grey image resampled to (out_px, out_px) float32."""
    top, left, s = box
    interp = cv2.INTER_AREA if s > out_px else cv2.INTER_LINEAR
    return cv2.resize(img[top : top + s, left : left + s], (out_px, out_px), interpolation=interp)


def crop_magnification(px_per_um: float, boxes: np.ndarray, out_px: int) -> np.ndarray:
    """px/um of each crop after resampling."""
    return (px_per_um * out_px / boxes[:, 2]).astype(np.float32)


def to_channels(crops: torch.Tensor, edge_channel: bool) -> torch.Tensor:
    """(n, h, w) crops in [0, 1] -> (n, c, h, w) network input on the crops' device: centred
    intensity, plus the Sobel gradient magnitude (3x3, mirrored border, as OpenCV's default)."""
    x = crops[:, None]
    if not edge_channel:
        return x - 0.5
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    dx = p[..., 2:] - p[..., :-2]
    sy = p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]
    gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
    gy = sy[..., 2:, :] - sy[..., :-2, :]
    return torch.cat([x - 0.5, torch.sqrt(gx * gx + gy * gy)], dim=1)
