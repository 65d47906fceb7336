"""Speed of crop-averaged recognition: one 1000x1200 micrograph with 1000 crops.

Batched prediction (Recognizer.predict) side by side with a plain loop of one crop at a
time, and the ratio. Uses the trained quiz-1 model when present (speed does not depend on
the weights), else a freshly initialised one with the demo settings.

    PYTHONPATH=src python benchmarks/bench_recognition.py [--model outputs/recognition/quiz1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from grainlab.config import RecognitionConfig, to_dict
from grainlab.recognition.openset import OpenSetGMM
from grainlab.recognition.predict import Recognizer, pick_device
from grainlab.recognition.train import build_network
from grainlab.synth import micro


def fresh_recognizer(cfg: RecognitionConfig) -> Recognizer:
    net, args = build_network(cfg)
    k, d = 5, cfg.descriptor_dim
    gmm = OpenSetGMM(
        [f"c{i}" for i in range(k)], [[1.0]] * k, np.eye(k, d)[:, None] * 3, [np.eye(d)[None]] * k, -5.0
    )
    meta = {
        "model_args": args,
        "px_per_um_range": [1.0, 200.0],
        "params": to_dict(cfg),
        "crop_px": cfg.crop_px,
        "crop_min_px": cfg.crop_min_px,
        "crop_max_px": cfg.crop_max_px,
        "edge_channel": cfg.edge_channel,
    }
    return Recognizer(net, gmm, meta, pick_device(cfg.device))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="outputs/recognition/quiz1")
    ap.add_argument("--crops", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = RecognitionConfig()
    model = Path(args.model)
    rec = Recognizer.load(model) if (model / "model.pt").is_file() else fresh_recognizer(cfg)
    img = micro.render("ferrite-pearlite", (1000, 1200), 20.0, "optical", np.random.default_rng(0))
    print(
        f"device {rec.device}, torch threads {torch.get_num_threads()}, crop {rec.crop_px} px, "
        f"model {'trained: ' + str(model) if (model / 'model.pt').is_file() else 'fresh (untrained)'}"
    )

    rec.predict(img, 20.0, n_crops=args.batch, batch_size=args.batch)  # warm-up
    batched = []
    for r in range(args.repeats):
        start = time.perf_counter()
        rec.predict(img, 20.0, n_crops=args.crops, batch_size=args.batch, seed=r)
        batched.append(time.perf_counter() - start)
    start = time.perf_counter()
    rec.predict(img, 20.0, n_crops=args.crops, batch_size=1)
    loop = time.perf_counter() - start

    best = min(batched)
    print(
        f"batched ({args.batch}/batch): {best:.2f} s per image of {args.crops} crops "
        f"(median {np.median(batched):.2f} s), {args.crops / best:.0f} crops/s"
    )
    print(f"per-crop loop:        {loop:.2f} s per image, {args.crops / loop:.0f} crops/s")
    print(f"speed-up of batching: {loop / best:.1f}x; goal < 5 s on the 2-core CPU, < 0.3 s on one H100")


if __name__ == "__main__":
    main()
