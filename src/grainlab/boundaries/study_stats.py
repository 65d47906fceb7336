"""The study's answers with their uncertainty.

Input: per-image test rows (as `score_items` returns them) of every run, keyed by
(dataset, loss, seed). A group (a dataset over all losses, or a loss over all datasets) is a
(seeds x images) matrix of one metric, each cell the mean over the group's runs with that seed
on that image. Its mean gets a 95 % confidence interval from a bootstrap that resamples seeds
and test images (with replacement, fixed RNG seed: deterministic); two groups are compared by
the same bootstrap of their paired difference (same seeds, same images).

Metrics against the full truth (the whole boundary network) are keyed as `score_items` names
them; against the boundaries visible at each image's tilt they carry the `visible/` prefix and
only boundary F1 (precision, recall) exists there: the visible network does not close into
grains, so it has no VI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grainlab.boundaries.ceilings import CEILINGS
from grainlab.boundaries.evaluate import VISIBLE
from grainlab.errors import GrainlabError

RunKey = tuple[str, str, int]  # (dataset, loss, seed)
RESAMPLES = 2000
RNG_SEED = 0
LEVEL = 0.95
HIGHER_IS_BETTER = {"boundary_f1": True, "vi": False}
NAMES = {"boundary_f1": "F1", "vi": "VI"}
TRUTHS = {
    "full": ("full truth, the whole boundary network", ("boundary_f1", "vi")),
    "visible": ("visible truth, the boundaries visible at each image's tilt", (VISIBLE + "boundary_f1",)),
}
CEILING_METRICS = ("boundary_f1", "boundary_precision", "boundary_recall", "vi", "count_error", "heyn_error")


@dataclass(frozen=True)
class Estimate:
    """A mean (or a mean paired difference) with its 95 % bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int
    images: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (for a difference)."""
        return self.low > 0 or self.high < 0


def group_matrix(
    runs: dict[RunKey, list[dict]], metric: str, dataset: str | None = None, loss: str | None = None
) -> np.ndarray:
    """(seeds, images) values of `metric` for the runs of one dataset and/or loss (None: all),
    averaged over the group's runs with the same seed; seeds and images in sorted order."""
    keys = [k for k in runs if dataset in (None, k[0]) and loss in (None, k[1])]
    if not keys:
        raise GrainlabError(f"study statistics: no run of dataset {dataset!r}, loss {loss!r}")
    images = sorted(r["image"] for r in runs[keys[0]])
    by_seed: dict[int, list[np.ndarray]] = {}
    for key in keys:
        rows = {r["image"]: r for r in runs[key]}
        if sorted(rows) != images:
            raise GrainlabError(
                f"study statistics: run {key} scored test images {sorted(rows)[:5]}..., expected the same "
                f"{len(images)} images as run {keys[0]}"
            )
        if any(metric not in r for r in rows.values()):
            raise GrainlabError(f"study statistics: run {key} has no {metric!r} score for every test image")
        by_seed.setdefault(key[2], []).append(np.array([rows[i][metric] for i in images], dtype=float))
    return np.array([np.mean(by_seed[s], axis=0) for s in sorted(by_seed)])


def estimate(matrix: np.ndarray) -> Estimate:
    """The mean of a (seeds, images) matrix, with a 95 % interval: seeds and images resampled."""
    seeds, images = matrix.shape
    rng = np.random.default_rng(RNG_SEED)
    rows = rng.integers(0, seeds, (RESAMPLES, seeds, 1))
    cols = rng.integers(0, images, (RESAMPLES, 1, images))
    with np.errstate(all="ignore"):
        means = np.nanmean(matrix[rows, cols], axis=(1, 2))
    low, high = np.nanquantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(float(np.nanmean(matrix)), float(low), float(high), seeds, images)


def compare(a: np.ndarray, b: np.ndarray) -> Estimate:
    """The paired difference a - b of two groups over the same seeds and images, with its interval."""
    if a.shape != b.shape:
        raise GrainlabError(
            f"study statistics: a paired comparison needs the same seeds and images, got (seeds, images) "
            f"{a.shape} and {b.shape}"
        )
    return estimate(a - b)


def _name(metric: str) -> str:
    return NAMES[metric.removeprefix(VISIBLE)]


def _higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER[metric.removeprefix(VISIBLE)]


def _winner(diff: Estimate, metric: str, a: str, b: str) -> str | None:
    """Which of a, b the difference a - b of `metric` favours; None when not significant."""
    if not diff.significant:
        return None
    better_a = (diff.mean > 0) == _higher_is_better(metric)
    return a if better_a else b


def _verdict(winners: dict[str, str | None], subject: str) -> str:
    """One sentence from each metric's winner: agreement, disagreement, or no significant difference."""
    named = {_name(m): w for m, w in winners.items()}
    found = {w for w in named.values() if w is not None}
    if not found:
        return "no significant difference"
    if len(found) > 1:
        sides = " but ".join(f"{m} favours {w}" for m, w in named.items())
        return f"{' and '.join(named)} disagree ({sides}), so no single answer"
    winner = found.pop()
    unsure = [m for m, w in named.items() if w is None]
    tail = f"; {', '.join(unsure)}: no significant difference" if unsure else ""
    return f"**{winner}** {subject}{tail}"


def _basis(e: Estimate, over: str) -> str:
    return f"mean over {over}, {e.seeds} seed{'s' if e.seeds != 1 else ''} x {e.images} test images, 95 % CI"


def quality_vs_quantity(runs: dict[RunKey, list[dict]], a: str, b: str, truth: str) -> str:
    """One answer line: dataset a against dataset b, averaged over losses, on one truth."""
    label, metrics = TRUTHS[truth]
    parts, winners = [], {}
    for m in metrics:
        ma, mb = group_matrix(runs, m, dataset=a), group_matrix(runs, m, dataset=b)
        ea, eb, diff = estimate(ma), estimate(mb), compare(ma, mb)
        parts.append(f"{_name(m)} {ea} vs {eb}, difference {diff}")
        winners[m] = _winner(diff, m, a, b)
    return (
        f"- Quality vs quantity, {a} vs {b} ({label}; {_basis(ea, 'losses')}): "
        f"{'; '.join(parts)}: {_verdict(winners, 'traces better')}."
    )


def best_loss(runs: dict[RunKey, list[dict]], losses: list[str], truth: str) -> str:
    """One answer line: each loss (two or more) averaged over datasets; per metric, the best loss
    compared with every other one (paired): it is named only where it beats them all significantly."""
    label, metrics = TRUTHS[truth]
    parts, winners = [], {}
    for m in metrics:
        mats = {loss: group_matrix(runs, m, loss=loss) for loss in losses}
        est = {loss: estimate(mat) for loss, mat in mats.items()}
        pick = max if _higher_is_better(m) else min
        best = pick(losses, key=lambda loss: est[loss].mean)
        diffs = {loss: compare(mats[best], mats[loss]) for loss in losses if loss != best}
        beaten = all(_winner(d, m, best, loss) == best for loss, d in diffs.items())
        winners[m] = best if beaten else None
        listing = ", ".join(f"{loss} {est[loss]}" for loss in losses)
        versus = ", ".join(f"{best} - {loss} {d}" for loss, d in diffs.items())
        parts.append(f"{_name(m)} {listing} (differences {versus})")
    return (
        f"- Best loss ({label}; {_basis(est[losses[0]], 'datasets')}): {'; '.join(parts)}: "
        f"{_verdict(winners, 'traces best')}."
    )


def answers(runs: dict[RunKey, list[dict]], datasets: list[str], losses: list[str]) -> list[str]:
    """The study's answer lines (quality vs quantity where both datasets are in the study; the best
    loss where there are several), on the full truth and, where the rows have it, the visible truth."""
    visible = all(VISIBLE + "boundary_f1" in r for rows in runs.values() for r in rows)
    truths = ["full", "visible"] if visible else ["full"]
    lines = []
    for truth in truths:
        lines += [
            quality_vs_quantity(runs, a, b, truth)
            for a, b in (("grae", "gong"), ("grae-large", "gong"))
            if a in datasets and b in datasets
        ]
        if len(losses) > 1:
            lines.append(best_loss(runs, losses, truth))
    return lines


def ceilings_table(ceil: dict[str, dict[str, float]]) -> list[str]:
    """Markdown table of the ceilings (`ceilings.ceilings`), scored against the full truth."""
    lines = [
        "| ceiling (scored against the full truth) | " + " | ".join(CEILING_METRICS) + " |",
        "|" + "---|" * (1 + len(CEILING_METRICS)),
    ]
    for name, scores in ceil.items():
        values = (
            f"{scores[m]:.3f}" if np.isfinite(scores.get(m, np.nan)) else "n/a" for m in CEILING_METRICS
        )
        lines.append(f"| {CEILINGS[name][1]} | " + " | ".join(values) + " |")
    return lines
