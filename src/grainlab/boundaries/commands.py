"""`grainlab boundaries ...`: train, trace, evaluate and the poster study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from grainlab.cli import check_pixel_size, params_from
from grainlab.errors import GrainlabError


def register(groups, common):
    group = groups.add_parser("boundaries", help="grain-boundary tracing: train, trace, evaluate, study")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser(
        "train",
        parents=[common],
        help="train the U-Net on one dataset with one loss",
        description="Train the boundary U-Net, tracked in MLflow (experiment grain-boundaries). Writes "
        "checkpoints, snapshots, history.csv, metrics.json and loss_curve.png to OUT/<dataset>-<loss>/.",
    )
    train.add_argument(
        "--dataset", required=True, help="dataset name under data/grain_boundaries/, or a folder"
    )
    train.add_argument(
        "--loss", default=None, help="loss name (default: boundaries.loss); see `boundaries losses`"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint, same MLflow run"
    )
    train.add_argument("--out", default="outputs/boundaries", help="output root (default: %(default)s)")
    train.set_defaults(func=run_train)

    crossval = verbs.add_parser(
        "crossval",
        parents=[common],
        help="leave-sources-out cross-validation of the U-Net and the classical baseline",
        description="Deal the dataset's sources (manifest regions) into K folds; for each fold train on the "
        "other folds (post-processing calibrated on a validation split of them), calibrate the baseline on "
        "them, and score both on the held-out sources: boundary F1 (skeleton vs skeleton), Heyn intercept "
        "error, ASTM G difference, grain count error per source, mean and sd over sources. One MLflow parent "
        "run with a nested run per fold; OUT/crossval.json and OUT/crossval.md.",
    )
    crossval.add_argument(
        "--dataset", required=True, help="dataset name under data/grain_boundaries/, or a folder"
    )
    crossval.add_argument("--folds", type=int, default=7, help="number of folds (default: %(default)s)")
    crossval.add_argument(
        "--loss", default=None, help="loss name (default: boundaries.loss); see `boundaries losses`"
    )
    crossval.add_argument("--out", default=None, help="output folder (default: outputs/crossval/<dataset>)")
    crossval.add_argument(
        "--reuse-folds",
        action="store_true",
        help="do not train: reuse the fold networks under OUT/folds (trained with the same params) and "
        "only calibrate the post-processing and score again (to measure post-processing or inference settings)",
    )
    crossval.set_defaults(func=run_crossval)

    trace = verbs.add_parser(
        "trace",
        parents=[common],
        help="trace grain boundaries in images with a trained model",
        description="Tiled inference on images of any size, then post-processing into a one-pixel tracing, "
        "grains and grain statistics (probability, tracing, grain map, overlay PNGs; stats CSV/JSON).",
    )
    trace.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, TIFF, JPEG)")
    trace.add_argument("--model", required=True, help="checkpoint file, or an MLflow models:/ or runs:/ URI")
    trace.add_argument("--out", required=True, help="output folder")
    trace.add_argument(
        "--pixel-size", type=float, default=None, metavar="NM", help="pixel size in nm (for ASTM G)"
    )
    trace.add_argument(
        "--postprocess",
        choices=("checkpoint", "params"),
        default=None,
        help="post-processing settings: those calibrated in training and stored in the checkpoint, or the "
        "params' boundaries.postprocess (default: boundaries.postprocess_from, i.e. checkpoint; a checkpoint "
        "without calibrated settings uses the params')",
    )
    trace.set_defaults(func=run_trace)

    evaluate = verbs.add_parser(
        "evaluate",
        parents=[common],
        help="score a model and the classical baseline on the test set",
        description="Boundary P/R/F1 (tolerance boundaries.tolerance_px), Dice, IoU, grain counts and sizes, "
        "KS / Cramer-von Mises, Heyn and ASTM G errors, VI, adapted Rand and centroid matching.",
    )
    evaluate.add_argument("--model", default=None, help="checkpoint or MLflow URI (omit: baseline only)")
    evaluate.add_argument(
        "--test-set", default=None, help="test set folder (default: data/grain_boundaries/test)"
    )
    evaluate.add_argument(
        "--dataset",
        default=None,
        help="score instead the validation regions of this hand-traced dataset (split as in training): "
        "boundary F1 and Heyn mean intercept per region",
    )
    evaluate.add_argument("--out", default=None, help="write the scores to this JSON file")
    evaluate.add_argument(
        "--postprocess",
        choices=("checkpoint", "params"),
        default=None,
        help="post-processing settings: those calibrated in training and stored in the checkpoint, or the "
        "params' boundaries.postprocess (default: boundaries.postprocess_from, i.e. checkpoint; a checkpoint "
        "without calibrated settings uses the params')",
    )
    evaluate.set_defaults(func=run_evaluate)

    study = verbs.add_parser(
        "study",
        parents=[common],
        help="the poster study: every dataset x loss x seed, with report",
        description="Train every (boundaries.study_datasets x boundaries.study_losses x boundaries.study_seeds) "
        "run and write study.md, study.json, poster_grid.png and grain-size distribution plots. With "
        "--workers-join, workers on one or many machines share the runs through an Optuna study (--storage): "
        "each claims runs until none is left, a killed worker's run is retried, and the worker that finds "
        "every run finished writes the report from the run folders (--runs, shared by the workers).",
    )
    study.add_argument("--out", default="reports/boundaries", help="report folder (default: %(default)s)")
    study.add_argument("--runs", default="outputs/boundaries", help="run output root (default: %(default)s)")
    study.add_argument("--log-models", action="store_true", help="also log each run's pyfunc model to MLflow")
    study.add_argument(
        "--from-runs",
        action="store_true",
        help="do not train: report on the finished runs under --runs (as the DVC pipeline's train stages made them)",
    )
    study.add_argument("--metrics", default=None, help="also write the study's metrics JSON here (for DVC)")
    study.add_argument(
        "--workers-join",
        action="store_true",
        help="join the study's shared grid of runs as one more worker: claim runs until none is left, then "
        "write the report if every run is finished",
    )
    study.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="the Optuna storage the workers share, e.g. postgresql://user@host:5432/db (default with "
        "--workers-join: $GRAINLAB_OPTUNA_STORAGE, else a local journal file under tuning.out_dir/study); "
        "with --from-runs: report on that study's runs",
    )
    study.add_argument(
        "--study", default=None, help="the workers' shared study (default: boundary-study-PROFILE)"
    )
    study.set_defaults(func=run_study)

    losses = verbs.add_parser("losses", parents=[common], help="list the registered losses and search spaces")
    losses.set_defaults(func=run_losses)


def run_train(args):
    from grainlab.boundaries.train import train_boundaries

    params = params_from(args)
    result = train_boundaries(params, args.dataset, args.loss, resume=args.resume, out_root=Path(args.out))
    last = result.history[-1]
    print(
        f"{result.out_dir}: epoch {last['epoch']}, val/loss {last['val/loss']:.4f}, "
        f"val/boundary_f1 {last['val/boundary_f1']:.3f}, val/vi {last['val/vi']:.3f} (MLflow run {result.run_id})"
    )


def with_postprocess_from(params, choice: str | None):
    """params with boundaries.postprocess_from set to the --postprocess choice, if one was given."""
    import dataclasses

    if choice is None:
        return params
    return dataclasses.replace(
        params, boundaries=dataclasses.replace(params.boundaries, postprocess_from=choice)
    )


def describe_postprocess(model, cfg) -> str:
    import dataclasses

    from grainlab.boundaries.evaluate import model_postprocess, postprocess_source

    post = dataclasses.asdict(model_postprocess(model, cfg))
    source = postprocess_source(model, cfg)
    where = "calibrated in training, from the checkpoint" if source == "checkpoint" else "from the params"
    return f"post-processing ({where}): " + ", ".join(f"{k}={v}" for k, v in post.items())


def run_crossval(args):
    from grainlab.boundaries.crossval import markdown_table, run_crossval

    params = params_from(args)
    result = run_crossval(
        params,
        args.dataset,
        args.folds,
        Path(args.out) if args.out else None,
        args.loss,
        echo=lambda msg: print(msg, flush=True),
        reuse=args.reuse_folds,
    )
    print(markdown_table(result.rows, result.summary))
    print(f"wrote {result.json_path} and {result.markdown_path} (MLflow parent run {result.parent_run_id})")


def run_trace(args):
    from grainlab.boundaries.infer import load_model
    from grainlab.boundaries.tracing import trace_files

    params = with_postprocess_from(params_from(args), args.postprocess)
    pixel_size = check_pixel_size(args.pixel_size)  # before anything is read or written
    model = load_model(args.model)
    print(describe_postprocess(model, params.boundaries))
    rows = trace_files(
        model,
        [Path(p) for p in args.images],
        Path(args.out),
        params.boundaries,
        pixel_size,
        params.data.max_image_pixels,
    )
    for row in rows:
        g = f", ASTM G {row['astm_g']:.2f}" if row["astm_g"] is not None else ""
        print(f"{row['image']}: {row['count']} grains, mean diameter {row['mean_diameter_px']:.1f} px{g}")
    print(f"wrote {args.out}")


def run_evaluate(args):
    from grainlab.boundaries.evaluate import baseline_tracer, model_tracer, score_items, summarise
    from grainlab.boundaries.infer import load_model
    from grainlab.boundaries.train import test_items
    from grainlab.datasets.folder import load_test_set

    params = with_postprocess_from(params_from(args), args.postprocess)
    cfg = params.boundaries
    if args.dataset:
        return evaluate_regions(args, params)
    items = load_test_set(args.test_set) if args.test_set else test_items(params)
    if not items:
        raise GrainlabError("no test set found; run `grainlab data synth` or pass --test-set FOLDER")
    tracers = {"baseline": (baseline_tracer(cfg), "rgb" if cfg.unet.in_channels == 3 else "grey")}
    if args.model:
        model = load_model(args.model)
        print(describe_postprocess(model, cfg))
        tracers["model"] = (model_tracer(model, cfg), "rgb" if model.in_channels == 3 else "grey")
    scores = {
        name: summarise(score_items(t, items, ch, cfg.tolerance_px)) for name, (t, ch) in tracers.items()
    }
    keys = (
        "boundary_f1",
        "dice",
        "iou",
        "vi",
        "adapted_rand",
        "count_error",
        "diameter_error",
        "ks",
        "heyn_error",
        "astm_g_diff",
        "orphan_fraction",
    )
    print(f"{'':10s}" + "".join(f"{k:>15s}" for k in keys))
    for name, s in scores.items():
        print(f"{name:10s}" + "".join(f"{s[k]:15.3f}" for k in keys))
    if args.out:
        from grainlab.images import write_json

        write_json(Path(args.out), {f"{n}/{k}": v for n, s in scores.items() for k, v in s.items()})


def evaluate_regions(args, params):
    from grainlab.boundaries.evaluate import baseline_tracer, model_tracer, score_validation_regions
    from grainlab.boundaries.infer import load_model
    from grainlab.boundaries.train import dataset_root
    from grainlab.datasets.folder import load_dataset, split_by_region
    from grainlab.images import write_json

    cfg = params.boundaries
    if not args.model:
        raise GrainlabError("evaluate --dataset needs --model (a checkpoint or MLflow URI)")
    model = load_model(args.model)
    print(describe_postprocess(model, cfg))
    channels = "rgb" if model.in_channels == 3 else "grey"
    dataset = load_dataset(dataset_root(params, args.dataset))
    _, val = split_by_region(dataset.pairs, cfg.val_fraction, params.seed)
    flat = {}
    for name, tracer in (("baseline", baseline_tracer(cfg)), ("model", model_tracer(model, cfg))):
        regions = score_validation_regions(tracer, val, channels, cfg.tolerance_px)
        for region, s in regions.items():
            print(
                f"{name:9s} region {region:>6s}: {s['images']:.0f} images, boundary F1 {s['boundary_f1']:.3f}, "
                f"Heyn intercept {s['heyn_pred_px']:.1f} px vs {s['heyn_true_px']:.1f} px by hand "
                f"({100 * s['heyn_error']:+.1f}%)"
            )
            flat.update({f"{name}/{region}/{k}": v for k, v in s.items()})
        mean_abs = float(np.mean([abs(s["heyn_error"]) for s in regions.values()]))
        print(f"{name:9s} mean |Heyn error| over {len(regions)} validation regions: {100 * mean_abs:.1f}%")
        flat[f"{name}/heyn_abs_error"] = mean_abs
    if args.out:
        write_json(Path(args.out), flat)


def run_study(args):
    from grainlab.boundaries.study import run_study as study
    from grainlab.boundaries.study import run_study_workers

    params = params_from(args)
    metrics = Path(args.metrics) if args.metrics else None
    shared = args.workers_join or args.storage or args.study
    if shared and not (args.workers_join or args.from_runs):
        raise GrainlabError(
            "--storage and --study name the workers' shared study: add --workers-join to train its runs, "
            "or --from-runs to report on them"
        )
    if shared:
        path = run_study_workers(
            params,
            Path(args.out),
            Path(args.runs),
            storage=args.storage,
            study_name=args.study,
            join=args.workers_join and not args.from_runs,
            log_models=args.log_models,
            metrics_path=metrics,
            echo=lambda msg: print(msg, flush=True),
        )
        if path is None:
            return
    else:
        path = study(
            params,
            Path(args.out),
            Path(args.runs),
            log_models=args.log_models,
            train=not args.from_runs,
            metrics_path=metrics,
        )
    print(path.read_text().split("## Test metrics")[0].strip())
    print(f"wrote {path}")


def run_losses(args):
    from grainlab.boundaries.losses import loss_names, search_space

    for name in loss_names():
        print(f"{name:14s} {json.dumps(search_space(name))}")
