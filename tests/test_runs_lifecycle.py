"""MLflow runs end in the state that says what happened, and trackers fail fast (issue 15):
SIGTERM ends a run KILLED; a run whose process was SIGKILLed before its first checkpoint is
marked FAILED by `grainlab runs reap` and by the next run's start; an unreachable tracking
server or Optuna storage is one line within seconds; no credential form is ever printed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grainlab import urls
from grainlab.boundaries.train import read_run_id
from grainlab.errors import GrainlabError
from test_reliability import KILL_RUN, sets

GRAINLAB = Path(sys.executable).parent / "grainlab"
# One long first epoch: the process is inside it, before any checkpoint, for many seconds.
LONG_EPOCH = [*KILL_RUN, "boundaries.samples_per_epoch=4000"]


def _start_training(project: Path, tracking_uri: str, out: str):
    """A training process, returned with its MLflow run once it is inside epoch 1."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    cmd = [GRAINLAB, "boundaries", "train", "--dataset", "toy", "--loss", "bce", "--out", out]
    proc = subprocess.Popen(
        [*cmd, *sets(*LONG_EPOCH)], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while True:
        exp = client.get_experiment_by_name("grain-boundaries")
        runs = client.search_runs([exp.experiment_id], f"tags.pid = '{proc.pid}'") if exp else []
        if runs:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training never started its run:\n{proc.communicate()[0]}")
        time.sleep(0.2)
    time.sleep(1.0)  # into the epoch
    run_dir = project / out / "toy-bce"
    assert not (run_dir / "checkpoints" / "last.pt").exists() and read_run_id(run_dir) is None
    return proc, runs[0].info.run_id


def test_sigterm_ends_the_run_killed(project, tracking_uri):
    from mlflow import MlflowClient

    proc, run_id = _start_training(project, tracking_uri, "term")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "Traceback" not in out, out
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert "SIGTERM" in run.data.tags["stop_reason"]


def test_sigkill_before_the_first_checkpoint_is_reaped(project, tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    proc, run_id = _start_training(project, tracking_uri, "kill")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it

    reap = subprocess.run([GRAINLAB, "runs", "reap"], cwd=project, capture_output=True, text=True)
    assert reap.returncode == 0, reap.stderr
    assert run_id in reap.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "orphaned" in run.data.tags["failure_reason"]

    # A run of a live process is never reaped, by the verb or by another run's start.
    proc, live = _start_training(project, tracking_uri, "live")
    try:
        again = subprocess.run([GRAINLAB, "runs", "reap"], cwd=project, capture_output=True, text=True)
        assert live not in again.stdout and client.get_run(live).info.status == "RUNNING"
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize(
    "uri", ["postgresql://u:pw-secret@127.0.0.1:1/x", "http://u:pw-secret@127.0.0.1:1"], ids=["pg", "http"]
)
def test_unreachable_tracking_server_fails_fast_in_one_line(project, uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "GRAINLAB_CONNECT_TIMEOUT_S": "5"}
    cmd = [GRAINLAB, "boundaries", "train", "--dataset", "toy", "--loss", "bce", *sets(*KILL_RUN)]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60  # before: a raw traceback after 110 s, or a hang
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grainlab: error: cannot reach"), done.stderr
    assert "pw-secret" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "storage",
    [
        "postgresql://u@127.0.0.1:1/x?password=pw-secret",
        "postgresql://u:pw-secret@127.0.0.1:1/x",
        "postgresql://u@127.0.0.1:1/x?sslmode=disable&password=pw-secret",
    ],
)
def test_optuna_storage_password_never_printed(project, storage):
    env = {**os.environ, "GRAINLAB_OPTUNA_STORAGE": storage}
    done = subprocess.run(
        [GRAINLAB, "tune", "boundaries", "--n-trials", "1"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "cannot reach the Optuna storage" in done.stderr, done.stderr
    assert "pw-secret" not in done.stderr + done.stdout


def test_unencoded_password_is_refused_without_echoing_any_part_of_it(project):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "postgresql://u:p@ss/w0rd@127.0.0.1:5432/x"}
    done = subprocess.run([GRAINLAB, "runs", "reap"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "not percent-encoded" in done.stderr and "%40" in done.stderr
    for part in ("p@ss", "ss/", "w0rd"):
        assert part not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql://user:s3cr3t@host:5432/db", "s3cr3t"),
        ("postgresql://user:p@ss/w0rd@host/db", "w0rd"),
        ("postgresql://user@host/db?password=s3cr3t", "s3cr3t"),
        ("mysql://u@h/db?sslmode=require&PASSWORD=s3cr3t&x=1", "s3cr3t"),
        ("connection to server failed: host=h user=u password=s3cr3t dbname=x", "s3cr3t"),
        ("https://u:tok@mlflow.example/api?token=s3cr3t", "s3cr3t"),
    ],
)
def test_mask_url_hides_every_credential_form(text, secret):
    masked = urls.mask_url(text)
    assert secret not in masked and "***" in masked


def test_connect_timeout_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv(urls.TIMEOUT_ENV, "soon")
    with pytest.raises(GrainlabError, match="GRAINLAB_CONNECT_TIMEOUT_S = 'soon': expected seconds"):
        urls.timeout_s()
