"""Optuna studies: search spaces from the registries, nested MLflow runs, exported best params,
and several workers sharing one PostgreSQL study (a killed worker's trial is failed and retried)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from grainlab.boundaries.losses import loss_names, search_space
from grainlab.config import load_params
from grainlab.errors import GrainlabError
from grainlab.tuning import run_study, suggest_boundaries, suggest_recognition
from test_boundaries_fixtures import write_data_root

TINY = [
    "boundaries.unet.base_channels=4",
    "boundaries.unet.depth=2",
    "boundaries.crop_px=32",
    "boundaries.batch_size=4",
    "boundaries.val_max_images=1",
    "boundaries.test_max_images=1",
    "boundaries.tile_px=64",
    "tuning.boundaries.dataset=toy",
    "tuning.boundaries.epochs=2",
    "tuning.boundaries.samples_per_epoch=8",
    "tuning.boundaries.losses=[bce, focal, tversky]",
]
PG_URL = "postgresql://postgres@127.0.0.1:5432"


def test_boundary_space_comes_from_the_loss_registry():
    params = load_params(None, ["tuning.boundaries.datasets=[grae, gong]"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(40):
        trial = study.ask()
        overrides = suggest_boundaries(trial, params)
        loss = overrides["boundaries.loss"]
        seen[loss] = set(trial.params)
        study.tell(trial, 0.0)
        assert {k for k in overrides if k.startswith("boundaries.loss_args.")} == {
            f"boundaries.loss_args.{loss}.{arg}" for arg in search_space(loss)
        }
        assert overrides["dataset"] in ("grae", "gong")
    assert set(seen) == set(loss_names())
    assert seen["focal"] == {"loss", "lr", "focal.alpha", "focal.gamma", "dataset"}  # only with focal
    assert seen["bce"] == {"loss", "lr", "dataset"}


def test_recognition_space():
    trial = optuna.create_study().ask()
    overrides = suggest_recognition(trial, load_params(None))
    assert set(trial.params) == {"margin", "none_percentile", "gmm_components", "lr", "descriptor_dim"}
    assert overrides["recognition.descriptor_dim"] in (2, 3, 4)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    write_data_root(tmp_path / "data")
    return tmp_path


def test_local_study_nests_runs_and_exports_best_params(workdir):
    from mlflow import MlflowClient

    params = load_params(None, [*TINY, "tuning.boundaries.n_trials=3", "tuning.pruner=none"])
    result = run_study("boundaries", params, metrics_path=workdir / "tuning.json")
    assert result.counts["complete"] == 3
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert len({t["number"] for t in summary["trials"]}) == len(summary["trials"])
    best = load_params(result.out_dir / "best_params.yaml")  # params.yaml's shape, loadable as such
    assert best.boundaries.loss == result.best_overrides["boundaries.loss"]
    assert json.loads((workdir / "tuning.json").read_text())["complete"] == 3
    assert (result.out_dir / "optimization_history.png").is_file()

    client = MlflowClient()
    exp = client.get_experiment_by_name("optuna-boundaries-demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    run_ids = json.loads((result.out_dir / "run.json").read_text())
    assert set(run_ids["trials"].values()) == {r.info.run_id for r in children}
    assert run_ids["parent"] == parents[0].info.run_id
    assert all(r.info.status == "FINISHED" and "val/boundary_f1" in r.data.metrics for r in children)
    # Running the finished study again adds no trial.
    again = run_study("boundaries", params)
    assert again.counts["complete"] == 3


def test_failed_trial_is_recorded_and_the_study_goes_on(workdir, monkeypatch):
    from mlflow import MlflowClient

    from grainlab.boundaries import train as train_mod

    real = train_mod.make_loss
    calls = {"n": 0}

    def diverging_once(name, **kw):
        calls["n"] += 1
        loss = real(name, **kw)
        if calls["n"] == 1:
            return lambda logits, target: loss(logits, target) * float("nan")
        return loss

    monkeypatch.setattr(train_mod, "make_loss", diverging_once)
    params = load_params(None, [*TINY, "tuning.boundaries.n_trials=2", "tuning.pruner=none"])
    result = run_study("boundaries", params)
    assert result.counts["fail"] == 1 and result.counts["complete"] == 2
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("optuna-boundaries-demo").experiment_id]
    )
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and "diverged" in failed[0].data.tags["failure_reason"]


def test_a_worker_whose_trial_was_taken_over_goes_on(workdir, monkeypatch):
    """A worker too slow to send heartbeats finds its trial failed by another worker (to be
    retried there): it drops its result and goes on instead of dying."""
    from grainlab import tuning

    calls = []

    def taken_over_once(trial, params, context):
        calls.append(trial.number)
        if len(calls) == 1:  # what another worker does to a trial whose heartbeat is stale
            trial.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return 0.5

    monkeypatch.setitem(tuning.OBJECTIVES, "boundaries", taken_over_once)
    params = load_params(None, [*TINY, "tuning.boundaries.n_trials=2", "tuning.pruner=none"])
    result = run_study("boundaries", params)
    assert result.counts["fail"] == 1 and result.counts["complete"] == 2 and len(calls) == 3


def test_bad_storage_url_is_a_clear_error(workdir):
    params = load_params(None, TINY)
    with pytest.raises(GrainlabError, match="expected a database URL"):
        run_study("boundaries", params, storage="redis://user:secret@host/0")
    with pytest.raises(GrainlabError) as err:
        run_study("boundaries", params, storage="postgresql://user:secret@127.0.0.1:1/none")
    assert "secret" not in str(err.value) and "***" in str(err.value)


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


postgres = pytest.mark.skipif(
    not _postgres_answers(), reason="no PostgreSQL server answers at 127.0.0.1:5432"
)


@pytest.fixture
def pg_databases():
    """Two fresh, empty databases: one for the Optuna study, one for the shared MLflow store.
    The workers set both schemas up themselves, as they would on a new lab server."""
    import psycopg

    names = [f"grainlab_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("optuna", "mlflow")]
    with psycopg.connect(f"{PG_URL}/test", autocommit=True) as conn:
        for name in names:
            conn.execute(f"CREATE DATABASE {name}")
        yield [f"{PG_URL}/{name}" for name in names]
        for name in names:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _worker(workdir: Path, storage: str, mlflow_url: str, study: str, n_trials: int, *extra):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url}
    cmd = [
        Path(sys.executable).parent / "grainlab",
        "tune",
        "boundaries",
        "--params",
        str(workdir / "params.yaml"),
        "--storage",
        storage,
        "--study",
        study,
        "--n-trials",
        str(n_trials),
    ]
    # A live worker's heartbeat may stall for seconds on a loaded 2-core machine: the grace period
    # is long here, and short only where a killed worker must be detected (extra overrides it).
    for o in (*TINY, "tuning.pruner=none", "tuning.heartbeat_s=1", "tuning.grace_s=30", *extra):
        cmd += ["--set", o]
    return subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _check_trials_and_runs(storage: str, mlflow_url: str, study: str, n_trials: int):
    from mlflow import MlflowClient

    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= n_trials
    assert len({t.number for t in trials}) == len(trials)  # no trial duplicated
    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name(f"optuna-{study}")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    for t in finished:  # every finished trial has its own finished MLflow run
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["optuna_trial"] == str(t.number)
    assert len({t.user_attrs["mlflow_run_id"] for t in finished}) == len(finished)
    return trials


@postgres
def test_two_workers_share_one_postgres_study(workdir, pg_databases):
    storage, mlflow_url = pg_databases
    (workdir / "params.yaml").write_text("profile: demo\n")
    study = "shared"
    workers = [_worker(workdir, storage, mlflow_url, study, 4) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = _check_trials_and_runs(storage, mlflow_url, study, 4)
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) <= 5  # at most one extra from the race


@postgres
@pytest.mark.load
@pytest.mark.parametrize("repeat", range(10))
def test_four_workers_starting_together_on_an_empty_database(workdir, pg_databases, repeat):
    """The schema race (DuplicateTable, IntegrityError, ...) of workers starting at the same
    instant on a new database: every worker exits 0, no trial is lost or duplicated, and every
    finished trial has its own finished MLflow run."""
    storage, mlflow_url = pg_databases
    (workdir / "params.yaml").write_text("profile: demo\n")
    study = f"race-{repeat}"
    workers = [
        _worker(workdir, storage, mlflow_url, study, 4, "tuning.boundaries.epochs=1") for _ in range(4)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = _check_trials_and_runs(storage, mlflow_url, study, 4)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)  # none lost mid-way


@postgres
def test_killed_worker_trial_is_failed_and_retried(workdir, pg_databases):
    storage, mlflow_url = pg_databases
    (workdir / "params.yaml").write_text("profile: demo\n")
    study = "killed"
    slow, grace = "tuning.boundaries.epochs=30", "tuning.grace_s=3"
    victim = _worker(workdir, storage, mlflow_url, study, 2, slow, grace)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            running = optuna.load_study(study_name=study, storage=storage).get_trials(
                states=(TrialState.RUNNING,)
            )
        except KeyError:
            running = []
        if running and running[0].intermediate_values:  # mid-trial: an epoch is done
            break
        time.sleep(0.5)
    else:
        victim.kill()
        pytest.fail(f"the first worker never started a trial:\n{victim.communicate()[0]}")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_number = running[0].number
    time.sleep(4)  # past the grace period: the trial's heartbeat is stale

    survivor = _worker(workdir, storage, mlflow_url, study, 2, grace)
    out = survivor.communicate(timeout=300)[0]
    assert survivor.returncode == 0, out
    trials = _check_trials_and_runs(storage, mlflow_url, study, 2)
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1 and retries[0].params == killed.params
