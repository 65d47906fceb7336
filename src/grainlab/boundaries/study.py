"""The poster study: every (dataset x loss) run, scored on the held-out test set.

Writes into the report folder:
    study.md        metrics at each snapshot epoch, the classical baseline, and the answers
                    (quality vs quantity; which loss traces best) with numbers
    study.json      the final-epoch test metrics of every run and of the baseline (for DVC)
    poster_grid.png rows loss x dataset; columns the test prediction at each snapshot, loss curves
    gsd-<dataset>.png grain-size distributions (equivalent diameters) of each loss at its last
                    snapshot epoch vs the truth
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from grainlab.boundaries.evaluate import baseline_tracer, score_items, summarise
from grainlab.boundaries.figures import write_poster_grid, write_size_distributions
from grainlab.boundaries.grains import equivalent_diameters
from grainlab.boundaries.train import (
    OUTPUT_ROOT,
    load_result,
    snapshot_diameters,
    test_items,
    train_boundaries,
)
from grainlab.config import Params
from grainlab.errors import GrainlabError
from grainlab.images import atomic_path, read_image, read_labels, write_json

TABLE_METRICS = (
    "boundary_f1",
    "vi",
    "adapted_rand",
    "count_error",
    "diameter_error",
    "ks",
    "cvm",
    "heyn_error",
    "astm_g_diff",
    "orphan_fraction",
    "disregistry",
)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _row(label: list[str], scores: dict) -> str:
    return "| " + " | ".join([*label, *(_fmt(scores.get(m)) for m in TABLE_METRICS)]) + " |"


def _mean(values) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def answers(final: dict[tuple[str, str], dict], baseline: dict, datasets, losses) -> list[str]:
    """The study's conclusions, each with its numbers."""
    lines = []

    def by_dataset(name, key):
        return _mean(final[(name, loss)].get(key) for loss in losses if (name, loss) in final)

    for a, b in (("grae", "gong"), ("grae-large", "gong")):
        if a in datasets and b in datasets:
            fa, fb = by_dataset(a, "boundary_f1"), by_dataset(b, "boundary_f1")
            va, vb = by_dataset(a, "vi"), by_dataset(b, "vi")
            better = a if fa > fb else b
            lines.append(
                f"- Quality vs quantity, {a} vs {b}: boundary F1 {fa:.3f} vs {fb:.3f}, VI {va:.3f} vs {vb:.3f} "
                f"(mean over losses): **{better}** traces better."
            )
    per_loss = {
        loss: _mean(final[(d, loss)]["boundary_f1"] for d in datasets if (d, loss) in final)
        for loss in losses
    }
    per_loss_vi = {
        loss: _mean(final[(d, loss)]["vi"] for d in datasets if (d, loss) in final) for loss in losses
    }
    best = max(per_loss, key=lambda k: per_loss[k])
    listing = ", ".join(f"{k} {per_loss[k]:.3f} (VI {per_loss_vi[k]:.3f})" for k in losses)
    lines.append(f"- Best loss by boundary F1 (mean over datasets): **{best}**; {listing}.")
    top = max(final, key=lambda k: final[k]["boundary_f1"])
    t = final[top]
    verdict = (
        "beats"
        if t["boundary_f1"] > baseline["boundary_f1"] and t["vi"] < baseline["vi"]
        else "does NOT beat"
    )
    lines.append(
        f"- Best run {top[0]} / {top[1]}: F1 {t['boundary_f1']:.3f}, VI {t['vi']:.3f}; classical baseline: "
        f"F1 {baseline['boundary_f1']:.3f}, VI {baseline['vi']:.3f}. The best U-Net {verdict} the baseline."
    )
    return lines


def run_study(
    params: Params,
    report_dir: Path,
    runs_root: Path = OUTPUT_ROOT,
    log_models: bool = False,
    train: bool = True,
    metrics_path: Path | None = None,
) -> Path:
    """Train every combination (or, with train=False, read the finished runs under runs_root),
    score them and the baseline, write the report; returns study.md."""
    cfg = params.boundaries
    items = test_items(params)
    if not items:
        raise GrainlabError(
            f"the study needs the held-out test set at {Path(params.data.root) / cfg.datasets_dir / cfg.test_set}; "
            "run `grainlab data synth` first"
        )
    channels = "rgb" if cfg.unet.in_channels == 3 else "grey"
    true_d = np.concatenate([equivalent_diameters(read_labels(i.grains)) for i in items])
    baseline = summarise(score_items(baseline_tracer(cfg), items, channels, cfg.tolerance_px))
    final, grid, sizes, table = {}, [], {}, []
    for dataset in cfg.study_datasets:
        for loss in cfg.study_losses:
            if train:
                result = train_boundaries(params, dataset, loss, out_root=runs_root, log_model=log_models)
            else:
                result = load_result(runs_root / f"{dataset}-{loss}")
            last_snapshot = None
            for row in result.history:
                if row["epoch"] in cfg.snapshot_epochs:
                    scores = {k[5:]: v for k, v in row.items() if k.startswith("test/")}
                    table.append(_row([dataset, loss, str(row["epoch"])], scores))
                    final[(dataset, loss)] = scores
                    last_snapshot = row["epoch"]
            if last_snapshot is None:
                raise GrainlabError(
                    f"{result.out_dir}: the run reached none of boundaries.snapshot_epochs "
                    f"{cfg.snapshot_epochs}, so it has no test scores; train it again with these params"
                )
            sizes.setdefault(dataset, {})[loss] = snapshot_diameters(result.out_dir, last_snapshot)
            snaps = [
                (e, read_image(result.out_dir / "snapshots" / f"epoch-{e:03d}-probability.png"))
                for e in cfg.snapshot_epochs
            ]
            grid.append({"title": f"{loss} / {dataset}", "snapshots": snaps, "history": result.history})
    report_dir.mkdir(parents=True, exist_ok=True)
    write_poster_grid(report_dir / "poster_grid.png", grid)
    for dataset, curves in sizes.items():
        write_size_distributions(report_dir / f"gsd-{dataset}.png", true_d, curves, f"test set, {dataset}")
    header = "| dataset | loss | epoch | " + " | ".join(TABLE_METRICS) + " |"
    lines = [
        f"# Boundary study ({params.profile} profile)",
        "",
        f"{len(final)} runs, {cfg.epochs} epochs each, scored on {len(items)} held-out test images "
        f"(boundary tolerance {cfg.tolerance_px} px).",  # no wall time: reports/ is a DVC output
        "",
        "## Answers",
        "",
        *answers(final, baseline, cfg.study_datasets, cfg.study_losses),
        "",
        "## Test metrics at each snapshot epoch",
        "",
        header,
        "|" + "---|" * (3 + len(TABLE_METRICS)),
        _row(["-", "classical baseline", "-"], baseline),
        *table,
        "",
        "boundary_f1: higher is better. count_error, diameter_error, heyn_error (relative, pred/true - 1) "
        "and astm_g_diff: closer to 0 is better. The rest: lower is better.",
        "",
        "![poster grid](poster_grid.png)",
        "",
        *[f"![grain sizes {d}](gsd-{d}.png)" for d in sizes],
        "",
    ]
    with atomic_path(report_dir / "study.md") as tmp:
        tmp.write_text("\n".join(lines))
    summary = {"baseline": baseline, **{f"{d}/{loss}": s for (d, loss), s in final.items()}}
    for path in {report_dir / "study.json", Path(metrics_path or report_dir / "study.json")}:
        write_json(path, summary)
    return report_dir / "study.md"
