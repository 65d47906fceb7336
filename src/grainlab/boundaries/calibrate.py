"""Post-processing calibrated on validation images, never picked by hand.

At the end of training (`train.train_boundaries`) the model's probability maps of the
validation split (whole sources the network did not train on) are turned into tracings with
every candidate setting below, and the candidate with the highest mean boundary F1
(tolerance boundaries.tolerance_px, skeleton against skeleton) wins (with
boundaries.calibrate_objective = f1_heyn: the highest F1 minus the |Heyn intercept error|):

    method 'skeleton': hysteresis low x high (low < high), dilate_px, spur_px
    method 'watershed': smooth_px x marker_depth

min_grain_px does not change the tracing, so it is chosen second, on the same images: the
value with the smallest mean |grain count error|. The other settings (min_hole_px,
drop_edge_grains, border_px) stay as the params give them. The winners are stored in the
checkpoint under "postprocess" and `trace`, `evaluate` and serving use them unless
boundaries.postprocess_from = params.

The truth is the same for every candidate: the skeleton of the hand tracing (`truth_maps`),
so a wide anti-aliased hand line counts once, along its centre.

The classical baseline is calibrated the same way (`calibrate_baseline`): its smoothing,
marker percentile and minimum grain, on training images only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import numpy as np
from scipy import ndimage
from skimage import filters, morphology

from grainlab.boundaries.baseline import trace_classical
from grainlab.boundaries.grains import (
    Postprocess,
    heyn_counts,
    ignore_border,
    label_grains,
    prune_spurs,
    trace_boundaries,
)
from grainlab.images import parallel_map

LOWS = (0.1, 0.2, 0.3, 0.4, 0.5)
HIGHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DILATES = (0, 1, 2)
SPURS = (0, 10, 25)
SMOOTHS = (1.0, 2.0, 3.0)
MARKER_DEPTHS = (0.01, 0.03, 0.1)
MIN_GRAINS = (0, 10, 20, 50, 100)

# the hand tracing's centre line: a binary mask needs no threshold search, and no spur is cut
TRUTH_POST = Postprocess(method="skeleton", low=0.5, high=0.5, dilate_px=0, min_hole_px=16, spur_px=0)

BASELINE_SIGMAS = (1.0, 2.0, 3.0, 4.0)
BASELINE_PERCENTILES = (10.0, 20.0, 30.0, 45.0)


def truth_maps(masks: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(one-pixel tracing, grain map) of each hand tracing, with the fixed TRUTH_POST."""

    def truth(mask):
        tracing = trace_boundaries(np.asarray(mask, dtype=np.float32), TRUTH_POST)
        return tracing, label_grains(tracing, TRUTH_POST)

    return parallel_map(truth, list(masks))


def _skeleton_tracings(prob: np.ndarray, base: Postprocess) -> dict[tuple, np.ndarray]:
    """Every skeleton candidate's tracing of one map, sharing the steps candidates have in common."""
    prob = ignore_border(prob, base.border_px)
    out = {}
    for low, high in itertools.product(LOWS, HIGHS):
        if low >= high:
            continue
        mask = filters.apply_hysteresis_threshold(prob, low, high)
        for dilate in DILATES:
            m = ndimage.binary_dilation(mask, morphology.disk(dilate)) if dilate > 0 else mask
            if base.min_hole_px > 0:
                m = morphology.remove_small_holes(m, max_size=base.min_hole_px)
            skeleton = morphology.skeletonize(np.pad(m, 1, constant_values=True))[1:-1, 1:-1]
            for spur in SPURS:
                out[("skeleton", low, high, dilate, spur)] = prune_spurs(skeleton, spur)
    return out


def candidates(base: Postprocess) -> list[tuple[tuple, Postprocess]]:
    """(key, settings) of every candidate, built on `base` (which keeps the settings not searched)."""
    out = []
    for low, high in itertools.product(LOWS, HIGHS):
        if low >= high:
            continue
        for dilate, spur in itertools.product(DILATES, SPURS):
            out.append(
                (
                    ("skeleton", low, high, dilate, spur),
                    replace(base, method="skeleton", low=low, high=high, dilate_px=dilate, spur_px=spur),
                )
            )
    for smooth, depth in itertools.product(SMOOTHS, MARKER_DEPTHS):
        out.append(
            (
                ("watershed", smooth, depth),
                replace(base, method="watershed", smooth_px=smooth, marker_depth=depth),
            )
        )
    return out


def _near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within `tolerance` px (Euclidean) of the mask: a dilation by a disk, the same set as
    metrics.boundary_scores takes from a distance transform, in a fraction of its time."""
    if tolerance <= 0:
        return mask
    return ndimage.binary_dilation(mask, morphology.disk(tolerance))


def fast_f1(pred: np.ndarray, truth: np.ndarray, near_truth: np.ndarray, tolerance: int) -> float:
    """metrics.boundary_scores' F1, with the truth's neighbourhood computed once per image."""
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    if not n_pred or not n_truth:
        return 0.0
    precision = (pred & near_truth).sum() / n_pred
    recall = (truth & _near(pred, tolerance)).sum() / n_truth
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def _count_error(labels: np.ndarray, truth_labels: np.ndarray) -> float:
    n_true = int(truth_labels.max())
    return abs(int(labels.max()) - n_true) / max(n_true, 1)


def choose_min_grain(
    tracings: Sequence[np.ndarray], truths: Sequence[tuple[np.ndarray, np.ndarray]], post: Postprocess
) -> tuple[int, float]:
    """(min_grain_px, mean |grain count error|): the candidate with the smallest error."""
    best = None
    for size in MIN_GRAINS:
        p = replace(post, min_grain_px=size)
        err = float(
            np.mean(
                [_count_error(label_grains(t, p), tl) for t, (_, tl) in zip(tracings, truths, strict=True)]
            )
        )
        if best is None or err < best[1] - 1e-12:
            best = (size, err)
    return best


OBJECTIVES = ("f1", "f1_heyn")


def calibrate_postprocess(
    probabilities: Sequence[np.ndarray],
    truths: Sequence[tuple[np.ndarray, np.ndarray]],
    base: Postprocess,
    tolerance: int = 2,
    objective: str = "f1",
) -> tuple[Postprocess, dict]:
    """The settings with the best objective on these maps (then min_grain_px by grain count);
    returns them and a report (the winner's F1, Heyn and count errors, candidates tried).

    objective 'f1': the highest mean boundary F1. 'f1_heyn': the highest mean boundary F1
    minus the |relative error| of the Heyn mean intercept pooled over the images (grain size
    counts as much as tracing). Ties go to the first candidate in `candidates` order."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}")
    probabilities = list(probabilities)
    truth_lines = [t for t, _ in truths]

    def per_image(i):
        prob, truth = probabilities[i], truth_lines[i]
        near_truth = _near(truth, tolerance)
        traced = dict(_skeleton_tracings(prob, base))
        for key, post in candidates(base):
            if key[0] == "watershed":
                traced[key] = trace_boundaries(prob, post)
        return {key: (fast_f1(t, truth, near_truth, tolerance), heyn_counts(t)) for key, t in traced.items()}

    scores = parallel_map(per_image, list(range(len(probabilities))))
    true_length, true_cross = np.sum([heyn_counts(t) for t in truth_lines], axis=0)
    options = candidates(base)
    mean_f1, heyn = {}, {}
    for key, _ in options:
        mean_f1[key] = float(np.mean([s[key][0] for s in scores]))
        length, cross = np.sum([s[key][1] for s in scores], axis=0)
        heyn[key] = (
            (length / cross) / (true_length / true_cross) - 1 if cross and true_cross else float("inf")
        )

    def value(key):
        return mean_f1[key] - (abs(heyn[key]) if objective == "f1_heyn" else 0.0)

    best_key, best = max(options, key=lambda kv: value(kv[0]))  # max keeps the first of equals
    tracings = parallel_map(lambda p: trace_boundaries(p, best), probabilities)
    min_grain, count_error = choose_min_grain(tracings, truths, best)
    best = replace(best, min_grain_px=min_grain)
    report = {
        "boundary_f1": mean_f1[best_key],
        "heyn_error": float(heyn[best_key]),
        "count_error": count_error,
        "candidates": len(options),
        "images": len(probabilities),
    }
    return best, report


def postprocess_dict(post: Postprocess) -> dict:
    return asdict(post)


def calibrate_baseline(
    images: Sequence[np.ndarray],
    truths: Sequence[tuple[np.ndarray, np.ndarray]],
    tolerance: int = 2,
    min_marker_px: int = 20,
) -> tuple[dict, dict]:
    """The classical baseline's (sigma, marker_percentile, min_grain_px) with the highest mean
    boundary F1 (min_grain_px then by grain count) on these images; (settings, report)."""
    grid = list(itertools.product(BASELINE_SIGMAS, BASELINE_PERCENTILES))
    images = list(images)

    def per_image(i):
        truth = truths[i][0]
        near_truth = _near(truth, tolerance)
        return [
            fast_f1(trace_classical(images[i], s, p, min_marker_px)[1], truth, near_truth, tolerance)
            for s, p in grid
        ]

    scores = np.array(parallel_map(per_image, list(range(len(images)))))
    best = int(np.argmax(scores.mean(axis=0)))
    sigma, percentile = grid[best]
    tracings = parallel_map(lambda im: trace_classical(im, sigma, percentile, min_marker_px)[1], images)
    min_grain, count_error = choose_min_grain(tracings, truths, Postprocess())
    settings = {
        "sigma": sigma,
        "marker_percentile": percentile,
        "min_marker_px": min_marker_px,
        "min_grain_px": min_grain,
    }
    return settings, {
        "boundary_f1": float(scores.mean(axis=0)[best]),
        "count_error": count_error,
        "candidates": len(grid),
        "images": len(images),
    }


def baseline_trace(settings: dict) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """image -> (tracing, grains) of the classical baseline with calibrated settings."""
    post = Postprocess(min_grain_px=int(settings.get("min_grain_px", 20)))

    def trace(image):
        _, tracing = trace_classical(
            image,
            float(settings.get("sigma", 2.0)),
            float(settings.get("marker_percentile", 30.0)),
            int(settings.get("min_marker_px", 20)),
        )
        return tracing, label_grains(tracing, post)

    return trace
