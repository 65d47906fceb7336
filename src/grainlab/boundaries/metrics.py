"""How well a tracing matches the truth: boundary pixels, grains, partitions, centroids.

- Boundary pixels: precision / recall / F1 where a pixel counts if it lies within
  `tolerance` px of the other side's boundary; strict pixel Dice and IoU.
- Grains: count error, mean equivalent diameter (relative error), KS and Cramér-von Mises
  two-sample tests on equivalent diameters, Heyn intercept error and ASTM G difference
  (a unit-free difference: -6.643856 log10(l_pred / l_true)).
- Partition: variation of information split (over-segmentation, H(pred|true)) and merge
  (under-segmentation, H(true|pred)), and the adapted Rand error.
- Centroids (Patrick et al. 2023): grains pair up one-to-one if their centroids lie within
  0.3 x the mean nearest-neighbour distance of the true centroids; the normalised
  disregistry is the mean paired distance over that nearest-neighbour distance, the
  orphan fraction the share of grains (both sides) left unpaired.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize, spatial, stats
from skimage.metrics import adapted_rand_error, variation_of_information

from grainlab.boundaries.grains import equivalent_diameters, fill_partition, heyn_intercept


def boundary_scores(pred: np.ndarray, truth: np.ndarray, tolerance: int = 2) -> dict[str, float]:
    """Tolerant precision, recall and F1, and strict Dice and IoU, of two boundary masks."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    near_truth = ndimage.distance_transform_edt(~truth) <= tolerance if truth.any() else np.zeros_like(truth)
    near_pred = ndimage.distance_transform_edt(~pred) <= tolerance if pred.any() else np.zeros_like(pred)
    n_pred, n_truth = pred.sum(), truth.sum()
    precision = float((pred & near_truth).sum() / n_pred) if n_pred else 0.0
    recall = float((truth & near_pred).sum() / n_truth) if n_truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    inter = float((pred & truth).sum())
    union = float((pred | truth).sum())
    return {
        "boundary_precision": precision,
        "boundary_recall": recall,
        "boundary_f1": f1,
        "dice": 2 * inter / (n_pred + n_truth) if n_pred + n_truth else 1.0,
        "iou": inter / union if union else 1.0,
    }


def partition_scores(pred_labels: np.ndarray, true_labels: np.ndarray) -> dict[str, float]:
    """VI (split, merge, total) and adapted Rand error of two grain maps, boundaries filled in."""
    pred, true = fill_partition(pred_labels), fill_partition(true_labels)
    split, merge = variation_of_information(true, pred)
    are, _, _ = adapted_rand_error(true, pred)
    return {
        "vi_split": float(split),
        "vi_merge": float(merge),
        "vi": float(split + merge),
        "adapted_rand": float(are),
    }


def centroids(labels: np.ndarray) -> np.ndarray:
    """(n, 2) row, column centroids of the labels present (ascending, 0 is background)."""
    flat = labels.ravel()
    rows, cols = np.indices(labels.shape)
    count = np.bincount(flat)
    present = np.flatnonzero(count[1:]) + 1
    sums = [np.bincount(flat, coords.ravel().astype(np.float64))[present] for coords in (rows, cols)]
    return np.stack(sums, axis=1) / count[present, None]


def centroid_scores(
    pred_labels: np.ndarray, true_labels: np.ndarray, factor: float = 0.3
) -> dict[str, float]:
    """Centroid matching within factor x the mean nearest-neighbour distance of true centroids."""
    tc, pc = centroids(true_labels), centroids(pred_labels)
    if len(tc) < 2 or len(pc) == 0:
        return {"disregistry": float("nan"), "orphan_fraction": 1.0, "matched": 0.0}
    nn = spatial.cKDTree(tc).query(tc, k=2)[0][:, 1].mean()
    radius = factor * nn
    dist = spatial.distance.cdist(tc, pc)
    cost = np.where(dist <= radius, dist, 1e6)
    rows, cols = optimize.linear_sum_assignment(cost)
    ok = cost[rows, cols] <= radius
    matched = int(ok.sum())
    return {
        "disregistry": float(dist[rows[ok], cols[ok]].mean() / nn) if matched else float("nan"),
        "orphan_fraction": float((len(tc) + len(pc) - 2 * matched) / (len(tc) + len(pc))),
        "matched": float(matched),
    }


def grain_scores(
    pred_tracing: np.ndarray, pred_labels: np.ndarray, true_tracing: np.ndarray, true_labels: np.ndarray
) -> dict[str, float]:
    """Grain count, size distribution and Heyn intercept of a prediction against the truth."""
    dp, dt = equivalent_diameters(pred_labels), equivalent_diameters(true_labels)
    out = {
        "grains_pred": float(len(dp)),
        "grains_true": float(len(dt)),
        "count_error": float((len(dp) - len(dt)) / len(dt)) if len(dt) else float("nan"),
        "mean_diameter_px": float(dp.mean()) if len(dp) else float("nan"),
        "mean_diameter_true_px": float(dt.mean()) if len(dt) else float("nan"),
    }
    out["diameter_error"] = out["mean_diameter_px"] / out["mean_diameter_true_px"] - 1
    if len(dp) >= 2 and len(dt) >= 2:
        out["ks"] = float(stats.ks_2samp(dp, dt).statistic)
        out["cvm"] = float(stats.cramervonmises_2samp(dp, dt).statistic)
    else:
        out["ks"] = out["cvm"] = float("nan")
    lp, lt = heyn_intercept(pred_tracing), heyn_intercept(true_tracing)
    out["heyn_error"] = float(lp / lt - 1) if np.isfinite(lp) and np.isfinite(lt) else float("nan")
    out["astm_g_diff"] = (
        float(-6.643856 * np.log10(lp / lt)) if np.isfinite(out["heyn_error"]) else float("nan")
    )
    return out


def score_tracing(
    pred_tracing: np.ndarray,
    pred_labels: np.ndarray,
    true_tracing: np.ndarray,
    true_labels: np.ndarray,
    tolerance: int = 2,
) -> dict[str, float]:
    """Every metric of one image, as a flat dict of floats."""
    return {
        **boundary_scores(pred_tracing, true_tracing, tolerance),
        **partition_scores(pred_labels, true_labels),
        **centroid_scores(pred_labels, true_labels),
        **grain_scores(pred_tracing, pred_labels, true_tracing, true_labels),
    }


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over images, ignoring NaNs (NaN when all are)."""
    keys = rows[0].keys() if rows else []
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows], dtype=float)
        out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out
