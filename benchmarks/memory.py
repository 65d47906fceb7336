"""Tiled inference of one large image in bounded memory: peak RSS (and peak GPU memory on CUDA).

The measurement runs in a child process (`python -m benchmarks.memory ...`), so the peak
resident set (the child's own VmHWM) is that of the inference alone, not of whatever the
suite did before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import ROOT, Figure, inference_model, tiles_per_pass


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child of a big suite process would report the parent's."""
    return _status_mib("VmHWM")


def measure(params_path: str, profile: str, size: int, device_name: str) -> dict:
    """In this process: predict one size x size grey image, return the memory figures."""
    from grainlab.boundaries.infer import predict_probability
    from grainlab.boundaries.unet import UNetArgs
    from grainlab.config import load_params, to_dict

    params = load_params(params_path, profile=profile)
    cfg = params.boundaries
    device = torch.device(device_name)
    model = inference_model(UNetArgs(**to_dict(cfg.unet)), device)
    tile = min(size, cfg.tile_px)  # warm-up: library kernels and buffers load on the first call
    predict_probability(
        model, np.zeros((tile, tile), np.float32), cfg.tile_px, cfg.tile_overlap, cfg.tile_batch
    )
    image = np.random.default_rng(0).random((size, size), dtype=np.float32)
    before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    prob = predict_probability(model, image, cfg.tile_px, cfg.tile_overlap, cfg.tile_batch)
    seconds = time.perf_counter() - start
    out = {
        "size": size,
        "seconds": seconds,
        "rss_before_mib": before,
        "peak_rss_mib": _peak_rss_mib(),
        "image_mib": image.nbytes / 2**20,
        "output_mib": prob.nbytes / 2**20,
        "tile_px": cfg.tile_px,
        "tile_overlap": cfg.tile_overlap,
        "tile_batch": cfg.tile_batch,
    }
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def memory_figures(params_path: str, profile: str, size: int, device: torch.device) -> list[Figure]:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--params", str(params_path), "--profile", profile]
    cmd += ["--size", str(size), "--device", str(device)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    working = r["peak_rss_mib"] - r["rss_before_mib"]
    detail = (
        f"{profile} U-Net, {size}x{size} grey float32 image ({r['image_mib']:.0f} MiB) -> probability map "
        f"({r['output_mib']:.0f} MiB); tile {r['tile_px']} px, overlap {r['tile_overlap']}, "
        + tiles_per_pass(device, r["tile_batch"])
        + f"; child process, VmHWM; {r['seconds']:.1f} s = {size * size / 1e6 / r['seconds']:.2f} MP/s"
    )
    figures = [
        Figure(
            "memory", f"peak RSS, {size}x{size} inference", "MiB", r["peak_rss_mib"], detail=detail, extra=r
        ),
        Figure(
            "memory",
            f"inference working set, {size}x{size}",
            "MiB",
            working,
            detail="peak RSS minus RSS before the call (model and input image loaded); includes the output map",
        ),
    ]
    if "peak_gpu_mib" in r:
        figures.append(
            Figure(
                "memory", f"peak GPU memory, {size}x{size} inference", "MiB", r["peak_gpu_mib"], detail=detail
            )
        )
    return figures


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(json.dumps(measure(args.params, args.profile, args.size, args.device)))


if __name__ == "__main__":
    main()
