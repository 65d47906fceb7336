"""Training: determinism, resume, outputs, MLflow records, divergence, the pyfunc model."""

import base64
import json

import numpy as np
import pytest
import torch

from grainlab import tracking
from grainlab.boundaries import train as train_mod
from grainlab.boundaries.infer import read_checkpoint
from grainlab.boundaries.train import train_boundaries
from grainlab.config import load_params
from grainlab.errors import GrainlabError
from test_boundaries_fixtures import write_data_root

TINY = [
    "boundaries.unet.base_channels=4",
    "boundaries.unet.depth=3",
    "boundaries.epochs=2",
    "boundaries.snapshot_epochs=[1, 2]",
    "boundaries.samples_per_epoch=8",
    "boundaries.crop_px=32",
    "boundaries.batch_size=4",
    "boundaries.workers=0",
    "boundaries.val_max_images=2",
    "boundaries.tile_px=64",
]


@pytest.fixture
def workdir(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    write_data_root(tmp_path / "data")
    return tmp_path


def params(*extra):
    return load_params(None, [*TINY, *extra])


def weights(out_dir):
    return read_checkpoint(out_dir / "checkpoints" / "last.pt")["model"]


def test_train_writes_outputs_and_mlflow_run(workdir):
    import mlflow

    result = train_boundaries(params(), "toy", "bce", out_root=workdir / "out", log_model=False)
    out = result.out_dir
    assert out == workdir / "out" / "toy-bce"
    for name in (
        "loss_curve.png",
        "history.csv",
        "metrics.json",
        "snapshots/epoch-001-probability.png",
        "snapshots/epoch-002-tracing.png",
        "checkpoints/last.pt",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val/loss", "val/boundary_f1", "val/vi", "test_e002/boundary_f1", "test_e001/vi"} <= set(metrics)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["dataset"] == "toy"
        and run.data.tags["loss"] == "bce"
        and run.data.tags["device"] == "cpu"
    )
    assert run.data.params["boundaries.unet.base_channels"] == "4"
    assert "val/boundary_f1" in run.data.metrics and "test/vi" in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    ckpt = read_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and json.loads((out / "run.json").read_text())["run_id"] == result.run_id
    assert ckpt["params"]["boundaries"]["unet"]["base_channels"] == 4
    # The UI opens the experiment on its runs table, and the Dataset column names the recipe.
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    assert dataset.name == "toy" and dataset.digest == tracking.data_md5()
    assert "time/epoch_s" in run.data.metrics


def test_dvc_outputs_are_byte_identical_across_identical_runs(workdir):
    """No epoch time or run id in what DVC hashes: the same code and params give the same dvc.lock."""
    runs = [train_boundaries(params(), "toy", "bce", out_root=workdir / r, log_model=False) for r in "ab"]
    assert runs[0].run_id != runs[1].run_id
    for name in ("checkpoints/last.pt", "history.csv", "metrics.json", "loss_curve.png"):
        a, b = ((r.out_dir / name).read_bytes() for r in runs)
        assert a == b, name


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(workdir, monkeypatch):
    import mlflow

    # the uninterrupted run loads data in 2 worker processes, the interrupted one in the main process
    full = train_boundaries(
        params("boundaries.workers=2"), "toy", "focal", out_root=workdir / "a", log_model=False
    )
    save = train_mod.save_checkpoint

    def crash_after_epoch_1(path, state):
        save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_boundaries(params(), "toy", "focal", out_root=workdir / "b", log_model=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    first_run = train_mod.read_run_id(workdir / "b" / "toy-focal")
    assert mlflow.get_run(first_run).info.status == "KILLED"
    resumed = train_boundaries(params(), "toy", "focal", out_root=workdir / "b", resume=True, log_model=False)
    assert resumed.run_id == first_run
    assert mlflow.get_run(first_run).info.status == "FINISHED"
    a, b = weights(full.out_dir), weights(resumed.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train/loss"] for h in full.history] == [h["train/loss"] for h in resumed.history]


def test_eval_every_validates_and_checkpoints_only_at_its_epochs(workdir, monkeypatch):
    import mlflow

    saved = []
    save = train_mod.save_checkpoint
    monkeypatch.setattr(
        train_mod, "save_checkpoint", lambda path, state: (saved.append(state["epoch"]), save(path, state))
    )
    p = params("boundaries.epochs=5", "boundaries.snapshot_epochs=[3]", "boundaries.eval_every=2")
    result = train_boundaries(p, "toy", "bce", out_root=workdir / "o", log_model=False)
    validated = [h["epoch"] for h in result.history if "val/loss" in h]
    assert validated == saved == [2, 3, 4, 5]  # every 2nd, the snapshot and the last
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(result.run_id, "val/loss")]
    assert steps == [2, 3, 4, 5]
    assert (result.out_dir / "loss_curve.png").is_file()


@pytest.mark.slow
def test_compiled_training_saves_plain_weights(workdir):
    # torch.compile wraps the network; checkpoints must still hold the plain module's keys
    p = params("boundaries.epochs=1", "boundaries.snapshot_epochs=[1]", "boundaries.compile=true")
    result = train_boundaries(p, "toy", "bce", out_root=workdir / "o", log_model=False)
    keys = list(weights(result.out_dir))
    assert keys and not any(k.startswith("_orig_mod") for k in keys)
    assert np.isfinite(result.history[0]["train/loss"]) and "val/boundary_f1" in result.history[0]


def test_resume_refuses_changed_params(workdir):
    train_boundaries(
        params("boundaries.epochs=1", "boundaries.snapshot_epochs=[1]"),
        "toy",
        "bce",
        out_root=workdir / "o",
        log_model=False,
    )
    with pytest.raises(GrainlabError, match=r"boundaries.lr: 0.005 -> 0.1"):
        train_boundaries(params("boundaries.lr=0.1"), "toy", "bce", out_root=workdir / "o", resume=True)


def test_nan_loss_stops_the_run_and_marks_it_failed(workdir, monkeypatch):
    import mlflow

    def nan_loss(name, **kw):
        return lambda logits, target: (logits * float("nan")).mean()

    monkeypatch.setattr(train_mod, "make_loss", nan_loss)
    with pytest.raises(GrainlabError, match="diverged.*epoch 1, step 0"):
        train_boundaries(params(), "toy", "bce", out_root=workdir / "o", log_model=False)
    runs = mlflow.search_runs(experiment_names=["grain-boundaries"], output_format="list")
    assert runs[0].info.status == "FAILED"
    assert "diverged" in runs[0].data.tags["failure_reason"]


def test_unknown_dataset_and_loss_are_clear_errors(workdir):
    with pytest.raises(GrainlabError, match="dataset 'nope'.*grainlab data synth"):
        train_boundaries(params(), "nope", "bce", out_root=workdir / "o")
    with pytest.raises(GrainlabError, match="unknown loss 'hinge'"):
        train_boundaries(params(), "toy", "hinge", out_root=workdir / "o")


def test_logged_pyfunc_model_serves_and_rejects_bad_input(workdir):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    result = train_boundaries(
        params("boundaries.epochs=1", "boundaries.snapshot_epochs=[1]"), "toy", "bce", out_root=workdir / "o"
    )
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    png = (workdir / "data/grain_boundaries/test/images/t000.png").read_bytes()
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(png).decode()], "pixel_size_nm": [2.0]}))
    assert list(out.columns) == [
        "probability_png",
        "tracing_png",
        "grain_count",
        "mean_diameter_px",
        "heyn_intercept_px",
        "astm_g",
    ]
    assert base64.b64decode(out["tracing_png"][0]).startswith(b"\x89PNG")
    with pytest.raises(MlflowException, match="not valid base64|not a readable image") as err:
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"hello").decode()]}))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="image"):
        model.predict(pd.DataFrame({"picture": ["x"]}))
    from grainlab.boundaries.infer import load_model

    loaded = load_model(f"runs:/{result.run_id}/model")
    assert np.isclose(loaded.epoch, 1)
    # --resume on the finished run continues it without logging the model a second time.
    p = params("boundaries.epochs=1", "boundaries.snapshot_epochs=[1]")
    again = train_boundaries(p, "toy", "bce", out_root=workdir / "o", resume=True)
    assert again.run_id == result.run_id
    experiment = mlflow.get_run(result.run_id).info.experiment_id
    logged = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert [m.source_run_id for m in logged].count(result.run_id) == 1
