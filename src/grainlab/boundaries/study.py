"""The poster study: every (dataset x loss x seed) run, scored on the held-out test set.

boundaries.study_seeds are offsets from `seed`: run (dataset, loss, seed + k) lives in
RUNS/<dataset>-<loss> for k = 0 (the DVC train stages' folders) and in
RUNS/seed-<seed + k>/<dataset>-<loss> otherwise. Scores are kept per run, keyed by
(dataset, loss, seed); the answers and study.json's "<dataset>/<loss>" entries are means over
the seeds (with several seeds study.json also holds each run's, "<dataset>/<loss>/seed-<seed>").
The figures show the runs of the first seed.

The runs are trained one after another in one process (`run_study`), or shared by workers on
one or many machines (`run_study_workers`): each run is a trial of an Optuna grid study
(tuning.run_grid) that one worker claims; a killed worker's run is retried by another. The
worker that finds the grid complete writes the report. Like `--from-runs`, it reads the run
folders (history, snapshot images, test grain sizes), checked against the MLflow run each trial
recorded: workers on several machines share one --runs folder (a network file system).

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

from grainlab import tracking
from grainlab.boundaries.ceilings import ceilings
from grainlab.boundaries.evaluate import baseline_tracer, score_items, summarise
from grainlab.boundaries.figures import write_poster_grid, write_size_distributions
from grainlab.boundaries.grains import equivalent_diameters
from grainlab.boundaries.study_stats import answers, ceilings_table
from grainlab.boundaries.train import (
    OUTPUT_ROOT,
    TrainResult,
    load_result,
    snapshot_diameters,
    snapshot_rows,
    test_items,
    train_boundaries,
)
from grainlab.config import Params, apply_overrides
from grainlab.errors import GrainlabError
from grainlab.images import atomic_path, read_image, read_labels, write_json

TABLE_METRICS = (
    "boundary_f1",
    "visible/boundary_f1",
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


def mean_over_seeds(final: dict[tuple[str, str, int], dict]) -> dict[tuple[str, str], dict]:
    """Each (dataset, loss)'s scores averaged over its seeds (a single run's scores as they are)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for (dataset, loss, _), scores in final.items():
        groups.setdefault((dataset, loss), []).append(scores)
    return {
        key: runs[0] if len(runs) == 1 else {m: _mean(s.get(m) for s in runs) for m in runs[0]}
        for key, runs in groups.items()
    }


def baseline_answer(final: dict[tuple[str, str, int], dict], baseline: dict) -> str:
    """The best (dataset, loss) by F1 (full truth, averaged over seeds) against the classical baseline."""
    final = mean_over_seeds(final)
    top = max(final, key=lambda k: final[k]["boundary_f1"])
    t = final[top]
    verdict = (
        "beats"
        if t["boundary_f1"] > baseline["boundary_f1"] and t["vi"] < baseline["vi"]
        else "does NOT beat"
    )
    return (
        f"- Best run {top[0]} / {top[1]} (full truth): F1 {t['boundary_f1']:.3f}, VI {t['vi']:.3f}; classical "
        f"baseline: F1 {baseline['boundary_f1']:.3f}, VI {baseline['vi']:.3f}. The best U-Net {verdict} the baseline."
    )


def study_runs(params: Params) -> list[tuple[str, str, int]]:
    """(dataset, loss, seed) of every run of the study."""
    cfg = params.boundaries
    return [
        (dataset, loss, params.seed + k)
        for dataset in cfg.study_datasets
        for loss in cfg.study_losses
        for k in cfg.study_seeds
    ]


def runs_root_of(params: Params, runs_root: Path, seed: int) -> Path:
    """The output root of a run with this seed (see the module docstring)."""
    return Path(runs_root) if seed == params.seed else Path(runs_root) / f"seed-{seed}"


def train_run(params: Params, runs_root: Path, run: tuple[str, str, int], **kwargs) -> TrainResult:
    dataset, loss, seed = run
    seeded = (
        params if seed == params.seed else apply_overrides(params, {"seed": seed}, "boundaries.study_seeds")
    )
    return train_boundaries(seeded, dataset, loss, out_root=runs_root_of(params, runs_root, seed), **kwargs)


def load_run(params: Params, runs_root: Path, run: tuple[str, str, int]) -> TrainResult:
    dataset, loss, seed = run
    return load_result(runs_root_of(params, runs_root, seed) / f"{dataset}-{loss}")


def _test_set(params: Params) -> list:
    items = test_items(params)
    if not items:
        cfg = params.boundaries
        raise GrainlabError(
            f"the study needs the held-out test set at {Path(params.data.root) / cfg.datasets_dir / cfg.test_set}; "
            "run `grainlab data synth` first"
        )
    return items


def run_study(
    params: Params,
    report_dir: Path,
    runs_root: Path = OUTPUT_ROOT,
    log_models: bool = False,
    train: bool = True,
    metrics_path: Path | None = None,
) -> Path:
    """Train every run in turn (or, with train=False, read the finished runs under runs_root),
    score them and the baseline, write the report; returns study.md."""
    items = _test_set(params)
    results = {
        run: train_run(params, runs_root, run, log_model=log_models)
        if train
        else load_run(params, runs_root, run)
        for run in study_runs(params)
    }
    return write_report(params, items, results, report_dir, metrics_path)


def run_study_workers(
    params: Params,
    report_dir: Path,
    runs_root: Path = OUTPUT_ROOT,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    join: bool = True,
    log_models: bool = False,
    metrics_path: Path | None = None,
    echo=print,
) -> Path | None:
    """Join the study's grid of runs in an Optuna storage (a database URL, or the local journal
    file under tuning.out_dir/study): claim runs until none is left; then, if every run is
    finished, write the report from the run folders under runs_root (shared by the workers) and
    log it to the study's parent MLflow run. With join=False only the report is written, or a
    clear error says which runs are not finished. Returns study.md, or None while other workers
    still train."""
    from grainlab import tuning

    items = _test_set(params)
    runs = {
        f"{dataset}/{loss}/seed-{seed}": (dataset, loss, seed) for dataset, loss, seed in study_runs(params)
    }
    name = study_name or f"boundary-study-{params.profile}"

    def train_one(key: str, parent: str, on_run):
        train_run(
            params,
            runs_root,
            runs[key],
            log_model=log_models,
            run_name=key.replace("/", "-"),
            parent_run_id=parent,
            run_tags={"boundary_study": name, "seed": runs[key][2]},
            on_run=on_run,
        )

    # MLflow first: a tracking server that does not answer fails this worker before it claims a run,
    # and the tables of a new tracking database are set up before the study's parent run is awaited
    tracking.ensure_experiment(tracking.BOUNDARY_EXPERIMENT)
    grid = tuning.run_grid(
        name,
        list(runs),
        params,
        train_one if join else None,
        storage=storage,
        journal=Path(params.tuning.out_dir) / "study" / "journal.log",
        experiment=tracking.BOUNDARY_EXPERIMENT,
    )
    if grid.pending:
        listing = ", ".join(f"{k} ({state})" for k, state in list(grid.pending.items())[:5])
        status = f"study {name!r}: {len(grid.pending)} of {len(runs)} runs not finished: {listing}"
        if join and "fail" not in grid.pending.values():
            echo(f"{status}; the worker that finishes the last one writes the report")
            return None
        raise GrainlabError(
            f"{status}; no report. Failed runs give their reason in MLflow; join more workers "
            "(--workers-join) while runs wait or run, or start a new study (--study) after a failure"
        )
    results = {}
    for key, run in runs.items():
        result = load_run(params, runs_root, run)
        if result.run_id != grid.run_ids[key]:
            raise GrainlabError(
                f"{result.out_dir}: holds MLflow run {result.run_id}, not {grid.run_ids[key]} that study "
                f"{name!r} trained; point --runs at the folder its workers share, or start a new study"
            )
        results[run] = result
    path = write_report(params, items, results, report_dir, metrics_path)
    tracking.log_to_run(grid.parent, artifacts=sorted(p for p in report_dir.iterdir() if p.is_file()))
    return path


def write_report(
    params: Params,
    items: list,
    results: dict[tuple[str, str, int], TrainResult],
    report_dir: Path,
    metrics_path: Path | None = None,
) -> Path:
    """Score the baseline, write study.md, study.json and the figures; returns study.md."""
    cfg = params.boundaries
    several = len(cfg.study_seeds) > 1
    shown = params.seed + cfg.study_seeds[0]  # the seed whose runs the figures show
    channels = "rgb" if cfg.unet.in_channels == 3 else "grey"
    true_d = np.concatenate([equivalent_diameters(read_labels(i.grains)) for i in items])
    baseline = summarise(score_items(baseline_tracer(cfg), items, channels, cfg.tolerance_px))
    ceil = ceilings(items, cfg)
    final, rows, grid, sizes, table = {}, {}, [], {}, []
    for (dataset, loss, seed), result in results.items():
        label = f"{loss}, seed {seed}" if several else loss
        last_snapshot = None
        for row in result.history:
            if row["epoch"] in cfg.snapshot_epochs:
                scores = {k[5:]: v for k, v in row.items() if k.startswith("test/")}
                table.append(_row([dataset, label, str(row["epoch"])], scores))
                final[(dataset, loss, seed)] = scores
                last_snapshot = row["epoch"]
        if last_snapshot is None:
            raise GrainlabError(
                f"{result.out_dir}: the run reached none of boundaries.snapshot_epochs "
                f"{cfg.snapshot_epochs}, so it has no test scores; train it again with these params"
            )
        rows[(dataset, loss, seed)] = snapshot_rows(result.out_dir, last_snapshot)
        if seed != shown:
            continue
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
    seeds_note = (
        f" Seeds {', '.join(str(params.seed + k) for k in cfg.study_seeds)}: the answers are means over "
        f"seeds; the figures show seed {shown}."
        if several
        else ""
    )
    lines = [
        f"# Boundary study ({params.profile} profile)",
        "",
        f"{len(final)} runs, {cfg.epochs} epochs each, scored on {len(items)} held-out test images "
        f"(boundary tolerance {cfg.tolerance_px} px).{seeds_note}",  # no wall time: reports/ is a DVC output
        "",
        "## Answers",
        "",
        *answers(rows, cfg.study_datasets, cfg.study_losses),
        baseline_answer(final, baseline),
        "",
        "## Ceilings",
        "",
        "What a perfect tracer of only what the data shows scores against the full truth: the visible-only "
        "tracer traces each image's visible boundaries exactly; the composite tracer draws every boundary "
        "seen in the region's tilt series in the reference view, as a composite tracing is drawn, so it "
        "misaligns with tilted and drifted images.",
        "",
        *ceilings_table(ceil),
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
    summary = {
        "baseline": baseline,
        "ceilings": ceil,
        **{f"{d}/{loss}": s for (d, loss), s in mean_over_seeds(final).items()},
        **({f"{d}/{loss}/seed-{seed}": s for (d, loss, seed), s in final.items()} if several else {}),
    }
    for path in {report_dir / "study.json", Path(metrics_path or report_dir / "study.json")}:
        write_json(path, summary)
    return report_dir / "study.md"
