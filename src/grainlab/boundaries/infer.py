"""Tiled inference: a boundary probability map for an image of any size.

The image is mirrored out to whole tiles, tiles overlap and are blended with a Hann
window (so tile seams leave no trace), and tiles run through the network in batches. On
CUDA the network runs in bf16 autocast with channels-last memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grainlab.boundaries.unet import UNet, build_unet
from grainlab.errors import GrainlabError


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference, with what its checkpoint says about it."""

    net: UNet
    device: torch.device
    params: dict
    epoch: int

    @property
    def in_channels(self) -> int:
        return self.net.args.in_channels


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint as plain data, loaded with weights_only=True (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise GrainlabError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise GrainlabError(
            f"{path}: not a readable grainlab checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise GrainlabError(f"{path}: not a grainlab boundary checkpoint (no 'model_args' / 'model')")
    return ckpt


def load_model(source: str | Path, device: torch.device | None = None) -> LoadedModel:
    """Load a checkpoint file, or an MLflow `models:/...` / `runs:/...` URI of a logged boundary model."""
    text = str(source)
    if text.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        from grainlab.tracking import download_model_checkpoint

        source = download_model_checkpoint(text)
    ckpt = read_checkpoint(source)
    device = device or pick_device()
    net = build_unet(ckpt["model_args"])
    net.load_state_dict(ckpt["model"])
    net.eval().to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return LoadedModel(net, device, ckpt.get("params", {}), int(ckpt.get("epoch", 0)))


def hann_window(height: int, width: int) -> np.ndarray:
    """A 2-D blending window, largest in the middle; never zero, so every pixel gets a weight."""

    def one(n):
        return np.maximum(np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2, 1e-3)

    return np.outer(one(height), one(width)).astype(np.float32)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) float image -> (C, H, W) with the model's channel count."""
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        image = np.moveaxis(image[..., :3], 2, 0)
    else:
        raise GrainlabError(f"image of shape {image.shape}: expected (H, W) grey or (H, W, 3) RGB")
    if image.shape[0] == 3 and channels == 1:
        image = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), image, axes=1)[None]
    elif image.shape[0] == 1 and channels == 3:
        image = np.repeat(image, 3, axis=0)
    return np.ascontiguousarray(image, dtype=np.float32)


def run_network(model: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """Logits for a (N, C, H, W) float batch already on the model's device."""
    with torch.inference_mode():
        if model.device.type == "cuda":
            batch = batch.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model.net(batch).float()
        return model.net(batch)


def predict_probability(
    model: LoadedModel, image: np.ndarray, tile: int = 256, overlap: float = 0.25, batch_size: int = 8
) -> np.ndarray:
    """Boundary probability (H, W) float32 in [0, 1] for a float image of any size."""
    logits = predict_logits(model, image, tile, overlap, batch_size)
    return (1 / (1 + np.exp(-np.clip(logits, -50, 50)))).astype(np.float32)


def predict_logits(
    model: LoadedModel, image: np.ndarray, tile: int = 256, overlap: float = 0.25, batch_size: int = 8
) -> np.ndarray:
    """Boundary logits (H, W) float32 for a float image of any size, tiles blended in logit space."""
    chw = to_channels(np.asarray(image, dtype=np.float32), model.in_channels)
    _, h, w = chw.shape
    m = model.net.multiple
    tile = max(m, tile // m * m)
    tile_h = min(tile, -(-h // m) * m)
    tile_w = min(tile, -(-w // m) * m)
    padded = np.pad(chw, ((0, 0), (0, max(tile_h - h, 0)), (0, max(tile_w - w, 0))), mode="symmetric")
    ph, pw = padded.shape[1:]
    ys = _starts(ph, tile_h, max(1, int(tile_h * (1 - overlap))))
    xs = _starts(pw, tile_w, max(1, int(tile_w * (1 - overlap))))
    window = hann_window(tile_h, tile_w)
    acc = np.zeros((ph, pw), np.float32)
    weight = np.zeros((ph, pw), np.float32)
    corners = [(y, x) for y in ys for x in xs]
    for i in range(0, len(corners), batch_size):
        group = corners[i : i + batch_size]
        tiles = np.stack([padded[:, y : y + tile_h, x : x + tile_w] for y, x in group])
        logits = run_network(model, torch.from_numpy(tiles).to(model.device)).cpu().numpy()
        for (y, x), t in zip(group, logits[:, 0], strict=False):
            acc[y : y + tile_h, x : x + tile_w] += t * window
            weight[y : y + tile_h, x : x + tile_w] += window
    return (acc / weight)[:h, :w]
