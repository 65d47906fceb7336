"""Boundary U-Net: training images/s, achieved GFLOP/s, and tiled inference megapixels/s.

Training runs grainlab's own hot loop (`train.train_epoch`) over its own data path
(`CropSampler`, `CropDataset` with the configured augmentation, a DataLoader built as
`train_boundaries` builds it: the profile's batch size and workers; bf16 autocast on CUDA
and CPUs with native bf16 (`uses_bf16`); channels-last (`trains_channels_last`); pinned
memory on CUDA; `torch.compile` with
`--set boundaries.compile=true`). The plain reference: batch 1 through
DataLoader(num_workers=0), fp32, same model, data, loss and optimizer.

Inference runs `predict_probability` with the profile's tile settings. The plain
reference: the image mirrored out to whole 256 px tiles, one tile at a time, fp32,
without inference_mode or no_grad.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    ROOT,
    Figure,
    GpuUtilisation,
    Skipped,
    best_times,
    inference_model,
    sync,
    tiles_per_pass,
)
from grainlab.boundaries.data import CropDataset, CropSampler, build_augmentation, load_pairs
from grainlab.boundaries.infer import predict_probability, trains_channels_last, uses_bf16
from grainlab.boundaries.losses import make_loss
from grainlab.boundaries.train import crop_loader, train_epoch, training_network
from grainlab.boundaries.unet import UNetArgs, build_unet
from grainlab.config import Params, to_dict
from grainlab.images import read_image

REFERENCE_TILE = 256
REAL_DATA = ROOT.parent / "shared" / "data" / "tbm-dev" / "full"


def training_samples(params: Params, crop: int, n: int = 16) -> tuple[list, str]:
    """Up to n (image, mask) pairs of the profile's main dataset, else synthetic noise of crop size."""
    from grainlab.boundaries.train import dataset_root
    from grainlab.datasets.folder import load_dataset
    from grainlab.errors import GrainlabError

    cfg = params.boundaries
    try:
        pairs = load_dataset(dataset_root(params, cfg.dataset)).pairs[:n]
        return load_pairs(pairs, cfg.unet.in_channels, params.data.max_image_pixels), f"dataset {cfg.dataset}"
    except GrainlabError:
        rng = np.random.default_rng(0)
        side = max(crop, params.tem.image_px)
        samples = [
            (
                rng.random((cfg.unet.in_channels, side, side), np.float32).astype(np.float16),
                rng.random((side, side)) > 0.9,
            )
            for _ in range(n)
        ]
        return samples, "random images (no dataset found)"


def _plain_step(net, opt, x, y):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def train_figures(
    params: Params,
    profile: str,
    device: torch.device,
    crop: int,
    steps: int,
    ref_images: int,
    batch: int | None,
    matmul_n: int = 2048,
    repeats: int = 2,
) -> list[Figure]:
    """Images/s of grainlab's training loop and of the plain loop; GFLOP/s against a matmul."""
    cfg = params.boundaries
    batch = batch or cfg.batch_size
    samples, source = training_samples(params, crop)
    dataset = CropDataset(samples, crop, build_augmentation(cfg.augment))
    args = UNetArgs(**to_dict(cfg.unet))
    loss_fn = make_loss(cfg.loss, **cfg.loss_args.get(cfg.loss, {}))

    torch.manual_seed(params.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train_boundaries sets it
    _, train_net, opt = training_network(cfg, device)
    loader = crop_loader(
        dataset,
        CropSampler(len(samples), batch * steps, params.seed),
        batch,
        cfg.workers,
        device,
        params.seed,
    )
    torch.manual_seed(params.seed)
    ref_net = build_unet(args).to(device).train()
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=cfg.lr)
    plain = DataLoader(dataset, batch_size=1, sampler=CropSampler(len(samples), ref_images, 2), num_workers=0)

    def grainlab_epoch():
        train_epoch(train_net, loader, loss_fn, opt, device, 1)

    def plain_loop():
        for x, y in plain:
            _plain_step(ref_net, ref_opt, x.to(device), y.to(device))

    warm = DataLoader(dataset, batch_size=batch, sampler=CropSampler(len(samples), batch, 1))
    x0, y0 = dataset[(0, 0)]

    def warm_up():  # one batch each: kernels chosen, optimizer state made (loader workers start in round 1)
        train_epoch(train_net, warm, loss_fn, opt, device, 0)
        _plain_step(ref_net, ref_opt, x0[None].to(device), y0[None].to(device))

    # interleaved rounds, best of each (see best_times)
    t_fast, t_ref = best_times([grainlab_epoch, plain_loop], repeats, device, warmup=[warm_up])
    fast, ref = batch * steps / t_fast, ref_images / t_ref
    if device.type == "cuda":  # one more epoch alone: GPU utilisation and peak memory of grainlab's loop
        torch.cuda.reset_peak_memory_stats(device)
        with GpuUtilisation(device) as gpu:
            grainlab_epoch()
            sync(device)

    # FLOPs of one training step (forward + backward) per image, counted on the CPU copy
    counter = FlopCounterMode(display=False)
    probe = build_unet(args).train()
    with counter:
        out = probe(torch.rand(1, args.in_channels, crop, crop))
        out.sum().backward()
    flops_per_image = counter.get_total_flops()
    matmul = matmul_gflops(device, matmul_n)
    achieved = flops_per_image * fast / 1e9

    where = f"{profile} U-Net ({args.depth} levels, base {args.base_channels}), {crop} px, {source}"
    detail = (
        f"batch {batch}, workers {cfg.workers}"
        + (", bf16 autocast" if uses_bf16(device) else ", fp32")
        + (", channels-last" if trains_channels_last(device) else "")
        + (", torch.compile" if cfg.compile else "")
    )
    figures = [
        Figure(
            "train",
            f"training {profile} {crop} px",
            "img/s",
            fast,
            ref,
            f"{where}; grainlab {detail}; reference batch 1, DataLoader(num_workers=0), fp32",
            {
                "batch": batch,
                "steps": steps,
                "reference_images": ref_images,
                "workers": cfg.workers,
                "rounds": repeats,
            },
        ),
        Figure(
            "flops",
            f"training {profile} GFLOP/s vs matmul",
            "GFLOP/s",
            achieved,
            matmul,
            f"{flops_per_image / 1e9:.2f} GFLOP per image (FlopCounterMode, forward + backward) x grainlab img/s; "
            f"reference: {matmul_n}x{matmul_n} matmul ({'bf16' if device.type == 'cuda' else 'fp32'})",
            {"gflop_per_image": flops_per_image / 1e9},
        ),
    ]
    if device.type == "cuda":
        figures.append(
            Figure(
                "train",
                f"training {profile} peak GPU memory",
                "MiB",
                torch.cuda.max_memory_allocated(device) / 2**20,
                detail="torch.cuda.max_memory_allocated during one grainlab epoch",
            )
        )
        if not gpu.mean:
            figures[0].detail += f"; GPU utilisation: {gpu.note or f'{len(gpu.samples)} samples, mean 0'}"
        else:
            figures.append(
                Figure(
                    "train",
                    f"training {profile} GPU utilisation",
                    "%",
                    gpu.mean,
                    detail=f"{len(gpu.samples)} samples",
                )
            )
    return figures


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 3) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    (t,) = best_times([lambda: a @ b], repeats, device)
    return 2 * n**3 / t / 1e9


def plain_tiles(
    net: torch.nn.Module, chw: np.ndarray, device: torch.device, tile: int = REFERENCE_TILE
) -> np.ndarray:
    """The plain loop: mirror out to whole tiles, one tile at a time, fp32, no inference_mode."""
    _, h, w = chw.shape
    ph, pw = -(-h // tile) * tile, -(-w // tile) * tile
    padded = np.pad(chw, ((0, 0), (0, ph - h), (0, pw - w)), mode="symmetric")
    out = np.zeros((ph, pw), np.float32)
    for y in range(0, ph, tile):
        for x in range(0, pw, tile):
            t = torch.from_numpy(np.ascontiguousarray(padded[None, :, y : y + tile, x : x + tile])).to(device)
            out[y : y + tile, x : x + tile] = torch.sigmoid(net(t))[0, 0].detach().cpu().numpy()
    return out[:h, :w]


def infer_figure(
    params: Params,
    profile: str,
    device: torch.device,
    name: str,
    images: list[np.ndarray],
    repeats: int,
    detail: str,
) -> Figure:
    cfg = params.boundaries
    args = UNetArgs(**to_dict(cfg.unet))
    model = inference_model(args, device)
    ref_net = build_unet(args).eval().to(device)
    ref_net.load_state_dict(model.net.state_dict())
    chws = [np.moveaxis(i, 2, 0) if i.ndim == 3 else i[None] for i in images]
    mp = sum(i.shape[0] * i.shape[1] for i in images) / 1e6

    def fast():
        for image in images:
            predict_probability(model, image, cfg.tile_px, cfg.tile_overlap, cfg.tile_batch)

    def plain():
        for chw in chws:
            plain_tiles(ref_net, chw, device)

    t_fast, t_ref = best_times([fast, plain], repeats, device)
    return Figure(
        "infer",
        name,
        "MP/s",
        mp / t_fast,
        mp / t_ref,
        f"{profile} U-Net, {detail}; grainlab tile {cfg.tile_px} px, overlap {cfg.tile_overlap}, "
        + tiles_per_pass(device, cfg.tile_batch)
        + f", {'bf16 autocast' if uses_bf16(device) else 'fp32'}; reference {REFERENCE_TILE} px tiles one at a time, no overlap, fp32, no inference_mode",
        {
            "megapixels": mp,
            "tile_px": cfg.tile_px,
            "tile_overlap": cfg.tile_overlap,
            "tile_batch": cfg.tile_batch,
        },
    )


def infer_figures(
    params: Params,
    profile: str,
    device: torch.device,
    size: int,
    repeats: int,
    real: Path | None,
    real_params: Params | None,
) -> tuple[list[Figure], list[Skipped]]:
    image = np.random.default_rng(0).random((size, size), dtype=np.float32)
    figures = [
        infer_figure(params, profile, device, f"tiled inference {size}x{size}", [image], repeats, "grey")
    ]
    skipped = []
    files = sorted(real.glob("*.png")) if real is not None and real.is_dir() else []
    if real is None:
        skipped.append(
            Skipped("infer", "tiled inference, real micrographs", "not asked for (--real-data none)")
        )
    elif not files:
        skipped.append(
            Skipped("infer", "tiled inference, real micrographs", f"{real}: no such folder or no PNG in it")
        )
    else:
        micrographs = [read_image(f, channels="rgb") for f in files]
        shapes = sorted({f"{m.shape[1]}x{m.shape[0]}" for m in micrographs})
        figures.append(
            infer_figure(
                real_params,
                "tbm-dev",
                device,
                f"tiled inference, {len(files)} real micrographs",
                micrographs,
                repeats,
                f"RGB {', '.join(shapes)} from {real}",
            )
        )
    return figures, skipped
