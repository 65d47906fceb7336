"""Leave-sources-out cross-validation of boundary tracing on a hand-traced dataset.

The region of each pair in the dataset manifest is its source (specimen / micrograph). The
sorted sources are dealt into K folds (fold i holds sources i, i+K, i+2K, ...). For each fold:

1. `train_boundaries` trains on the other folds' sources only; inside them it splits off a
   validation split by source (boundaries.val_fraction) and calibrates the post-processing
   there (`calibrate`), storing it in the fold's checkpoint. No epoch is selected: the last
   epoch's weights are used.
2. The classical baseline's settings (smoothing, marker percentile, minimum grain) are
   calibrated on all the training folds' images (it learns nothing else).
3. Both trace the held-out sources' images; each source gets one row per method.

Per source, against the skeleton of the hand tracing (`calibrate.truth_maps`):
    boundary_f1       mean over its images, tolerance boundaries.tolerance_px, skeleton vs skeleton
    heyn_error        pooled Heyn mean lineal intercept (all its images' test lines) / truth - 1
    astm_g_diff       -6.643856 log10(l_pred / l_true)
    count_error       grains traced / grains by hand - 1, over all its images

The summary is the mean and sample standard deviation over sources of F1, |Heyn error|,
|ASTM G difference| and |count error| (and the signed Heyn error). Everything goes to one
MLflow parent run (the fold runs nested under it) and to crossval.json and crossval.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grainlab import tracking
from grainlab.boundaries.calibrate import baseline_trace, calibrate_baseline, truth_maps
from grainlab.boundaries.evaluate import model_tracer, postprocess_source
from grainlab.boundaries.grains import heyn_counts
from grainlab.boundaries.metrics import boundary_scores
from grainlab.config import Params, flatten
from grainlab.datasets.folder import load_dataset
from grainlab.errors import GrainlabError
from grainlab.images import parallel_map, read_image, read_mask, write_json

EXPERIMENT = "grain-boundaries-crossval"
METHODS = ("model", "baseline")
SUMMARY_KEYS = ("boundary_f1", "heyn_abs_error", "heyn_error", "astm_g_abs_diff", "count_abs_error")


@dataclass(frozen=True)
class CrossvalResult:
    rows: list[dict]
    summary: dict
    folds: list[dict]
    parent_run_id: str
    json_path: Path
    markdown_path: Path


def source_folds(sources: list[str], folds: int) -> list[list[str]]:
    """The sorted sources dealt into `folds` folds: fold i holds sources i, i + folds, ..."""
    sources = sorted(sources)
    if len(sources) < 3:
        raise GrainlabError(
            f"cross-validation needs at least 3 sources (one held out, two to train and validate), found {sources}"
        )
    if not 2 <= folds <= len(sources):
        raise GrainlabError(f"--folds {folds}: expected 2 to {len(sources)} (the number of sources)")
    return [sources[i::folds] for i in range(folds)]


def score_source(
    traced: list[tuple[np.ndarray, np.ndarray]], truths: list[tuple[np.ndarray, np.ndarray]], tolerance: int
) -> dict[str, float]:
    """One source's scores from its images' (tracing, grains), traced and by hand."""
    f1 = [boundary_scores(t, truth, tolerance) for (t, _), (truth, _) in zip(traced, truths, strict=True)]
    length_p, cross_p = np.sum([heyn_counts(t) for t, _ in traced], axis=0)
    length_t, cross_t = np.sum([heyn_counts(t) for t, _ in truths], axis=0)
    lp = length_p / cross_p if cross_p else float("inf")
    lt = length_t / cross_t if cross_t else float("inf")
    heyn = float(lp / lt - 1) if np.isfinite(lp) and np.isfinite(lt) else float("nan")
    g = float(-6.643856 * np.log10(lp / lt)) if np.isfinite(heyn) else float("nan")
    n_pred = sum(int(g_.max()) for _, g_ in traced)
    n_true = sum(int(g_.max()) for _, g_ in truths)
    count = (n_pred - n_true) / n_true if n_true else float("nan")
    return {
        "images": float(len(traced)),
        "boundary_f1": float(np.mean([s["boundary_f1"] for s in f1])),
        "boundary_precision": float(np.mean([s["boundary_precision"] for s in f1])),
        "boundary_recall": float(np.mean([s["boundary_recall"] for s in f1])),
        "heyn_pred_px": float(lp),
        "heyn_true_px": float(lt),
        "heyn_error": heyn,
        "heyn_abs_error": abs(heyn),
        "astm_g_diff": g,
        "astm_g_abs_diff": abs(g),
        "grains_pred": float(n_pred),
        "grains_true": float(n_true),
        "count_error": float(count),
        "count_abs_error": abs(float(count)),
    }


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{method: {key_mean, key_sd}} over the per-source rows (sample sd; 0 for one source)."""
    out = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        stats = {"sources": float(len(mine))}
        for key in SUMMARY_KEYS:
            vals = np.array([r[key] for r in mine], dtype=float)
            vals = vals[np.isfinite(vals)]
            stats[f"{key}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            stats[f"{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[method] = stats
    return out


def markdown_table(rows: list[dict], summary: dict, title: str = "") -> str:
    """The per-source table and the mean ± sd rows, as Markdown."""
    head = "| source | fold | images | method | F1@2px | Heyn error | ASTM ΔG | count error |"
    lines = [f"### {title}", ""] if title else []
    lines += [head, "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["source"], METHODS.index(r["method"]))):
        lines.append(
            f"| {r['source']} | {r['fold']} | {r['images']:.0f} | {r['method']} | {r['boundary_f1']:.3f} | "
            f"{100 * r['heyn_error']:+.1f} % | {r['astm_g_diff']:+.2f} | {100 * r['count_error']:+.1f} % |"
        )
    lines += [
        "",
        "| method | sources | F1@2px | abs. Heyn error | signed Heyn error | abs. ASTM ΔG | abs. count error |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {s['sources']:.0f} | {s['boundary_f1_mean']:.3f} ± {s['boundary_f1_sd']:.3f} | "
            f"{100 * s['heyn_abs_error_mean']:.1f} ± {100 * s['heyn_abs_error_sd']:.1f} % | "
            f"{100 * s['heyn_error_mean']:+.1f} ± {100 * s['heyn_error_sd']:.1f} % | "
            f"{s['astm_g_abs_diff_mean']:.2f} ± {s['astm_g_abs_diff_sd']:.2f} | "
            f"{100 * s['count_abs_error_mean']:.1f} ± {100 * s['count_abs_error_sd']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def _load(pairs, channels: str, max_pixels: int):
    def load(pair):
        return read_image(pair.image, channels=channels, max_pixels=max_pixels), read_mask(
            pair.label, max_pixels=max_pixels
        )

    return parallel_map(load, pairs)


def _baseline_settings(path: Path, pairs, channels: str, max_px: int, tolerance: int, reuse: bool):
    """The classical baseline calibrated on the fold's training pairs; with reuse, read back from
    `path` when it was calibrated there on the same images with the same tolerance."""
    key = {"images": sorted(str(p.image) for p in pairs), "tolerance": tolerance}
    if reuse and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["settings"], saved["report"]
    data = _load(pairs, channels, max_px)
    settings, report = calibrate_baseline([im for im, _ in data], truth_maps([m for _, m in data]), tolerance)
    write_json(path, {"key": key, "settings": settings, "report": report})
    return settings, report


def run_crossval(
    params: Params,
    dataset: str,
    folds: int = 7,
    out_dir: Path | None = None,
    loss: str | None = None,
    experiment: str = EXPERIMENT,
    echo=None,
    reuse: bool = False,
) -> CrossvalResult:
    """Leave-sources-out cross-validation (see the module docstring); writes crossval.json and
    crossval.md into out_dir (default outputs/crossval/<dataset>), fold runs under out_dir/folds/.

    reuse: take the fold networks already trained under out_dir/folds/ (same params but for the
    post-processing and inference settings, see `train.recalibrate`) and only calibrate and
    score again: a new post-processing setting or test-time augmentation measured without
    training again."""
    from grainlab.boundaries.infer import load_model
    from grainlab.boundaries.train import (
        check_reusable,
        dataset_root,
        device_name,
        pick_device,
        read_run_id,
        recalibrate,
        train_boundaries,
    )

    cfg = params.boundaries
    loss = loss or cfg.loss
    ds = load_dataset(dataset_root(params, dataset))
    fold_sources = source_folds(ds.regions, folds)
    out_dir = Path(out_dir or Path("outputs/crossval") / ds.name)
    channels = "rgb" if cfg.unet.in_channels == 3 else "grey"
    max_px = params.data.max_image_pixels
    echo = echo or (lambda _msg: None)
    parent = tracking.create_run(
        experiment,
        f"crossval-{ds.name}-{loss}",
        tracking.standard_tags(
            stage="boundary-crossval",
            dataset=ds.name,
            loss=loss,
            folds=folds,
            device=device_name(pick_device()),
        ),
    )
    rows, fold_info = [], []
    try:
        for i, held in enumerate(fold_sources):
            train_sources = [s for s in ds.regions if s not in held]
            start = time.perf_counter()
            fold_dir = out_dir / "folds" / f"fold-{i}" / f"{ds.name}-{loss}"
            if reuse:
                ckpt_path = fold_dir / "checkpoints" / "last.pt"
                check_reusable(params, ckpt_path)
                report = recalibrate(params, dataset, ckpt_path, train_sources) if cfg.calibrate else {}
                run_id = tracking.create_run(
                    experiment,
                    f"{ds.name}-{loss}-fold-{i}-recalibrated",
                    {
                        "mlflow.parentRunId": parent,
                        "fold": str(i),
                        "heldout_sources": ",".join(held),
                        "trained_in_run": str(read_run_id(fold_dir)),
                    },
                )
                calibration = {f"calibrated/{k}": v for k, v in report.items()}
            else:
                result = train_boundaries(
                    params,
                    dataset,
                    loss,
                    out_root=out_dir / "folds" / f"fold-{i}",
                    log_model=False,
                    experiment=experiment,
                    run_name=f"{ds.name}-{loss}-fold-{i}",
                    parent_run_id=parent,
                    run_tags={"fold": str(i), "heldout_sources": ",".join(held)},
                    regions=train_sources,
                )
                run_id = result.run_id
                calibration = {k: v for k, v in result.metrics.items() if k.startswith("calibrated/")}
            train_s = time.perf_counter() - start
            model = load_model(fold_dir / "checkpoints" / "last.pt")
            tracer = model_tracer(model, cfg)
            base_settings, base_report = _baseline_settings(
                out_dir / "folds" / f"fold-{i}" / "baseline.json",
                [p for p in ds.pairs if p.region in train_sources],
                channels,
                max_px,
                cfg.tolerance_px,
                reuse,
            )
            base = baseline_trace(base_settings)
            fold_metrics = {}
            for source in held:
                data = _load([p for p in ds.pairs if p.region == source], channels, max_px)
                truths = truth_maps([m for _, m in data])
                traced = {
                    "model": [(r.tracing, r.grains) for r in (tracer(im) for im, _ in data)],
                    "baseline": parallel_map(base, [im for im, _ in data]),
                }
                for method in METHODS:
                    scores = score_source(traced[method], truths, cfg.tolerance_px)
                    rows.append({"source": source, "fold": i, "method": method, **scores})
                    fold_metrics.update({f"test/{method}/{source}/{k}": v for k, v in scores.items()})
            fold_info.append(
                {
                    "fold": i,
                    "heldout_sources": held,
                    "train_sources": train_sources,
                    "run_id": run_id,
                    "train_seconds": train_s,
                    "postprocess_source": postprocess_source(model, cfg),
                    "postprocess": model.postprocess,
                    "calibration": calibration,
                    "baseline_settings": base_settings,
                    "baseline_calibration": base_report,
                }
            )
            tracking.log_to_run(run_id, fold_metrics | calibration | {"time/fold_train_s": train_s})
            done = [r for r in rows if r["fold"] == i and r["method"] == "model"]
            echo(
                f"fold {i} (held out {', '.join(held)}): "
                + ", ".join(
                    f"{r['source']} F1 {r['boundary_f1']:.3f} Heyn {100 * r['heyn_error']:+.1f}%"
                    for r in done
                )
                + f" [{train_s:.0f} s]"
            )
    except BaseException:
        tracking.log_to_run(parent, status="FAILED")
        raise
    summary = summarise(rows)
    title = f"{ds.name}: {folds}-fold leave-sources-out cross-validation, loss {loss}"
    report = {
        "dataset": ds.name,
        "loss": loss,
        "folds": fold_info,
        "rows": rows,
        "summary": summary,
        "params": {k: v for k, v in flatten(params).items() if k.startswith("boundaries.")},
        "parent_run_id": parent,
    }
    json_path, md_path = out_dir / "crossval.json", out_dir / "crossval.md"
    write_json(json_path, report)
    md_path.write_text(markdown_table(rows, summary, title))
    flat = {f"{m}/{k}": v for m, s in summary.items() for k, v in s.items()}
    tracking.log_to_run(parent, flat, artifacts=(json_path, md_path))
    return CrossvalResult(rows, summary, fold_info, parent, json_path, md_path)
