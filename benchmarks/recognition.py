"""Recognition: crops/s and the time to classify one 1000x1200 micrograph from 1000 crops.

grainlab: `Recognizer.predict` (crops cut and resampled, then run through the network and
the GMMs `recognition.batch_size` at a time, in inference mode). The plain reference: the
same crops one at a time. The trained quiz-1 model is used when present (speed does not
depend on the weights), else a freshly initialised one with the profile's settings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Figure, best_times
from grainlab.config import Params, to_dict
from grainlab.recognition.model import TripletNet
from grainlab.recognition.openset import OpenSetGMM
from grainlab.recognition.predict import Recognizer, pick_device
from grainlab.recognition.train import network_args
from grainlab.synth import micro


def fresh_recognizer(params: Params) -> Recognizer:
    cfg = params.recognition
    torch.manual_seed(params.seed)
    args = network_args(cfg)
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
    nets = [TripletNet(**args) for _ in range(cfg.members)]
    return Recognizer(nets, [gmm] * cfg.members, meta, pick_device(cfg.device))


def recognition_figures(
    params: Params, profile: str, crops: int, ref_crops: int, shape: tuple[int, int], repeats: int
) -> list[Figure]:
    cfg = params.recognition
    model_dir = Path(cfg.out_dir) / "quiz1"
    trained = profile == "demo" and (model_dir / "model.pt").is_file()  # outputs hold the demo's models
    rec = Recognizer.load(model_dir, cfg.device) if trained else fresh_recognizer(params)
    img = micro.render("ferrite-pearlite", shape, 20.0, "sem", np.random.default_rng(0))
    batch = cfg.batch_size
    (t_fast,) = best_times(
        [lambda: rec.predict(img, 20.0, n_crops=crops, batch_size=batch)], repeats, rec.device
    )
    rec.predict(img, 20.0, n_crops=min(ref_crops, 4), batch_size=1)  # warm-up
    start = time.perf_counter()
    rec.predict(img, 20.0, n_crops=ref_crops, batch_size=1)
    t_ref = (time.perf_counter() - start) / ref_crops * crops
    where = (
        f"{profile}, {'trained ' + str(model_dir) if trained else 'fresh (untrained) network'}, "
        f"{shape[1]}x{shape[0]} image, {crops} crops of {cfg.crop_min_px}-{cfg.crop_max_px} px resampled to "
        f"{cfg.crop_px} px; grainlab batch {batch}; reference one crop at a time"
        + (f" (timed on {ref_crops} crops, scaled)" if ref_crops != crops else "")
    )
    return [
        Figure(
            "recognition", f"recognition {profile} crops/s", "crops/s", crops / t_fast, crops / t_ref, where
        ),
        Figure(
            "recognition",
            f"classify one image {profile}, {crops} crops",
            "images/s",
            1 / t_fast,
            1 / t_ref,
            f"seconds per image: grainlab {t_fast:.2f} s, reference {t_ref:.2f} s",
            {"seconds": t_fast, "reference_seconds": t_ref},
        ),
    ]
