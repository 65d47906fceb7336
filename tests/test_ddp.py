"""`torchrun -m grainlab boundaries train`: DistributedDataParallel over 2 CPU processes (gloo).

Two processes train the weights of one process that splits each batch in 2 parts (SplitBatch,
what one process does on 2+ cores), rank 0 alone records one MLflow run and writes the outputs,
and a run whose processes were all SIGKILLed resumes with torchrun to the uninterrupted weights.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from grainlab.boundaries.infer import read_checkpoint
from grainlab.boundaries.train import read_run_id, train_boundaries
from grainlab.config import load_params
from test_boundaries_fixtures import write_data_root
from test_boundaries_train import TINY as TRAIN_TINY
from test_reliability import sets

# A global batch of 4 (2 crops per process), 2 steps per epoch, dropout on (the default 0.1).
TINY = [*TRAIN_TINY, "boundaries.test_max_images=1", "boundaries.calibrate=false"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tracking_uri):
    root = tmp_path_factory.mktemp("ddp")
    write_data_root(root / "data")
    (root / "params.yaml").write_text("profile: demo\n")
    return root


def torchrun(project: Path, tracking_uri: str, out: str, *overrides: str, resume=False) -> subprocess.Popen:
    """2 processes training the toy dataset under torchrun (a rendezvous on a free port), in
    their own process group; one intra-op thread each, as torchrun sets by default."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "grainlab", "boundaries", "train", "--dataset", "toy", "--loss", "bce", "--out", out]
    cmd += [*sets(*TINY, *overrides), *(["--resume"] if resume else [])]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd,
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    return out


def run_ids(tracking_uri: str) -> set[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("grain-boundaries")
    return {r.info.run_id for r in client.search_runs([exp.experiment_id])} if exp else set()


def weights(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def ddp_run(project, tracking_uri):
    """(run folder, the MLflow runs it made, its output) of an uninterrupted 2-process run."""
    before = run_ids(tracking_uri)
    out = finish(torchrun(project, tracking_uri, "ddp"))
    return project / "ddp" / "toy-bce", run_ids(tracking_uri) - before, out


def test_two_processes_train_the_weights_of_one_process_splitting_the_batch(ddp_run, project, monkeypatch):
    """Two processes compute what one process splitting each batch of 4 in 2 parts of 2 does:
    the same crops, the same BatchNorm statistics per part, the same dropout masks, gradients
    averaged over equal parts (halving is exact in floating point, and a sum of 2 does not depend
    on its order). So the parameters and the training losses are equal bit for bit. BatchNorm's
    running statistics agree to float rounding only: the processes average them once per epoch,
    the threads at every step (equal sums, rounded differently); they feed validation."""
    monkeypatch.chdir(project)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # 2 parts of the batch of 4 (cpu_parallel.cpu_parts)
    try:
        one = train_boundaries(
            load_params(None, TINY), "toy", "bce", out_root=project / "one", log_model=False
        )
    finally:
        torch.set_num_threads(threads)
    run_dir = ddp_run[0]
    a, b = weights(run_dir), weights(one.out_dir)
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(("running_mean", "running_var")):
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
        else:
            assert torch.equal(a[key], b[key]), key
    history = read_checkpoint(run_dir / "checkpoints" / "last.pt")["history"]
    assert [h["train/loss"] for h in history] == [h["train/loss"] for h in one.history]
    assert history[-1]["val/loss"] == pytest.approx(one.history[-1]["val/loss"], rel=1e-5)


def test_rank_zero_alone_records_one_mlflow_run(ddp_run, tracking_uri):
    from mlflow import MlflowClient

    run_dir, new_runs, out = ddp_run
    assert len(new_runs) == 1, new_runs
    (run_id,) = new_runs
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["batch_parts"] == "2"
    assert run.data.params["boundaries.batch_size"] == "4"
    steps = [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")]
    assert steps == [1, 2]  # logged once per epoch, not once per process
    assert read_run_id(run_dir) == run_id
    for name in ("metrics.json", "history.csv", "loss_curve.png", "snapshots/epoch-002-tracing.png"):
        assert (run_dir / name).is_file(), name
    assert out.count(f"(MLflow run {run_id})") == 2  # every process returns rank 0's result


def kill_job(proc: subprocess.Popen) -> str:
    """SIGKILL torchrun's process group and its workers (each in a session of its own); the output."""
    if proc.poll() is None:
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    return proc.communicate()[0]


def test_resume_after_killing_every_process(ddp_run, project, tracking_uri):
    """Killed after its first checkpoint, resumed with torchrun. The killed run is set to 40
    epochs with its next checkpoint at the 40th (epochs, eval_every and snapshot_epochs may
    change on --resume), so that it is surely killed before a second one; it resumes as the
    uninterrupted 2-epoch run."""
    from mlflow import MlflowClient

    before = run_ids(tracking_uri)
    run_dir = project / "killed" / "toy-bce"
    ckpt = run_dir / "checkpoints" / "last.pt"
    later = ["boundaries.epochs=40", "boundaries.eval_every=40", "boundaries.snapshot_epochs=[1]"]
    proc = torchrun(project, tracking_uri, "killed", *later)
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"training ended before its first checkpoint:\n{kill_job(proc)}")
        time.sleep(0.005)
    kill_job(proc)
    assert read_checkpoint(ckpt)["epoch"] == 1
    (run_id,) = run_ids(tracking_uri) - before

    out = finish(torchrun(project, tracking_uri, "killed", resume=True))
    assert run_ids(tracking_uri) - before == {run_id} and f"(MLflow run {run_id})" in out
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"
    a, b = weights(ddp_run[0]), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = read_checkpoint(ddp_run[0] / "checkpoints" / "last.pt")["history"]
    np.testing.assert_equal(read_checkpoint(ckpt)["history"], history)  # NaN (no grains traced) == NaN


def test_a_global_batch_that_does_not_split_is_refused_by_every_process(project, tracking_uri):
    proc = torchrun(project, tracking_uri, "bad", "boundaries.batch_size=5")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    error = "grainlab: error: boundaries.batch_size = 5: expected a multiple of the 2 torchrun processes"
    assert out.count(error) == 2, out
    assert not (project / "bad").exists()
