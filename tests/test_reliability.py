"""Faults survived end to end (issue 6): a training process killed with SIGKILL and resumed,
full and read-only output folders, bad input through the CLI, and the security defaults.

The SIGKILL test runs the real `grainlab boundaries train` process. The file-system tests
mount a tiny or a read-only tmpfs in a private mount namespace (`unshare`), so no real disk
fills up and they work as root, where chmod 0o555 would not stop anything; where unshare is
not allowed they skip, and in-process tests that make the writer fail with ENOSPC still run.
"""

import base64
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from grainlab.boundaries.infer import read_checkpoint
from grainlab.boundaries.train import train_boundaries
from grainlab.config import load_params
from grainlab.cli import main
from test_boundaries_fixtures import write_data_root
from test_boundaries_train import TINY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GRAINLAB = BIN / "grainlab"


def sets(*overrides):
    return [x for kv in overrides for x in ("--set", kv)]


@pytest.fixture
def project(tmp_path, monkeypatch, tracking_uri):
    """A project folder with the toy boundary dataset and a demo params.yaml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    write_data_root(tmp_path / "data")
    (tmp_path / "params.yaml").write_text("profile: demo\n")
    return tmp_path


# --------------------------------------------------------------------------- SIGKILL, then --resume

# Three short epochs of a tiny U-Net; the test-set snapshot at the last epoch only.
KILL_RUN = [
    *TINY,
    "boundaries.unet.depth=2",
    "boundaries.epochs=3",
    "boundaries.snapshot_epochs=[3]",
    "boundaries.val_max_images=1",
    "boundaries.test_max_images=1",
]


def _train_cmd(out: str):
    return [str(GRAINLAB), "boundaries", "train", "--dataset", "toy", "--loss", "bce", "--out", out]


def _metric_history(run_id: str) -> dict:
    """{metric: {step: value}} of a run's model metrics (no timings, no system metrics)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    out = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith(("time/", "system/")):
            continue
        by_step: dict[int, set] = {}
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, set()).add(m.value)
        # an epoch logged again after the kill must have logged the same value
        assert all(len(v) == 1 for v in by_step.values()), (key, by_step)
        out[key] = {step: v.pop() for step, v in by_step.items()}
    return out


def _without_timings(history):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(project):
    import mlflow

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ckpt = project / "killed" / "toy-bce" / "checkpoints" / "last.pt"
    victim = subprocess.Popen(
        [*_train_cmd("killed"), *sets(*KILL_RUN)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while not ckpt.exists():  # the first epoch's checkpoint: the process is now in epoch 2
        if victim.poll() is not None or time.monotonic() > deadline:
            victim.kill()
            pytest.fail(f"training ended before its first checkpoint:\n{victim.communicate()[0].decode()}")
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL

    # The kill left a whole checkpoint of an unfinished run, and no finished outputs.
    state = read_checkpoint(ckpt)  # weights_only=True; a torn file would not load
    assert 1 <= state["epoch"] < 3 and len(state["history"]) == state["epoch"]
    assert not (ckpt.parent.parent / "metrics.json").exists()
    run_id = state["run_id"]
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # nobody ended it: the process died

    resumed = subprocess.run(
        [*_train_cmd("killed"), "--resume", *sets(*KILL_RUN)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "epoch 3, val/loss" in resumed.stdout and run_id in resumed.stdout
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.search_runs(experiment_names=["grain-boundaries"]).shape[0] == 1  # no second run

    # The same run uninterrupted, with the same params.yaml and overrides as the CLI's.
    train_boundaries(
        load_params("params.yaml", KILL_RUN), "toy", "bce", out_root=Path("full"), log_model=False
    )
    full = read_checkpoint(project / "full" / "toy-bce" / "checkpoints" / "last.pt")
    done = read_checkpoint(ckpt)
    assert done["epoch"] == full["epoch"] == 3
    assert done["model"].keys() == full["model"].keys()
    assert all(torch.equal(done["model"][k], full["model"][k]) for k in full["model"])
    opt_a, opt_b = done["optimizer"]["state"], full["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_b for k in opt_b[i])
    # exactly equal, NaN (an undefined metric of an empty tracing) matching NaN
    np.testing.assert_equal(_without_timings(done["history"]), _without_timings(full["history"]))
    np.testing.assert_equal(_metric_history(run_id), _metric_history(full["run_id"]))
    np.testing.assert_equal(
        json.loads((ckpt.parent.parent / "metrics.json").read_text()),
        json.loads((project / "full" / "toy-bce" / "metrics.json").read_text()),
    )
