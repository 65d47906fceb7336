"""The platform verbs: `grainlab tune`, `grainlab register`, `grainlab report`, `grainlab runs reap`."""

from __future__ import annotations

from pathlib import Path

from grainlab.cli import params_from


def register(groups, common):
    tune = groups.add_parser(
        "tune",
        parents=[common],
        help="Optuna search over the boundary or recognition model",
        description="Run an Optuna study until it holds N finished trials. Several `grainlab tune` processes "
        "(on one machine or many) share one study through --storage. Each trial is an MLflow run nested "
        "under the study's parent run. Writes best_params.yaml (params.yaml's shape), summary.json and plots.",
    )
    tune.add_argument("kind", choices=("boundaries", "recognition"))
    tune.add_argument(
        "--n-trials", type=int, default=None, help="finished trials to reach (default: tuning.KIND.n_trials)"
    )
    tune.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage, e.g. postgresql://user@host:5432/db (default: $GRAINLAB_OPTUNA_STORAGE, else a "
        "local journal file in the output folder)",
    )
    tune.add_argument("--study", default=None, help="study name (default: KIND-PROFILE)")
    tune.add_argument("--out", default=None, help="output folder (default: tuning.out_dir/KIND)")
    tune.add_argument(
        "--metrics", default=None, help="also write the best value and trial counts here (for DVC)"
    )
    tune.set_defaults(func=run_tune)

    reg = groups.add_parser(
        "register",
        parents=[common],
        help="register the best models and move the champion alias",
        description="Register the best boundary model and the best recognizer in the MLflow Model Registry as "
        "grain-boundary-unet and microstructure-recognizer. The alias `champion` moves only when the candidate "
        "beats the current champion on the held-out metric; otherwise the candidate becomes `challenger`.",
    )
    reg.add_argument(
        "--out", default="outputs/registry.json", help="registry state JSON (default: %(default)s)"
    )
    reg.set_defaults(func=run_register)

    rep = groups.add_parser(
        "report",
        parents=[common],
        help="write reports/index.html from the pipeline's outputs",
        description="Gather the poster study, the tuning results, the recognition figures and the registry "
        "state into reports/index.html.",
    )
    rep.add_argument("--out", default="reports", help="report folder (default: %(default)s)")
    rep.set_defaults(func=run_report)

    runs = groups.add_parser("runs", help="MLflow run housekeeping")
    runs_verbs = runs.add_subparsers(dest="verb", metavar="VERB", required=True)
    reap = runs_verbs.add_parser(
        "reap",
        help="mark FAILED the runs left RUNNING by processes of this host that are gone",
        description="A process killed with SIGKILL (or a crash, or a power cut) cannot end its MLflow run. "
        "Every run records its host and process; this marks FAILED, with the reason, each RUNNING run of this "
        "host whose process is gone. Starting any run does the same for its experiment.",
    )
    reap.set_defaults(func=run_reap)


def run_tune(args):
    from grainlab.tuning import run_study

    params = params_from(args)
    if args.n_trials is not None and args.n_trials < 1:
        from grainlab.errors import GrainlabError

        raise GrainlabError(f"--n-trials {args.n_trials}: expected a positive number of trials")
    result = run_study(
        args.kind,
        params,
        n_trials=args.n_trials,
        storage=args.storage,
        study_name=args.study,
        out_dir=Path(args.out) if args.out else None,
        metrics_path=Path(args.metrics) if args.metrics else None,
    )
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    print(f"study {result.name}: {counts}")
    if result.best_value is not None:
        print(f"best objective {result.best_value:.4f} with {result.best_overrides}")
    print(f"wrote {result.out_dir / 'best_params.yaml'} and {result.out_dir / 'summary.json'}")


def run_register(args):
    from grainlab.registry import register_best

    params = params_from(args)
    for line in register_best(params, Path(args.out)):
        print(line)


def run_report(args):
    from grainlab.report import write_report

    params = params_from(args)
    print(f"wrote {write_report(params, Path(args.out))}")


def run_reap(args):
    from grainlab.tracking import reap_orphans, tracking_uri
    from grainlab.urls import mask_url

    reaped = reap_orphans()
    for run_id in reaped:
        print(f"run {run_id}: marked FAILED (its process is gone)")
    print(f"{len(reaped)} orphaned run(s) in {mask_url(tracking_uri())}")
