"""Optuna studies over the boundary and recognition models: the only module that imports Optuna.

A study lives in an Optuna storage: by default a local journal file (no server, safe for
several processes on one machine), or any RDB URL, e.g. PostgreSQL shared by workers on
many machines (`--storage` or GRAINLAB_OPTUNA_STORAGE). With an RDB storage each trial
sends heartbeats; a trial whose worker died is marked failed by the next worker and
retried (RetryHeartbeatStaleTrialCallback). Workers stop once the study holds n_trials finished
(complete or pruned) trials.

Each trial is an MLflow run nested under one parent run of the study, in the experiment
`optuna-<study>`; pruned trials end KILLED and failed ones FAILED, with the reason.

`run_grid` shares a fixed list of runs (the boundary study's dataset x loss x seed) among
workers the same way: one enqueued trial per run, claimed once, retried when its worker dies.

Objectives are validation metrics, never test-set ones:
- boundaries: `val/boundary_f1`, the F1 of traced boundary pixels (2 px tolerance) on the
  validation regions. It scores the tracing people use directly, and unlike VI it does not
  depend on the grain-labelling step being tuned at the same time.
- recognition: image accuracy on training images held out from the fit (stratified by
  class), predicted the way users predict (crop-averaged with the open-set GMM). The quiz
  sets stay untouched for evaluation.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from grainlab import tracking, urls
from grainlab.config import Params, apply_overrides, dump_yaml, nest
from grainlab.errors import GrainlabError
from grainlab.images import atomic_path, write_json

STORAGE_ENV = "GRAINLAB_OPTUNA_STORAGE"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PARENT_ATTR = "mlflow_parent_run_id"
RUN_FILE = "run.json"  # the MLflow run ids of the study and its trials

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats, their retry callback and the matplotlib plots are marked experimental in Optuna 5.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Pruned(tracking.RunStopped, optuna.TrialPruned):
    """A trial stopped by the pruner: an Optuna prune, and a KILLED (not FAILED) MLflow run."""


@dataclass(frozen=True)
class StudyResult:
    name: str
    best_value: float | None
    best_overrides: dict
    counts: dict[str, int]
    out_dir: Path


# --------------------------------------------------------------------------- search spaces


def _suggest(trial: optuna.Trial, name: str, spec: tuple):
    kind = spec[0]
    if kind == "float":
        return trial.suggest_float(name, spec[1], spec[2], log=len(spec) > 3 and spec[3] == "log")
    if kind == "int":
        return trial.suggest_int(name, spec[1], spec[2])
    if kind == "categorical":
        return trial.suggest_categorical(name, list(spec[1]))
    raise GrainlabError(
        f"search space of {name!r}: unknown kind {kind!r}; expected float, int or categorical"
    )


def suggest_boundaries(trial: optuna.Trial, params: Params) -> dict:
    """Loss type from the registry, that loss's own space (e.g. focal alpha, gamma), lr, maybe the recipe."""
    from grainlab.boundaries.losses import loss_names, search_space

    cfg = params.tuning.boundaries
    losses = list(cfg.losses) or loss_names()
    loss = trial.suggest_categorical("loss", losses)
    out = {
        "boundaries.loss": loss,
        "boundaries.epochs": cfg.epochs,
        "boundaries.snapshot_epochs": [cfg.epochs],
        "boundaries.samples_per_epoch": cfg.samples_per_epoch,
        "boundaries.lr": trial.suggest_float("lr", *cfg.lr, log=True),
    }
    for arg, spec in search_space(loss).items():
        out[f"boundaries.loss_args.{loss}.{arg}"] = _suggest(trial, f"{loss}.{arg}", spec)
    out["dataset"] = trial.suggest_categorical("dataset", list(cfg.datasets)) if cfg.datasets else cfg.dataset
    return out


def suggest_recognition(trial: optuna.Trial, params: Params) -> dict:
    """Triplet margin, GMM threshold percentile and components, lr, descriptor dimension."""
    cfg = params.tuning.recognition
    return {
        "recognition.margin": trial.suggest_float("margin", *cfg.margin),
        "recognition.none_percentile": trial.suggest_float("none_percentile", *cfg.none_percentile),
        "recognition.gmm_components": trial.suggest_int("gmm_components", *cfg.gmm_components),
        # the trial's own none_percentile and gmm_components, not train's held-out selection of them
        "recognition.holdout_fraction": 0.0,
        "recognition.lr": trial.suggest_float("lr", *cfg.lr, log=True),
        "recognition.descriptor_dim": trial.suggest_categorical("descriptor_dim", list(cfg.descriptor_dims)),
        "recognition.epochs": cfg.epochs,
        "recognition.members": cfg.members,
    }


# --------------------------------------------------------------------------- objectives


def _pruning_callback(trial: optuna.Trial, key: str):
    def on_epoch(epoch: int, metrics: dict):
        value = metrics.get(key)
        if value is None or not np.isfinite(value):
            return
        trial.report(float(value), epoch)
        if trial.should_prune():
            raise Pruned(f"pruned at epoch {epoch} with {key} = {value:.4f}")

    return on_epoch


def boundary_objective(trial: optuna.Trial, params: Params, context: dict) -> float:
    from grainlab.boundaries.train import train_boundaries

    overrides = suggest_boundaries(trial, params)
    dataset = overrides.pop("dataset")
    trial.set_user_attr("overrides", {**overrides, "boundaries.dataset": dataset})
    p = apply_overrides(params, overrides, f"trial {trial.number}")
    result = train_boundaries(
        p,
        dataset,
        out_root=context["out_dir"] / "trials" / f"trial-{trial.number:04d}",
        log_model=False,
        experiment=context["experiment"],
        parent_run_id=context["parent"],
        run_name=f"trial-{trial.number}",
        run_tags=_trial_tags(trial, context),
        on_epoch=_pruning_callback(trial, "val/boundary_f1"),
        on_run=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
    )
    return float(result.metrics["val/boundary_f1"])


def recognition_objective(trial: optuna.Trial, params: Params, context: dict) -> float:
    overrides = suggest_recognition(trial, params)
    trial.set_user_attr("overrides", overrides)
    p = apply_overrides(params, overrides, f"trial {trial.number}")
    with tracking.run(
        context["experiment"],
        run_name=f"trial-{trial.number}",
        parent_run_id=context["parent"],
        params=overrides,
        tags=_trial_tags(trial, context),
    ) as run:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        prune = _pruning_callback(trial, "neg_loss")

        def on_epoch(epoch, metrics):
            tracking.log_metrics(metrics, step=epoch)
            # The objective needs the fitted GMMs, so each epoch reports the negated triplet loss for pruning.
            prune(epoch, {"neg_loss": -metrics["train/triplet_loss"]})

        accuracy = validation_accuracy(p, on_epoch)
        tracking.log_metrics({"val/accuracy": accuracy})
    return accuracy


def validation_accuracy(params: Params, on_epoch=None) -> float:
    """Fit a recognizer on part of a task's training images; its crop-averaged accuracy on the rest."""
    from grainlab.recognition.select import holdout_split, predict_heldout
    from grainlab.recognition.train import load_images, train_recognizer

    cfg, tune = params.recognition, params.tuning.recognition
    data = load_images(Path(params.data.root) / "microstructures", tune.task, "train")
    fit, val = holdout_split(data.labels, len(data.classes), tune.val_fraction, params.seed)
    recognizer = train_recognizer(cfg, data.subset(fit), params.seed, on_epoch)
    preds = predict_heldout(recognizer, data, val, tune.eval_crops, cfg.batch_size, params.seed)
    return float(np.mean([p.answer == data.classes[data.labels[i]] for p, i in zip(preds, val, strict=True)]))


OBJECTIVES = {"boundaries": boundary_objective, "recognition": recognition_objective}


def _trial_tags(trial: optuna.Trial, context: dict) -> dict:
    return tracking.standard_tags(optuna_study=context["study"], optuna_trial=trial.number)


# --------------------------------------------------------------------------- studies


def storage_url(cli_value: str | None) -> str | None:
    return cli_value or os.environ.get(STORAGE_ENV) or None


def open_storage(url: str | None, params: Params, journal: Path):
    """The local journal file by default; an RDB URL (PostgreSQL, ...) with heartbeats and retries."""
    cfg = params.tuning
    if url is None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(journal)))
    if not url.startswith(("postgresql", "mysql", "sqlite")):
        raise GrainlabError(
            f"--storage {urls.mask_url(url)}: expected a database URL such as "
            "postgresql://user@host:5432/db (or leave it out for a local journal file)"
        )
    # Workers starting together on an empty database would race to create its tables: the first
    # one sets them up under an advisory lock while the others wait, then find them there.
    urls.reach(url, "the Optuna storage")
    with urls.schema_lock(url, "the Optuna storage"):
        try:
            return RDBStorage(
                url,
                heartbeat_interval=cfg.heartbeat_s,
                grace_period=cfg.grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
                engine_kwargs={"pool_pre_ping": True},
            )
        except Exception as exc:  # SQLAlchemy's many error types
            first = (str(exc).strip().splitlines() or [""])[0]
            raise GrainlabError(
                f"cannot open Optuna storage {urls.mask_url(url)}: {type(exc).__name__}: {urls.mask_url(first)}"
            ) from None


def _pruner(params: Params):
    name = params.tuning.pruner
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _open_study(name: str, storage, params: Params, shared: bool) -> tuple[optuna.Study, bool]:
    # Workers sharing a storage get different sampler seeds, so their random start-up differs.
    seed = params.seed + (os.getpid() if shared else 0)
    kw = dict(
        study_name=name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3),
        pruner=_pruner(params),
    )
    try:
        return optuna.create_study(direction="maximize", **kw), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kw), False


def _parent_run(study: optuna.Study, created: bool, experiment: str, timeout_s: float = 120) -> str:
    """The study's parent MLflow run: made by the worker that created the study, found by the others."""
    if created:
        run_id = tracking.create_run(
            experiment, study.study_name, tracking.standard_tags(optuna_study=study.study_name)
        )
        study.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    deadline = time.monotonic() + timeout_s
    while PARENT_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise GrainlabError(f"study {study.study_name!r}: no parent MLflow run after {timeout_s:.0f} s")
        time.sleep(0.5)
    return study.user_attrs[PARENT_ATTR]


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_study(
    kind: str,
    params: Params,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    out_dir: Path | None = None,
    metrics_path: Path | None = None,
) -> StudyResult:
    """Run trials of one study until it holds n_trials finished trials; export its results."""
    if kind not in OBJECTIVES:
        raise GrainlabError(f"unknown study kind {kind!r}; expected one of {sorted(OBJECTIVES)}")
    cfg = getattr(params.tuning, kind)
    n_trials = n_trials or cfg.n_trials
    name = study_name or f"{kind}-{params.profile}"
    out_dir = Path(out_dir or Path(params.tuning.out_dir) / kind)
    url = storage_url(storage)
    study, created = _open_study(
        name, open_storage(url, params, out_dir / "journal.log"), params, url is not None
    )
    experiment = f"optuna-{name}"
    context = {
        "study": name,
        "experiment": experiment,
        "out_dir": out_dir,
        "metrics_path": metrics_path,
        "parent": _parent_run(study, created, experiment),
    }
    objective = OBJECTIVES[kind]
    attempts = 0
    while _finished(study) < n_trials and attempts < 3 * n_trials:
        attempts += 1
        _optimize_one(study, lambda trial: objective(trial, params, context))
    return export_results(study, context, n_trials)


def _optimize_one(study: optuna.Study, objective):
    """Run one trial. A failed one (e.g. a diverged loss) is recorded as FAIL and the study goes on."""
    ran = []

    def run_one(trial):
        ran.append(trial.number)
        return objective(trial)

    try:
        study.optimize(run_one, n_trials=1, catch=(GrainlabError,))
    except (ValueError, AssertionError, optuna.exceptions.UpdateFinishedTrialError):
        # Optuna cannot record a trial that another worker already marked failed: this worker
        # was too slow to send its heartbeat (an overloaded machine), and the trial is retried
        # there. Its result is dropped and this worker goes on.
        if not ran or study.get_trials(deepcopy=False)[ran[-1]].state != TrialState.FAIL:
            raise
        print(
            f"{study.study_name}: trial {ran[-1]} was failed as stale by another worker; its retry counts",
            flush=True,
        )


# --------------------------------------------------------------------------- grids of fixed runs

GRID_ATTR = "grid"  # study user attr: the keys of its runs
GRID_RUN = "grid_run"  # trial user attr: the key of the run the trial trains


@dataclass(frozen=True)
class GridResult:
    parent: str  # the study's parent MLflow run
    run_ids: dict[str, str]  # key -> MLflow run id of the run's complete trial
    pending: dict[str, str]  # key -> state of the latest trial of each run not complete yet


def run_grid(
    name: str, keys: list[str], params: Params, run_one=None, *, storage=None, journal: Path, experiment: str
) -> GridResult:
    """A study whose trials are a fixed list of runs, one trial per key, shared by workers.

    The worker that creates the study enqueues one waiting trial per key; every worker then
    claims waiting trials (run_one(key, parent_run_id, on_run) trains one; on_run(run_id)
    records its MLflow run, which holds its metrics: a grid trial's value is 0) until none is left. With a database
    storage a worker also waits while other workers' trials run: a trial whose heartbeat goes
    stale (its worker was killed) is failed and retried (RetryHeartbeatStaleTrialCallback) by a
    worker still there. Without run_one, only reports the grid's state.
    """
    url = storage_url(storage)
    study, created = _open_study(name, open_storage(url, params, journal), params, url is not None)
    if created:
        study.set_user_attr(GRID_ATTR, list(keys))
        for key in keys:
            study.enqueue_trial({}, user_attrs={GRID_RUN: key})
    parent = _parent_run(study, created, experiment)  # set once the grid is enqueued
    if study.user_attrs.get(GRID_ATTR) != list(keys):
        raise GrainlabError(
            f"study {name!r} in {urls.mask_url(url or str(journal))} holds the runs "
            f"{study.user_attrs.get(GRID_ATTR)}, not {list(keys)}; use the same params or another study name"
        )

    def objective(trial: optuna.Trial) -> float:
        key = trial.user_attrs.get(GRID_RUN)
        if key is None:  # the last waiting run was claimed by another worker at the same instant
            raise optuna.TrialPruned("no run left to claim")
        run_one(key, parent, lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
        return 0.0

    while run_one is not None:
        with warnings.catch_warnings():  # experimental in Optuna 5 (pytest resets the module's filter)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats (journal file)
        states = {t.state for t in study.get_trials(deepcopy=False)}
        if TrialState.WAITING in states:
            _optimize_one(study, objective)
        elif TrialState.RUNNING in states and url is not None:
            time.sleep(params.tuning.heartbeat_s)
        else:
            break
    run_ids, latest = {}, {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get(GRID_RUN)
        if key is not None:
            latest[key] = t.state.name.lower()
            if t.state == TrialState.COMPLETE:
                run_ids[key] = t.user_attrs["mlflow_run_id"]
    return GridResult(parent, run_ids, {k: latest[k] for k in keys if k not in run_ids})


def export_results(study: optuna.Study, context: dict, n_trials: int) -> StudyResult:
    """best_params.yaml (params.yaml's shape), summary.json and the Optuna plots, also logged to MLflow."""
    out_dir: Path = context["out_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    best_overrides = dict(best.user_attrs.get("overrides", {})) if best else {}
    with atomic_path(out_dir / "best_params.yaml") as tmp:
        header = (
            f"# best trial of study {study.study_name!r}: #{best.number}, objective {best.value:.4f}\n"
            if best
            else "# no complete trial\n"
        )
        tmp.write_text(header + dump_yaml(nest(best_overrides)))
    summary = {
        "study": study.study_name,
        "n_trials": n_trials,
        "counts": counts,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": best.params if best else {},
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
            }
            for t in trials
        ],
    }
    write_json(out_dir / "summary.json", summary)
    # MLflow run ids differ between identical studies: they stay out of what DVC hashes (.dvcignore).
    runs = {
        "parent": context["parent"],
        "trials": {t.number: t.user_attrs.get("mlflow_run_id") for t in trials},
    }
    write_json(out_dir / RUN_FILE, runs)
    if context.get("metrics_path"):
        write_json(context["metrics_path"], {"best_value": summary["best_value"], **counts})
    plots = _write_plots(study, out_dir)
    parent = context["parent"]
    tracking.log_to_run(
        parent,
        metrics={"best_value": best.value} if best else {},
        artifacts=[out_dir / "best_params.yaml", out_dir / "summary.json", *plots],
    )
    return StudyResult(study.study_name, best.value if best else None, best_overrides, counts, out_dir)


def _write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = [("optimization_history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 1:
        plots.append(("param_importances.png", ovm.plot_param_importances))
    for filename, plot in plots:
        try:
            with warnings.catch_warnings():  # importances warn when few trials share a parameter
                warnings.simplefilter("ignore")
                ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. importances need parameters that vary across complete trials
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        with atomic_path(out_dir / filename) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
        written.append(out_dir / filename)
    return written
