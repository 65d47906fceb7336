"""Time `grainlab data synth` for all recipes plus the test set (demo profile by default).

    python benchmarks/bench_synth.py [--profile demo] [--workers 2]

Prints the wall time, pairs/s and the per-call cost of the generator's three steps.
Goal (issue 2): the whole demo synthesis in under 60 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from grainlab.config import load_params
from grainlab.datasets.recipes import build_tem_datasets
from grainlab.synth import tem

ROOT = Path(__file__).resolve().parents[1]


def time_steps(params, repeats: int = 5) -> dict[str, float]:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    regions = [tem.make_region(params.tem, rng) for _ in range(repeats)]
    t1 = time.perf_counter()
    shots = [tem.render(r, params.tem, 10.0, 5.0, rng) for r in regions]
    t2 = time.perf_counter()
    for r, (_, visible) in zip(regions, shots, strict=True):
        tem.trace(r, visible, params.tracers["careful"], rng)
    t3 = time.perf_counter()
    return {
        "make_region_s": (t1 - t0) / repeats,
        "render_s": (t2 - t1) / repeats,
        "trace_s": (t3 - t2) / repeats,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml", profile=args.profile)
    workers = args.workers or params.data.workers

    steps = time_steps(params)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        counts = build_tem_datasets(params, Path(tmp), workers=workers, progress=False)
        wall = time.perf_counter() - start
    pairs = sum(counts.values())
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"profile {args.profile}, {params.tem.image_px} px, workers {workers}")
    for k, v in steps.items():
        print(f"  {k:<14} {v * 1000:8.1f} ms")
    print(
        f"synth all recipes + test set: {pairs} pairs in {wall:.1f} s = {pairs / wall:.1f} pairs/s "
        f"(goal < 60 s in demo)"
    )


if __name__ == "__main__":
    main()
