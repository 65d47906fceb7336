"""End to end on a tiny library: train (MLflow tracked), classify, evaluate, and the pyfunc model."""

import argparse
import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from grainlab.cli import common_options
from grainlab.config import MicroConfig
from grainlab.datasets.microstructures import build_library
from grainlab.errors import GrainlabError
from grainlab.recognition import commands
from grainlab.recognition.predict import Recognizer

TINY = MicroConfig(
    image_px=72, quiz1_train=10, quiz1_quiz_known=3, quiz1_quiz_unknown=2, quiz2_train=6, quiz2_quiz=2
)
FAST = [
    "recognition.epochs=1",
    "recognition.steps_per_epoch=2",
    "recognition.crops_per_class=2",
    "recognition.crop_px=32",
    "recognition.crop_min_px=32",
    "recognition.crop_max_px=64",
    "recognition.widths=[8,16]",
    "recognition.gmm_crops_per_image=4",
    "recognition.gmm_components=1",
    "recognition.predict_crops=20",
    "recognition.eval_crops=20",
    "recognition.tasks=[quiz1]",
    "recognition.members=2",
]


def run_cli(argv):
    parser = argparse.ArgumentParser()
    groups = parser.add_subparsers(dest="group", required=True)
    commands.register(groups, common_options())
    args = parser.parse_args(argv)
    return args.func(args)


def settings():
    out = []
    for s in FAST:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    build_library(TINY, root / "data" / "microstructures", seed=0, workers=1)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    (root / "params.yaml").write_text("seed: 0\n")
    run_cli(["recognition", "train", *settings()])
    yield root
    mp.undo()


def test_train_writes_models_metrics_and_mlflow_runs(trained):
    import mlflow

    for name in ("quiz1", "quiz1-nomag"):
        assert (trained / "outputs/recognition" / name / "model.pt").is_file()
        assert (trained / "outputs/recognition" / name / "gmm.json").is_file()
    assert (trained / "outputs/recognition/train_metrics.json").is_file()
    runs = mlflow.search_runs(experiment_names=["microstructure-recognition"])
    assert set(runs["tags.mlflow.runName"]) == {"quiz1", "quiz1-nomag"}
    assert (runs["status"] == "FINISHED").all()
    assert "metrics.train/triplet_loss" in runs and "params.recognition.margin" in runs
    rec = Recognizer.load(trained / "outputs/recognition/quiz1", "cpu")  # weights_only=True inside
    assert rec.labels[-1] == "none" and rec.px_per_um_range[0] >= 1.0
    assert len(rec.nets) == len(rec.gmms) == 2
    members = mlflow.get_run(runs.loc[runs["tags.mlflow.runName"] == "quiz1", "run_id"].iloc[0]).data.metrics
    assert members["train/member"] == 1  # the last epoch logged was the second member's


def test_classify_prints_distribution_and_writes_overlay(trained, capsys):
    image = next((trained / "data/microstructures/quiz1/quiz").glob("*.png"))
    run_cli(["recognition", "classify", str(image), "--px-per-um", "5000", "--out", "sal.png", *settings()])
    out = capsys.readouterr().out
    assert "answer:" in out and "none" in out and "outside the trained range" in out
    assert (trained / "sal.png").stat().st_size > 1000


@pytest.mark.parametrize("px", ["0", "-3", "nan"])
def test_classify_refuses_bad_magnification(trained, px):
    image = next((trained / "data/microstructures/quiz1/quiz").glob("*.png"))
    with pytest.raises(GrainlabError, match="--px-per-um"):
        run_cli(["recognition", "classify", str(image), "--px-per-um", px, *settings()])


def test_classify_refuses_unreadable_and_tiny_images(trained):
    (trained / "junk.png").write_bytes(b"not an image")
    with pytest.raises(GrainlabError, match="junk.png"):
        run_cli(["recognition", "classify", "junk.png", "--px-per-um", "3", *settings()])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(trained / "tiny.png")
    with pytest.raises(GrainlabError, match="tiny.png: 10x10 pixels is smaller"):
        run_cli(["recognition", "classify", "tiny.png", "--px-per-um", "3", *settings()])


def test_evaluate_reports_quiz_metrics_and_figures(trained):
    import json

    from mlflow import MlflowClient

    run_cli(["recognition", "evaluate", *settings()])
    metrics = json.loads((trained / "reports/recognition/metrics.json").read_text())
    # The quiz scores also reach the model's training run, where the registry looks for them.
    train_run = json.loads((trained / "outputs/recognition/quiz1/run.json").read_text())["run_id"]
    assert MlflowClient().get_run(train_run).data.metrics["quiz/accuracy"] == metrics["quiz1/quiz_accuracy"]
    for key in (
        "quiz1/quiz_accuracy",
        "quiz1/closed_accuracy",
        "quiz1/open_set_auroc",
        "quiz1/open_set_auroc_p_none",
        "quiz1/oscr",
        "quiz1-nomag/quiz_accuracy",
    ):
        assert key in metrics
    for f in ("quiz_probabilities.csv", "confusion.png", "descriptors.png", "saliency_examples.png"):
        assert (trained / "reports/recognition/quiz1" / f).is_file()
    assert "quiz1-nomag" in (trained / "reports/recognition/comparison.md").read_text()


def _payload(img, px):
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()], "px_per_um": [px]})


def test_pyfunc_model_answers_and_refuses_bad_payloads(trained):
    from mlflow.exceptions import MlflowException

    from grainlab.serving import RecognitionModel

    class Context:
        artifacts = {"model_dir": str(trained / "outputs/recognition/quiz1")}

    model = RecognitionModel()
    model.load_context(Context())
    img = np.random.default_rng(0).random((80, 80))
    out = model.predict(None, _payload(img, 4.0), params={"n_crops": 10})
    assert out.loc[0, "answer"] in model.recognizer.labels
    assert out.filter(like="p_").sum(axis=1).iloc[0] == pytest.approx(1.0)
    bad = [
        _payload(img, 0.0),
        _payload(img, float("nan")),
        pd.DataFrame({"image": ["!!notbase64"], "px_per_um": [3.0]}),
        pd.DataFrame({"image": [base64.b64encode(b"xx").decode()], "px_per_um": [3.0]}),
        pd.DataFrame({"px_per_um": [3.0]}),
        _payload(np.zeros((8, 8)), 3.0),
    ]
    for payload in bad:
        with pytest.raises(MlflowException) as err:
            model.predict(None, payload, params={"n_crops": 10})
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"
