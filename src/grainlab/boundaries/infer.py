"""Tiled inference: a boundary probability map for an image of any size.

Tiles of at most `tile_px` overlap by a margin of `tile_overlap` x `tile_px` px, are spread
evenly over the image and blended with raised-cosine ramps over the margin (so tile seams
leave no trace). The U-Net is fully convolutional, so an inference tile may be larger than
the training crops; larger tiles waste less work on overlaps. Inference runs on a copy of
the network with BatchNorm folded into the convolutions, in channels-last memory and
`torch.inference_mode`. On CUDA tiles run `tile_batch` at a time, with pinned host memory
and non-blocking copies; on the CPU one tile at a time in each of one thread per core (one
intra-op thread each), which keeps each core's working set in its cache. Both run in bf16
autocast where the hardware does bf16 natively: CUDA, and CPUs with AMX or AVX512-BF16
(see `uses_bf16`).
"""

from __future__ import annotations

import copy
import functools
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from grainlab.boundaries.unet import UNet, build_unet
from grainlab.errors import GrainlabError

PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids)."""
    return _cpu_feature("_is_amx_tile_supported")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively, with AMX tiles or AVX512-BF16 instructions
    (AMD Zen 4 and later): oneDNN's bf16 convolutions ran about twice as fast as fp32 on both
    kinds (benchmarks/RESULTS.md). Elsewhere bf16 is emulated and slower."""
    return cpu_has_amx() or _cpu_feature("_is_avx512_bf16_supported")


def _cpu_feature(name: str) -> bool:
    try:
        return bool(getattr(torch.cpu, name)())
    except AttributeError:
        return False


def uses_bf16(device: torch.device) -> bool:
    """bf16 autocast for the U-Net: the environment variable GRAINLAB_PRECISION chooses;
    `auto` (the default) means on CUDA and on CPUs with native bf16 (`cpu_has_bf16`), fp32 elsewhere."""
    choice = os.environ.get("GRAINLAB_PRECISION", "auto")
    if choice not in PRECISIONS:
        raise GrainlabError(f"GRAINLAB_PRECISION = {choice!r}: expected one of {', '.join(PRECISIONS)}")
    if choice != "auto":
        return choice == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def trains_channels_last(device: torch.device) -> bool:
    """Whether the U-Net trains in channels-last memory: on CUDA, and on the CPU except bf16
    on AMX, where NCHW was faster (benchmarks/RESULTS.md)."""
    return not (device.type == "cpu" and cpu_has_amx() and uses_bf16(device))


def mixed_precision(device: torch.device) -> torch.autocast:
    """The U-Net's autocast context on this device (weights, losses and outputs stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference, with what its checkpoint says about it."""

    net: UNet
    device: torch.device
    params: dict
    epoch: int
    postprocess: dict | None = None  # the post-processing calibrated in training, if the checkpoint has it

    @property
    def in_channels(self) -> int:
        return self.net.args.in_channels


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint as plain data, loaded with weights_only=True (no pickled code runs)."""
    import warnings

    from grainlab.errors import load_error_reason

    path = Path(path)
    if not path.is_file():
        raise GrainlabError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols on stderr
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt, foreign or malicious files
        raise GrainlabError(
            f"{path}: not a readable grainlab checkpoint ({load_error_reason(exc)}); "
            "expected a checkpoint written by `grainlab boundaries train`"
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
    try:
        net = build_unet(ckpt["model_args"])
        net.load_state_dict(ckpt["model"])
    except Exception as exc:  # a dict with the right keys but foreign contents
        from grainlab.errors import load_error_reason

        raise GrainlabError(
            f"{source}: not a grainlab boundary checkpoint ({load_error_reason(exc)}); "
            "expected a checkpoint written by `grainlab boundaries train`"
        ) from None
    net.eval().to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    post = ckpt.get("postprocess")
    return LoadedModel(
        net,
        device,
        ckpt.get("params", {}),
        int(ckpt.get("epoch", 0)),
        post if isinstance(post, dict) else None,
    )


def blend_window(length: int, ramp: int) -> np.ndarray:
    """1-D blending weights of a tile: a raised-cosine ramp over `ramp` px at both ends, 1 inside.

    Neighbouring tiles overlap by at least `ramp` px, so in an overlap one tile fades out
    as the next fades in and seams leave no trace. Never zero: every pixel gets a weight.
    """
    d = np.minimum(np.arange(length), np.arange(length)[::-1]) + 0.5
    ramp = max(1, min(ramp, length // 2))
    return np.maximum(np.sin(np.pi / 2 * np.minimum(d / ramp, 1.0)) ** 2, 1e-3).astype(np.float32)


def tile_layout(length: int, tile: int, overlap_px: int, multiple: int) -> tuple[int, list[int]]:
    """(tile side, tile starts) covering `length` px with tiles of at most `tile` px.

    The fewest tiles that overlap by at least `overlap_px` are spread evenly and shrunk to
    the smallest side (a multiple of `multiple`) that still covers the length, so no work
    goes into a last tile that mostly repeats its neighbour.
    """
    tile = max(multiple, tile // multiple * multiple)
    if length <= tile:
        return -(-length // multiple) * multiple, [0]
    overlap_px = min(max(overlap_px, 0), tile - multiple)
    n = -(-(length - overlap_px) // (tile - overlap_px))
    side = min(tile, -(-(length + (n - 1) * overlap_px) // (n * multiple)) * multiple)
    return side, [round(i * (length - side) / (n - 1)) for i in range(n)]


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


def _fold_batchnorm(net: UNet) -> UNet:
    """A copy of an eval-mode UNet with every BatchNorm folded into the convolution before it."""
    net = copy.deepcopy(net)
    for block in [*net.down, *net.merge]:
        for i in range(len(block) - 1):
            conv, norm = block[i], block[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
                conv.bias = nn.Parameter(norm.bias + (bias - norm.running_mean) * scale, requires_grad=False)
                block[i + 1] = nn.Identity()
    return net


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_network(net: UNet) -> nn.Module:
    """The network as inference runs it: BatchNorm folded into the convolutions (eval mode
    only), channels-last memory (faster on the CPU's oneDNN kernels and on CUDA).

    The prepared copy is cached per network and rebuilt when any weight changes (a model
    being trained is validated between steps).
    """
    if net.training:
        return net
    with torch.no_grad():
        state = [*net.parameters(), *net.buffers()]
        try:
            key = tuple((t.data_ptr(), t._version, t.device) for t in state)
        except RuntimeError:  # weights made in inference mode keep no version counter: no cache
            return _fold_batchnorm(net).to(memory_format=torch.channels_last)
        cached = _PREPARED.get(net)
        if cached is None or cached[0] != key:
            cached = (key, _fold_batchnorm(net).to(memory_format=torch.channels_last))
            _PREPARED[net] = cached
    return cached[1]


def run_network(model: LoadedModel, batch: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
    """Logits (float32) for a (N, C, H, W) float batch already on the model's device.

    Runs in inference mode, channels-last and `mixed_precision`.
    """
    net = inference_network(model.net) if net is None else net
    with torch.inference_mode(), mixed_precision(model.device):
        return net(batch.to(memory_format=torch.channels_last)).float()


def _tile_workers(device: torch.device, n_tiles: int) -> int:
    """Threads that each run whole tiles with one intra-op thread (CPU only). The demo-size
    U-Net's convolutions are too small to split well across cores, and whole tiles side by
    side kept both cores busy at about twice the rate; one tile per forward pass ran faster
    than four (benchmarks/RESULTS.md)."""
    if device.type != "cpu" or n_tiles < 2:
        return 1
    return max(1, min(torch.get_num_threads(), n_tiles))


def predict_probability(
    model: LoadedModel, image: np.ndarray, tile: int = 512, overlap: float = 0.125, batch_size: int = 8
) -> np.ndarray:
    """Boundary probability (H, W) float32 in [0, 1] for a float image of any size."""
    out = predict_logits(model, image, tile, overlap, batch_size)
    for _, rows in _row_chunks(out):  # sigmoid in place, a band at a time: no full-size temporaries
        np.clip(rows, -50, 50, out=rows)
        np.negative(rows, out=rows)
        np.exp(rows, out=rows)
        rows += 1
        np.reciprocal(rows, out=rows)
    return out


def predict_probability_dihedral(
    model: LoadedModel, image: np.ndarray, tile: int = 512, overlap: float = 0.125, batch_size: int = 8
) -> np.ndarray:
    """Dihedral test-time augmentation: the boundary probability from the mean logits of the
    image under its 8 flips and 90-degree rotations, each mapped back before averaging."""
    image = np.asarray(image, dtype=np.float32)
    total = None
    for k in range(4):
        for flip in (False, True):
            view = np.rot90(image, k, axes=(0, 1))
            if flip:
                view = view[:, ::-1]
            logits = predict_logits(model, np.ascontiguousarray(view), tile, overlap, batch_size)
            if flip:
                logits = logits[:, ::-1]
            logits = np.rot90(logits, -k, axes=(0, 1))
            total = logits.copy() if total is None else total + logits
    return (1 / (1 + np.exp(-np.clip(total / 8, -50, 50)))).astype(np.float32)


def _row_chunks(array: np.ndarray, pixels: int = 1 << 20):
    """(first row, view) of bands of about `pixels` pixels of a 2-D array."""
    step = max(1, pixels // max(array.shape[1], 1))
    for y in range(0, array.shape[0], step):
        yield y, array[y : y + step]


def predict_logits(
    model: LoadedModel, image: np.ndarray, tile: int = 512, overlap: float = 0.125, batch_size: int = 8
) -> np.ndarray:
    """Boundary logits (H, W) float32 for a float image of any size, tiles blended in logit space.

    Tiles of at most `tile` px overlapping by at least `overlap` x `tile` px are spread evenly
    over the image (see `tile_layout`) and run `batch_size` at a time on CUDA, one at a time
    per thread on the CPU. Memory beyond the image and the output is a few tiles: tiles are
    cut as they are needed and their blending weights are separable, so no full-size weight
    map exists.
    """
    chw = to_channels(np.asarray(image, dtype=np.float32), model.in_channels)
    _, h, w = chw.shape
    m = model.net.multiple
    ramp = int(max(m, tile // m * m) * overlap)
    tile_h, ys = tile_layout(h, tile, ramp, m)
    tile_w, xs = tile_layout(w, tile, ramp, m)
    if tile_h > h or tile_w > w:  # smaller than one tile: mirror out to it
        chw = np.pad(chw, ((0, 0), (0, max(tile_h - h, 0)), (0, max(tile_w - w, 0))), mode="symmetric")
    ph, pw = chw.shape[1:]
    win_y = blend_window(tile_h, ramp) if len(ys) > 1 else np.ones(tile_h, np.float32)
    win_x = blend_window(tile_w, ramp) if len(xs) > 1 else np.ones(tile_w, np.float32)
    window = torch.from_numpy(np.outer(win_y, win_x))
    norm_y, norm_x = np.zeros(ph, np.float32), np.zeros(pw, np.float32)
    for y in ys:
        norm_y[y : y + tile_h] += win_y
    for x in xs:
        norm_x[x : x + tile_w] += win_x
    net = inference_network(model.net)
    out = np.zeros((ph, pw), np.float32)
    corners = [(y, x) for y in ys for x in xs]
    pin = model.device.type == "cuda"
    workers = _tile_workers(model.device, len(corners))
    step = batch_size if model.device.type == "cuda" else 1
    groups = [corners[i : i + step] for i in range(0, len(corners), step)]

    def weighted_tiles(group: list[tuple[int, int]]) -> np.ndarray:
        if workers > 1:
            torch.set_num_threads(1)  # this worker thread only (OpenMP's setting is per thread)
        tiles = torch.from_numpy(np.stack([chw[:, y : y + tile_h, x : x + tile_w] for y, x in group]))
        if pin:
            tiles = tiles.pin_memory()
        logits = run_network(model, tiles.to(model.device, non_blocking=pin), net)[:, 0]
        return (logits.float().cpu() * window).numpy()

    def accumulate(group, weighted):  # in the calling thread only: overlapping tiles add up
        for (y, x), t in zip(group, weighted, strict=True):
            out[y : y + tile_h, x : x + tile_w] += t

    if workers == 1:
        for group in groups:
            accumulate(group, weighted_tiles(group))
    else:
        with ThreadPoolExecutor(workers) as pool:
            for first in range(0, len(groups), 2 * workers):  # a bounded window of groups in flight
                window_groups = groups[first : first + 2 * workers]
                for group, weighted in zip(
                    window_groups, pool.map(weighted_tiles, window_groups), strict=True
                ):
                    accumulate(group, weighted)
    for y, rows in _row_chunks(out):
        rows /= np.outer(norm_y[y : y + len(rows)], norm_x)
    if (ph, pw) != (h, w):
        out = np.ascontiguousarray(out[:h, :w])
    return out
