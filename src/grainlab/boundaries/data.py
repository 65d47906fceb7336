"""Training samples: random, augmented crops drawn reproducibly.

`CropSampler` draws, for each epoch, which image each sample comes from and a seed for
that sample, from its own torch generator. The dataset makes the crop position and every
augmentation from that seed alone, so a run gives the same batches with any number of
DataLoader workers, and saving the sampler's generator state is enough to resume.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from grainlab.boundaries.infer import to_channels
from grainlab.config import AugmentConfig
from grainlab.datasets.folder import Pair
from grainlab.errors import GrainlabError
from grainlab.images import parallel_map, read_image, read_mask


def build_augmentation(cfg: AugmentConfig) -> A.Compose:
    """Flips, 90-degree rotations, brightness/contrast, blur, noise and elastic warps."""
    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.flip),
            A.VerticalFlip(p=cfg.flip),
            A.RandomRotate90(p=cfg.rotate90),
            A.RandomBrightnessContrast(0.15, 0.15, p=cfg.brightness_contrast),
            A.GaussianBlur(blur_limit=(3, 5), p=cfg.blur),
            A.GaussNoise(std_range=(0.01, 0.06), p=cfg.noise),
            A.ElasticTransform(alpha=20, sigma=6, p=cfg.elastic),
        ]
    )


def load_pairs(pairs: list[Pair], channels: int, max_pixels: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read every (image, tracing) pair once, in threads: images as (C, H, W) float16, tracings as bool."""

    def load(p: Pair):
        image = read_image(p.image, channels="rgb" if channels == 3 else "grey", max_pixels=max_pixels)
        mask = read_mask(p.label, max_pixels=max_pixels)
        if mask.shape != image.shape[:2]:
            raise GrainlabError(
                f"{p.label}: tracing is {mask.shape}, but its image {p.image} is {image.shape[:2]}"
            )
        return to_channels(image, channels).astype(np.float16), mask

    return parallel_map(load, pairs)


class CropSampler(Sampler):
    """Yields (pair index, sample seed) tuples; its generator is the whole data order.

    Under torchrun each of the `world` processes draws the same order and keeps its share of
    every global batch of `batch_size`: process `rank` the rank-th of `world` equal consecutive
    parts, the part `cpu_parallel.SplitBatch` gives its rank-th thread (one process: all of it).
    The caller sees that batch_size and the samples per epoch are multiples of world."""

    def __init__(
        self,
        n_pairs: int,
        samples_per_epoch: int,
        seed: int,
        batch_size: int = 1,
        rank: int = 0,
        world: int = 1,
    ):
        self.n_pairs = n_pairs
        self.n_samples = samples_per_epoch or n_pairs
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def __len__(self):
        return self.n_samples // self.world

    def __iter__(self):
        if self.n_samples == self.n_pairs:
            index = torch.randperm(self.n_pairs, generator=self.generator)
        else:
            index = torch.randint(self.n_pairs, (self.n_samples,), generator=self.generator)
        seeds = torch.randint(2**31 - 1, (self.n_samples,), generator=self.generator)
        keys = list(zip(index.tolist(), seeds.tolist(), strict=False))
        mine = []
        for start in range(0, self.n_samples, self.batch_size):
            batch = keys[start : start + self.batch_size]
            part = len(batch) // self.world
            mine += batch[self.rank * part : (self.rank + 1) * part]
        return iter(mine)


class CropDataset(Dataset):
    """Random crop_px crops of the loaded pairs, augmented; indexed by (pair, seed)."""

    def __init__(self, samples: list[tuple[np.ndarray, np.ndarray]], crop_px: int, augment: A.Compose | None):
        self.samples, self.crop_px, self.augment = samples, crop_px, augment

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        image, mask = self.samples[index]
        rng = np.random.default_rng(seed)
        c = self.crop_px
        _, h, w = image.shape
        if h < c or w < c:
            pad = ((0, max(c - h, 0)), (0, max(c - w, 0)))
            image = np.pad(image, ((0, 0), *pad), mode="symmetric")
            mask = np.pad(mask, pad, mode="symmetric")
            _, h, w = image.shape
        y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
        crop = np.moveaxis(image[:, y : y + c, x : x + c].astype(np.float32), 0, 2)
        target = mask[y : y + c, x : x + c].astype(np.uint8)
        if self.augment is not None:
            self.augment.set_random_seed(int(seed))
            out = self.augment(image=crop, mask=target)
            crop, target = np.clip(out["image"], 0, 1), out["mask"]
        x_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(crop, 2, 0), dtype=np.float32))
        y_t = torch.from_numpy(np.ascontiguousarray(target[None], dtype=np.float32))
        return x_t, y_t
