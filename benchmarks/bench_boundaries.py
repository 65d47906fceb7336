"""Boundary U-Net speed: training images/s at 256 px and tiled inference megapixels/s.

Each figure is printed beside a plain reference loop (batch 1, fp32, one tile at a time)
and the ratio. On CUDA the fast path uses bf16 autocast and channels-last.

    PYTHONPATH=src python benchmarks/bench_boundaries.py [--configs demo paper] [--steps 3] [--image 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from grainlab.boundaries.infer import LoadedModel, pick_device, predict_probability, run_network
from grainlab.boundaries.unet import UNetArgs, build_unet
from grainlab.config import load_params, to_dict


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(args: UNetArgs, device, batch: int, steps: int, fast: bool) -> float:
    """Images/s of forward + backward + Adam step on 256 px crops."""
    net = build_unet(args).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(batch, args.in_channels, 256, 256, device=device)
    y = (torch.rand(batch, 1, 256, 256, device=device) > 0.9).float()
    if fast and device.type == "cuda":
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast and device.type == "cuda"):
            logits = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def reference_tiles(model: LoadedModel, image: np.ndarray, tile: int) -> np.ndarray:
    """The plain loop: each non-overlapping tile alone, fp32, no blending."""
    h, w = image.shape
    out = np.zeros_like(image)
    with torch.inference_mode():
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                t = torch.from_numpy(image[None, None, y : y + tile, x : x + tile]).to(model.device)
                out[y : y + tile, x : x + tile] = torch.sigmoid(model.net.float()(t))[0, 0].cpu().numpy()
    return out


def infer_rates(args: UNetArgs, device, size: int, tile: int, batch: int) -> tuple[float, float]:
    net = build_unet(args).to(device).eval()
    model = LoadedModel(net, device, {}, 0)
    image = np.random.default_rng(0).random((size, size), dtype=np.float32)
    run_network(model, torch.rand(1, 1, tile, tile, device=device))
    start = time.perf_counter()
    predict_probability(model, image, tile=tile, overlap=0.25, batch_size=batch)
    _sync(device)
    fast = size * size / 1e6 / (time.perf_counter() - start)
    start = time.perf_counter()
    reference_tiles(model, image, tile)
    _sync(device)
    ref = size * size / 1e6 / (time.perf_counter() - start)
    return fast, ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "paper"], help="profiles to measure")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--batch", type=int, default=8, help="training / tile batch")
    parser.add_argument("--image", type=int, default=1024, help="inference image side in px")
    parser.add_argument("--params", default="params.yaml")
    opts = parser.parse_args()
    device = pick_device()
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; torch {torch.__version__}")
    for profile in opts.configs:
        params = load_params(opts.params, profile=profile)
        args = UNetArgs(**{**to_dict(params.boundaries.unet), "in_channels": 1})
        fast = train_rate(args, device, opts.batch, opts.steps, True)
        ref = train_rate(args, device, 1, opts.steps, False)
        print(
            f"[{profile}] train 256 px: {fast:8.2f} img/s (batch {opts.batch})  vs reference "
            f"{ref:8.2f} img/s (batch 1 fp32)  x{fast / ref:.2f}"
        )
        tile = params.boundaries.tile_px
        fast, ref = infer_rates(args, device, opts.image, tile, opts.batch)
        print(
            f"[{profile}] tiled inference {opts.image}x{opts.image}: {fast:8.3f} MP/s (tile {tile}, overlap "
            f"0.25, batch {opts.batch})  vs reference {ref:8.3f} MP/s (tile by tile, no overlap)  x{fast / ref:.2f}"
        )


if __name__ == "__main__":
    main()
