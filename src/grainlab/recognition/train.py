"""Training: class-balanced batches of augmented crops, the triplet loss, then the open-set GMMs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grainlab.config import RecognitionConfig, to_dict
from grainlab.datasets.microstructures import load_manifest, select
from grainlab.errors import GrainlabError
from grainlab.images import read_image
from grainlab.recognition.augment import augment, build_augmenter
from grainlab.recognition.crops import check_size, crop_magnification, resample, sample_boxes, to_channels
from grainlab.recognition.model import TripletNet, log_magnification, triplet_loss
from grainlab.recognition.openset import OpenSetGMM, fit_gmm
from grainlab.recognition.predict import Recognizer, pick_device


@dataclass
class LabelledImages:
    """The images of one task and split, with their magnification and class index."""

    images: list[np.ndarray]
    px_per_um: np.ndarray
    labels: np.ndarray
    classes: list[str]
    entries: list[dict]

    def subset(self, ids) -> LabelledImages:
        """The listed images only (same classes)."""
        return LabelledImages(
            [self.images[i] for i in ids],
            self.px_per_um[ids],
            self.labels[ids],
            self.classes,
            [self.entries[i] for i in ids],
        )


def load_images(library_dir: Path, task: str, split: str) -> LabelledImages:
    """Read a task's images from the library; unknown-class images get the label -1."""
    library_dir = Path(library_dir)
    manifest = load_manifest(library_dir)
    if task not in manifest["tasks"]:
        raise GrainlabError(
            f"{library_dir / 'manifest.json'}: no task {task!r}; expected one of {sorted(manifest['tasks'])}"
        )
    classes = manifest["tasks"][task]["classes"]
    entries = select(manifest, task, split)
    if not entries:
        raise GrainlabError(
            f"{library_dir}: no {split} images for task {task!r}; run `grainlab data synth` again"
        )
    images = [read_image(library_dir / e["file"]) for e in entries]
    labels = np.array([classes.index(e["class"]) if e["class"] in classes else -1 for e in entries])
    mags = np.array([e["px_per_um"] for e in entries], float)
    return LabelledImages(images, mags, labels, classes, entries)


def sample_crops(
    data: LabelledImages, image_ids: np.ndarray, cfg: RecognitionConfig, rng: np.random.Generator
):
    """One random crop from each listed image: (crops, crop px/um)."""
    crops = np.empty((len(image_ids), cfg.crop_px, cfg.crop_px), np.float32)
    mags = np.empty(len(image_ids), np.float32)
    for i, k in enumerate(image_ids):
        img = data.images[k]
        box = sample_boxes(rng, img.shape, 1, cfg.crop_min_px, cfg.crop_max_px)
        crops[i] = resample(img, box[0], cfg.crop_px)
        mags[i] = crop_magnification(data.px_per_um[k], box, cfg.crop_px)[0]
    return crops, mags


def network_args(cfg: RecognitionConfig) -> dict:
    return {
        "in_channels": 2 if cfg.edge_channel else 1,
        "widths": list(cfg.widths),
        "descriptor_dim": cfg.descriptor_dim,
        "use_magnification": cfg.use_magnification,
        "magnification_mode": cfg.magnification_mode,
    }


def train_recognizer(cfg: RecognitionConfig, data: LabelledImages, seed: int, on_epoch=None) -> Recognizer:
    """Train `cfg.members` networks (member m from seed + m) and fit each one's GMMs.

    With `cfg.holdout_fraction` > 0, that share of each class's images is held out from the
    networks and GMMs, and picks the GMM component count and "none" percentile
    (`recognition.select`); the choice is in the returned recognizer's `selection`.
    on_epoch(step, metrics) is called after each epoch; steps run on across the members."""
    from grainlab.recognition.select import holdout_split, select_open_set

    for e, img in zip(data.entries, data.images, strict=True):
        check_size(img.shape, cfg.crop_min_px, e["file"])
    device = pick_device(cfg.device)
    select = cfg.holdout_fraction > 0
    fit_ids, val_ids = (
        holdout_split(data.labels, len(data.classes), cfg.holdout_fraction, seed)
        if select
        else (np.arange(len(data.images)), None)
    )
    fit = data.subset(fit_ids)
    meta = _meta(network_args(cfg), cfg, fit)
    nets, gmms, crops = [], [], []
    for m in range(cfg.members):
        report = None
        if on_epoch is not None:

            def report(epoch, metrics, m=m):
                on_epoch(m * cfg.epochs + epoch, {**metrics, "train/member": m})

        net = train_network(cfg, fit, seed + m, device, report)
        nets.append(net)
        if select:
            crops.append(open_set_crops(Recognizer([net], [], meta, device), fit, cfg, seed + m))
        else:
            gmms.append(fit_open_set(Recognizer([net], [], meta, device), fit, cfg, seed + m))
    if not select:
        return Recognizer(nets, gmms, meta, device)
    recognizer = Recognizer(nets, [], meta, device)
    start = time.perf_counter()
    gmms, record = select_open_set(recognizer, data, val_ids, crops, cfg, seed)
    recognizer.gmms = gmms
    recognizer.selection = record
    recognizer.selection_seconds = time.perf_counter() - start  # MLflow only: gmm.json stays reproducible
    return recognizer


def train_network(
    cfg: RecognitionConfig, data: LabelledImages, seed: int, device, on_epoch=None
) -> TripletNet:
    """One triplet network trained on class-balanced batches of augmented crops."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    net = TripletNet(**network_args(cfg)).to(device)
    augmenter = build_augmenter(cfg.augment, seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch)
    by_class = [np.flatnonzero(data.labels == k) for k in range(len(data.classes))]
    labels = torch.arange(len(data.classes)).repeat_interleave(cfg.crops_per_class).to(device)
    for epoch in range(cfg.epochs):
        start, losses, active = time.perf_counter(), [], []
        net.train()
        for _ in range(cfg.steps_per_epoch):
            ids = np.concatenate([rng.choice(ids, cfg.crops_per_class) for ids in by_class])
            crops, mags = sample_crops(data, ids, cfg, rng)
            x = to_channels(torch.from_numpy(augment(crops, augmenter)).to(device), cfg.edge_channel)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                z = net(x, log_magnification(mags).to(device)).float()
            loss, frac = triplet_loss(z, labels, cfg.margin, cfg.mining)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            active.append(frac.item())
        if on_epoch is not None:
            on_epoch(
                epoch,
                {
                    "train/triplet_loss": float(np.mean(losses)),
                    "train/active_triplets": float(np.mean(active)),
                    "train/epoch_seconds": time.perf_counter() - start,
                },
            )
    return net.eval()


def open_set_crops(recognizer: Recognizer, data: LabelledImages, cfg: RecognitionConfig, seed: int) -> dict:
    """Descriptors (of the recognizer's first network) and labels of un-augmented training crops:
    "fit" for the GMMs, "calibration" (other crops of the same images) for the "none" threshold."""

    def crop_descriptors(rng_key: int):
        rng = np.random.default_rng([seed, rng_key])
        ids = np.repeat(np.arange(len(data.images)), cfg.gmm_crops_per_image)
        crops, mags = sample_crops(data, ids, cfg, rng)
        z = np.concatenate(
            [recognizer.descriptors(crops[i : i + 256], mags[i : i + 256]) for i in range(0, len(ids), 256)]
        )
        return z, data.labels[ids]

    return {"fit": crop_descriptors(4), "calibration": crop_descriptors(5)}


def fit_open_set(
    recognizer: Recognizer, data: LabelledImages, cfg: RecognitionConfig, seed: int
) -> OpenSetGMM:
    """One GaussianMixture per class on descriptors of un-augmented training crops (of the
    recognizer's first network); the "none" threshold from a percentile of the likelihoods of a
    second, held-out set of crops."""
    crops = open_set_crops(recognizer, data, cfg, seed)
    calibration = crops["calibration"] if cfg.none_threshold is None else None
    return fit_gmm(
        *crops["fit"],
        data.classes,
        cfg.gmm_components,
        cfg.none_percentile,
        cfg.none_threshold,
        seed,
        calibration,
    )


def _meta(args: dict, cfg: RecognitionConfig, data: LabelledImages) -> dict:
    """What model.pt holds besides the weights: plain values only (torch.load with weights_only=True)."""
    return {
        "model_args": args,
        "classes": list(data.classes),
        "px_per_um_range": [float(data.px_per_um.min()), float(data.px_per_um.max())],
        "crop_px": cfg.crop_px,
        "crop_min_px": cfg.crop_min_px,
        "crop_max_px": cfg.crop_max_px,
        "edge_channel": cfg.edge_channel,
        "params": to_dict(cfg),
    }
