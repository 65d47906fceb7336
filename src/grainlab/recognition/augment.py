"""Materials-aware augmentation of training crops (albumentations plus dust), and the edge channel."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from grainlab.config import CropAugmentConfig


class Dust(A.ImageOnlyTransform):
    """A few soft dark or bright blobs, like dust on the lens or specimen."""

    def __init__(self, max_blobs: int = 3, p: float = 0.5):
        super().__init__(p=p)
        self.max_blobs = max_blobs

    def apply(self, img, **params):
        rng = self.random_generator
        h, w = img.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        out = img.astype(np.float32, copy=True)
        for _ in range(rng.integers(1, self.max_blobs + 1)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.04, 0.15) * min(h, w)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            out += rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.4) * blob
        return np.clip(out, 0, 1)


def build_augmenter(cfg: CropAugmentConfig, seed: int) -> A.Compose:
    """Rotations, mirroring, brightness/contrast, dust, elastic or grid warping, noise."""
    reflect = cv2.BORDER_REFLECT_101
    return A.Compose(
        [
            A.Affine(rotate=(-180, 180), border_mode=reflect, p=cfg.rotate_prob),
            A.HorizontalFlip(p=cfg.flip_prob),
            A.VerticalFlip(p=cfg.flip_prob),
            A.RandomBrightnessContrast(cfg.brightness_contrast, cfg.brightness_contrast, p=0.8),
            Dust(p=cfg.dust_prob),
            A.OneOf(
                [
                    A.ElasticTransform(alpha=20, sigma=6, border_mode=reflect),
                    A.GridDistortion(distort_limit=(-0.2, 0.2), border_mode=reflect),
                ],
                p=cfg.warp_prob,
            ),
            A.GaussNoise(std_range=(0.01, 0.05), p=cfg.noise_prob),
        ],
        seed=seed,
    )


def augment(crops: np.ndarray, augmenter: A.Compose) -> np.ndarray:
    return np.stack([np.clip(augmenter(image=c)["image"], 0, 1) for c in crops]).astype(np.float32)
