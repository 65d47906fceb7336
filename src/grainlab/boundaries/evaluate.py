"""Score a model, or the classical baseline: on a test set with exact truth, or on the
validation regions of a hand-traced dataset (e.g. tbm-dev, split by source id)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from grainlab.boundaries.baseline import trace_classical
from grainlab.boundaries.grains import Postprocess, heyn_intercept, label_grains, trace_boundaries
from grainlab.boundaries.infer import LoadedModel, predict_probability, predict_probability_dihedral
from grainlab.boundaries.metrics import boundary_scores, mean_scores, score_tracing
from grainlab.config import BoundaryConfig, to_dict
from grainlab.datasets.folder import TestItem
from grainlab.images import parallel_map, read_image, read_labels, read_mask


@dataclass(frozen=True)
class Tracing:
    """What a tracer made of one image."""

    probability: np.ndarray
    tracing: np.ndarray
    grains: np.ndarray


def postprocess_settings(cfg: BoundaryConfig) -> Postprocess:
    return Postprocess(**to_dict(cfg.postprocess))


def postprocess_source(model: LoadedModel, cfg: BoundaryConfig) -> str:
    """Where the model's post-processing comes from: 'checkpoint' (calibrated in training) when
    boundaries.postprocess_from says so and the checkpoint has them, else 'params'."""
    return "checkpoint" if cfg.postprocess_from == "checkpoint" and model.postprocess else "params"


def model_postprocess(model: LoadedModel, cfg: BoundaryConfig) -> Postprocess:
    """The post-processing settings a model traces with (see `postprocess_source`)."""
    if postprocess_source(model, cfg) == "checkpoint":
        known = set(Postprocess.__dataclass_fields__)
        return Postprocess(**{k: v for k, v in model.postprocess.items() if k in known})
    return postprocess_settings(cfg)


def model_probability(model: LoadedModel, image: np.ndarray, cfg: BoundaryConfig) -> np.ndarray:
    """The boundary probability map, with dihedral test-time augmentation when boundaries.tta."""
    predict = predict_probability_dihedral if cfg.tta else predict_probability
    return predict(model, image, cfg.tile_px, cfg.tile_overlap, cfg.tile_batch)


def model_tracer(
    model: LoadedModel, cfg: BoundaryConfig, post: Postprocess | None = None
) -> Callable[[np.ndarray], Tracing]:
    """Image -> Tracing with the model; post-processing `post`, by default `model_postprocess`."""
    post = post or model_postprocess(model, cfg)

    def trace(image):
        prob = model_probability(model, image, cfg)
        tracing = trace_boundaries(prob, post)
        return Tracing(prob, tracing, label_grains(tracing, post))

    return trace


def baseline_tracer(cfg: BoundaryConfig) -> Callable[[np.ndarray], Tracing]:
    post = postprocess_settings(cfg)

    def trace(image):
        gradient, tracing = trace_classical(image)
        return Tracing(gradient, tracing, label_grains(tracing, post))

    return trace


VISIBLE = "visible/"  # key prefix of the scores against the boundaries visible at the image's tilt
VISIBLE_METRICS = ("boundary_precision", "boundary_recall", "boundary_f1")


def score_result(item: TestItem, result: Tracing, tolerance: int) -> dict:
    """One image's row: its name, every metric against the full truth (the whole boundary network
    and its grains), and, where the item has them, boundary precision, recall and F1 against the
    boundaries visible at its tilt (keys `visible/...`). Grain and partition metrics are not scored
    against the visible boundaries: they do not close into grains."""
    truth = read_mask(item.boundaries)
    row = {
        "image": item.name,
        **score_tracing(result.tracing, result.grains, truth, read_labels(item.grains), tolerance),
    }
    if item.visible is not None:
        visible = boundary_scores(result.tracing, read_mask(item.visible), tolerance)
        row.update({VISIBLE + k: visible[k] for k in VISIBLE_METRICS})
    return row


def score_items(
    tracer: Callable[[np.ndarray], Tracing],
    items: list[TestItem],
    channels: str,
    tolerance: int,
    on_traced: Callable[[TestItem, Tracing], None] | None = None,
) -> list[dict[str, float]]:
    """Per-image rows of a tracer on test items (see `score_result`), one thread per core;
    on_traced(item, result), if given, sees each tracing in its worker thread."""

    def score(item: TestItem) -> dict:
        result = tracer(read_image(item.image, channels=channels))
        if on_traced is not None:
            on_traced(item, result)
        return score_result(item, result, tolerance)

    return parallel_map(score, items)


def summarise(rows: list[dict]) -> dict[str, float]:
    """The mean of each metric over the rows; a metric some rows lack (visible-truth scores of
    items without a visible mask) is averaged over the rows that have it."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "image"))
    return mean_scores([{k: r.get(k, float("nan")) for k in keys} for r in rows])


def score_validation_regions(
    tracer: Callable[[np.ndarray], Tracing], pairs: list, channels: str, tolerance: int
) -> dict[str, dict[str, float]]:
    """Per region of hand-traced pairs: boundary F1 and the Heyn mean intercept, traced vs by hand.

    The hand tracings are the truth here (no exact grains), so grain metrics are left out.
    """
    by_region: dict[str, list] = {}
    for pair in pairs:
        result = tracer(read_image(pair.image, channels=channels))
        truth = read_mask(pair.label)
        f1 = boundary_scores(result.tracing, truth, tolerance)["boundary_f1"]
        by_region.setdefault(pair.region, []).append(
            (f1, heyn_intercept(result.tracing), heyn_intercept(truth))
        )
    out = {}
    for region, rows in sorted(by_region.items()):
        f1, pred, true = (np.array(col, dtype=float) for col in zip(*rows, strict=True))
        heyn_pred, heyn_true = (
            float(np.mean(pred[np.isfinite(pred)])),
            float(np.mean(true[np.isfinite(true)])),
        )
        out[region] = {
            "images": float(len(rows)),
            "boundary_f1": float(f1.mean()),
            "heyn_pred_px": heyn_pred,
            "heyn_true_px": heyn_true,
            "heyn_error": heyn_pred / heyn_true - 1,
        }
    return out
