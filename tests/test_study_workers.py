"""The boundary study shared by workers: each (dataset, loss, seed) run is a trial of an Optuna
grid study, claimed by one worker; a killed worker's run is retried; the report equals a
single-process study's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from grainlab.boundaries.study import run_study, run_study_workers, study_runs
from grainlab.config import ConfigError, load_params
from grainlab.errors import GrainlabError
from test_boundaries_cli import grainlab
from test_boundaries_fixtures import write_data_root
from test_boundaries_train import TINY
from test_tuning import pg_databases, postgres  # noqa: F401 (pg_databases is a fixture)

ONE_SEED = [*TINY, 'boundaries.study_datasets=["toy", "toy2"]', 'boundaries.study_losses=["bce"]']
STUDY = [*ONE_SEED, "boundaries.study_seeds=[0, 1]", "tuning.heartbeat_s=1"]
KEYS = ["toy/bce/seed-0", "toy/bce/seed-1", "toy2/bce/seed-0", "toy2/bce/seed-1"]
REPORT_FILES = ("study.json", "study.md", "poster_grid.png", "gsd-toy.png", "gsd-toy2.png")


def _project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_data_root(root / "data", datasets=("toy", "toy2"))
    (root / "params.yaml").write_text("profile: demo\n")
    return root


def _study(workdir: Path, mlflow_url: str, *args, grace_s: int = 30) -> subprocess.Popen:
    """`grainlab boundaries study` in a process with one torch thread, as workers on a shared machine run."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "OMP_NUM_THREADS": "1"}
    cmd = [Path(sys.executable).parent / "grainlab", "boundaries", "study", *args]
    cmd += ["--params", str(workdir / "params.yaml")]
    for o in (*STUDY, f"tuning.grace_s={grace_s}"):
        cmd += ["--set", o]
    return subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(*procs: subprocess.Popen) -> list[str]:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    return outputs


def _same_report(a: Path, b: Path):
    for name in REPORT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The report of the same study trained one run after another in one process."""
    root = _project(tmp_path_factory.mktemp("single"))
    _finish(_study(root, f"sqlite:///{root}/mlflow.db", "--out", "report"))
    report = json.loads((root / "report/study.json").read_text())
    # the means over seeds, and each run
    assert set(report) == {"baseline", "ceilings", "toy/bce", "toy2/bce", *KEYS}
    return root / "report"


def _trials_by_run(storage: str, study: str) -> tuple[list, dict]:
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    by_run = {}
    for t in trials:
        by_run.setdefault(t.user_attrs.get("grid_run"), []).append(t)
    return trials, by_run


def _each_run_complete_once(storage: str, mlflow_url: str, study: str) -> dict:
    """Every run has exactly one complete trial, and that trial's MLflow run is finished."""
    from mlflow import MlflowClient

    trials, by_run = _trials_by_run(storage, study)
    assert set(by_run) - {None} == set(KEYS)
    assert all(t.state == TrialState.PRUNED for t in by_run.get(None, []))  # a claim lost to a race
    complete = {k: [t for t in ts if t.state == TrialState.COMPLETE] for k, ts in by_run.items() if k}
    assert all(len(ts) == 1 for ts in complete.values()), complete
    client = MlflowClient(tracking_uri=mlflow_url)
    for key, (t,) in complete.items():
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == key.replace("/", "-")
        assert run.data.tags["boundary_study"] == study
    return by_run


@postgres
def test_two_workers_train_each_run_once_and_report_as_one_process(tmp_path, pg_databases, single):  # noqa: F811
    storage, mlflow_url = pg_databases
    workdir = _project(tmp_path)
    join = ("--workers-join", "--storage", storage, "--study", "pair", "--out", "report")
    outputs = _finish(*[_study(workdir, mlflow_url, *join) for _ in range(2)])
    by_run = _each_run_complete_once(storage, mlflow_url, "pair")
    assert all(t.state == TrialState.COMPLETE for k, ts in by_run.items() if k for t in ts)  # none retried
    assert all("wrote" in out for out in outputs)  # both saw the grid complete and wrote the same report
    _same_report(workdir / "report", single)
    # the report again, from the shared study, by a process that trains nothing
    _finish(
        _study(workdir, mlflow_url, "--from-runs", "--storage", storage, "--study", "pair", "--out", "again")
    )
    _same_report(workdir / "again", single)


@postgres
def test_killed_worker_run_is_retried_by_the_other(tmp_path, pg_databases, single):  # noqa: F811
    storage, mlflow_url = pg_databases
    workdir = _project(tmp_path)
    join = ("--workers-join", "--storage", storage, "--study", "killed", "--out", "report")
    victim = _study(workdir, mlflow_url, *join, grace_s=3)
    deadline = time.monotonic() + 180
    running = []
    while not running and time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
        except KeyError:  # not created yet
            trials = []
        running = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
        time.sleep(0.2)
    if not running:
        victim.kill()
        pytest.fail(f"the worker never started a run:\n{victim.communicate()[0]}")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    (killed,) = optuna.load_study(study_name="killed", storage=storage).get_trials(
        states=(TrialState.RUNNING,)
    )
    survivor = _study(workdir, mlflow_url, *join, grace_s=3)
    _finish(survivor)
    by_run = _each_run_complete_once(storage, mlflow_url, "killed")
    key = killed.user_attrs["grid_run"]
    first, retry = by_run[key]
    assert first.number == killed.number and first.state == TrialState.FAIL
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == killed.number
    _same_report(workdir / "report", single)


@pytest.fixture
def project(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(_project(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return tmp_path


def test_one_worker_on_the_local_journal_reports_as_run_study(project):
    params = load_params(None, ONE_SEED)
    assert study_runs(params) == [("toy", "bce", 0), ("toy2", "bce", 0)]
    with pytest.raises(GrainlabError, match=r"2 of 2 runs not finished: toy/bce/seed-0 \(waiting\)"):
        run_study_workers(params, project / "early", join=False)
    path = run_study_workers(params, project / "report", project / "runs")
    assert path == project / "report/study.md"
    assert (project / "outputs/tuning/study/journal.log").is_file()
    # the same runs, read back from their folders by the single-process study
    run_study(params, project / "single", project / "runs", train=False)
    _same_report(project / "report", project / "single")
    report = json.loads((project / "report/study.json").read_text())
    assert set(report) == {"baseline", "ceilings", "toy/bce", "toy2/bce"}  # one seed: the keys of old
    # a run folder trained again since (by another study) is not this study's run
    (project / "runs/toy-bce/run.json").write_text('{"run_id": "another"}')
    with pytest.raises(
        GrainlabError,
        match="toy-bce: holds MLflow run another, not .* that study 'boundary-study-demo' trained",
    ):
        run_study_workers(params, project / "report", project / "runs", join=False)


def test_bad_input_is_one_clear_line(project, capsys):
    with pytest.raises(ConfigError, match=r"study_seeds = \[1, 1\]: expected distinct seed offsets"):
        load_params(None, ["boundaries.study_seeds=[1, 1]"])
    assert (
        grainlab(
            "boundaries", "study", "--storage", "postgresql://u@127.0.0.1:1/db", "--params", "params.yaml"
        )
        == 2
    )
    assert "add --workers-join to train its runs, or --from-runs" in capsys.readouterr().out
    assert not (project / "reports").exists()
