"""Issue 16: leave-sources-out cross-validation, post-processing calibrated in training and stored
in the checkpoint, and the image-border band."""

import json

import numpy as np
import pytest
import torch

from grainlab.boundaries.calibrate import calibrate_postprocess, truth_maps
from grainlab.boundaries.crossval import source_folds
from grainlab.boundaries.evaluate import model_tracer
from grainlab.boundaries.grains import Postprocess, trace_boundaries
from grainlab.boundaries.infer import load_model, read_checkpoint
from grainlab.boundaries.metrics import boundary_scores
from grainlab.boundaries.train import save_checkpoint, train_boundaries
from grainlab.config import load_params
from grainlab.errors import GrainlabError
from grainlab.images import read_image, read_mask, write_image
from test_boundaries_cli import grainlab, sets
from test_boundaries_fixtures import write_data_root, write_dataset
from test_boundaries_train import TINY


@pytest.fixture
def workdir(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    write_data_root(tmp_path / "data")
    write_dataset(tmp_path / "data/grain_boundaries/four", regions=4, per_region=2, seed=3)
    (tmp_path / "params.yaml").write_text("profile: demo\n")
    return tmp_path


def test_source_folds_deal_sorted_sources():
    assert source_folds(["c", "a", "d", "b", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    with pytest.raises(GrainlabError, match="--folds 6"):
        source_folds(["a", "b", "c", "d"], 6)
    with pytest.raises(GrainlabError, match="at least 3 sources"):
        source_folds(["a", "b"], 2)


def test_crossval_writes_tables_and_nested_mlflow_runs(workdir, capsys):
    import mlflow

    one_epoch = ("boundaries.epochs=1", "boundaries.snapshot_epochs=[1]")
    assert (
        grainlab(
            "boundaries", "crossval", "--dataset", "four", "--folds", "2", "--out", "cv", *sets(*one_epoch)
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "fold 0 (held out r000, r002)" in out and "fold 1 (held out r001, r003)" in out
    report = json.loads((workdir / "cv/crossval.json").read_text())
    rows = report["rows"]
    assert sorted((r["source"], r["method"]) for r in rows) == sorted(
        (f"r{i:03d}", m) for i in range(4) for m in ("model", "baseline")
    )
    for r in rows:
        assert r["images"] == 2 and 0 <= r["boundary_f1"] <= 1
        assert {"heyn_error", "astm_g_diff", "count_error"} <= set(r)
    for method in ("model", "baseline"):
        s = report["summary"][method]
        assert s["sources"] == 4
        f1 = [r["boundary_f1"] for r in rows if r["method"] == method]
        assert s["boundary_f1_mean"] == pytest.approx(np.mean(f1))
        assert s["boundary_f1_sd"] == pytest.approx(np.std(f1, ddof=1))
    # each fold trained only on the other fold's sources, and calibrated its post-processing there
    for fold in report["folds"]:
        assert not set(fold["train_sources"]) & set(fold["heldout_sources"])
        assert fold["postprocess_source"] == "checkpoint" and fold["postprocess"]["method"] in (
            "skeleton",
            "watershed",
        )
        ckpt = read_checkpoint(workdir / f"cv/folds/fold-{fold['fold']}/four-bce/checkpoints/last.pt")
        assert ckpt["postprocess"] == fold["postprocess"]
    md = (workdir / "cv/crossval.md").read_text()
    for i in range(4):
        assert md.count(f"| r{i:03d} |") == 2
    assert "| model | 4 |" in md and "| baseline | 4 |" in md
    # MLflow: one parent run with the summary, one nested finished run per fold with its test scores
    client = mlflow.MlflowClient()
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["model/boundary_f1_mean"] == pytest.approx(
        report["summary"]["model"]["boundary_f1_mean"]
    )
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert any(k.startswith("test/model/") and k.endswith("/boundary_f1") for k in c.data.metrics)
        assert "calibrated/boundary_f1" in c.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"crossval.json", "crossval.md"} <= artifacts
    # --reuse-folds: the same fold networks, calibrated again with a border band, nothing trained
    ckpt = workdir / "cv/folds/fold-0/four-bce/checkpoints/last.pt"
    before = read_checkpoint(ckpt)["model"]
    border = sets(*one_epoch, "boundaries.postprocess.border_px=2")

    def reuse(*extra):
        return grainlab(
            "boundaries",
            "crossval",
            "--dataset",
            "four",
            "--folds",
            "2",
            "--out",
            "cv",
            "--reuse-folds",
            *extra,
        )

    assert reuse(*border) == 0
    again = json.loads((workdir / "cv/crossval.json").read_text())
    assert again["parent_run_id"] != report["parent_run_id"]
    assert all(f["postprocess"]["border_px"] == 2 for f in again["folds"])
    assert all(torch.equal(before[k], v) for k, v in read_checkpoint(ckpt)["model"].items())
    # a network trained with other params is not reused
    other = sets(*one_epoch, "boundaries.lr=0.001")
    assert reuse(*other) == 2
    assert "cannot reuse" in capsys.readouterr().out


@pytest.fixture
def trained(workdir):
    result = train_boundaries(
        load_params(None, TINY), "toy", "bce", out_root=workdir / "out", log_model=False
    )
    image = workdir / "probe.png"
    write_image(image, read_image(workdir / "data/grain_boundaries/toy/images/r000-0.png", channels="grey"))
    return result.out_dir / "checkpoints/last.pt", image


def trace_cli(ckpt, image, out, *extra):
    assert (
        grainlab("boundaries", "trace", str(image), "--model", str(ckpt), "--out", out, *extra, *sets()) == 0
    )
    return read_mask(f"{out}/probe-tracing.png")


def test_calibrated_settings_are_stored_and_used_by_trace(workdir, trained, capsys):
    ckpt, image = trained
    state = read_checkpoint(ckpt)
    stored = state["postprocess"]
    assert set(stored) == set(Postprocess.__dataclass_fields__)
    assert 0 <= state["postprocess_calibration"]["boundary_f1"] <= 1
    assert load_model(ckpt).postprocess == stored
    capsys.readouterr()
    traced = trace_cli(ckpt, image, "a")
    said = capsys.readouterr().out
    assert "calibrated in training, from the checkpoint" in said and f"low={stored['low']}" in said
    # the tracing is the stored settings' tracing
    model = load_model(ckpt)
    params = load_params(None, TINY)
    expected = model_tracer(model, params.boundaries, Postprocess(**stored))(
        read_image(image, channels="grey")
    )
    assert np.array_equal(traced, expected.tracing)
    # change the stored thresholds: trace follows them
    state["postprocess"] = {**stored, "method": "skeleton", "low": 0.999, "high": 1.0}
    save_checkpoint(ckpt, state)
    assert not trace_cli(ckpt, image, "b").any()
    state["postprocess"] = {**stored, "method": "skeleton", "low": 0.0, "high": 0.0001, "dilate_px": 0}
    save_checkpoint(ckpt, state)
    assert trace_cli(ckpt, image, "c").sum() > traced.sum()
    # --postprocess params overrides them with the params' settings
    capsys.readouterr()
    params_tracing = trace_cli(ckpt, image, "d", "--postprocess", "params")
    assert "from the params" in capsys.readouterr().out
    from_params = model_tracer(model, params.boundaries, Postprocess())(read_image(image, channels="grey"))
    assert np.array_equal(params_tracing, from_params.tracing)


def test_checkpoint_without_calibration_traces_with_params(workdir, trained, capsys):
    ckpt, image = trained
    state = read_checkpoint(ckpt)
    del state["postprocess"], state["postprocess_calibration"]
    save_checkpoint(ckpt, state)
    assert load_model(ckpt).postprocess is None
    capsys.readouterr()
    skeleton = ("boundaries.postprocess.method=skeleton", "boundaries.postprocess.low=0.4")
    assert (
        grainlab("boundaries", "trace", str(image), "--model", str(ckpt), "--out", "o", *sets(*skeleton)) == 0
    )
    said = capsys.readouterr().out
    assert "from the params" in said and "method=skeleton" in said and "low=0.4" in said
    params = load_params(None, [*TINY, *skeleton])
    expected = model_tracer(load_model(ckpt), params.boundaries)(read_image(image, channels="grey"))
    assert np.array_equal(read_mask("o/probe-tracing.png"), expected.tracing)


def test_calibration_finds_the_threshold_between_true_and_false_lines():
    rng = np.random.default_rng(0)
    truth = np.zeros((64, 64), bool)
    truth[20:23, :] = truth[:, 40:43] = True  # hand lines 3 px wide
    spurious = np.zeros_like(truth)
    spurious[48:50, 4:60] = True  # longer than any spur the search prunes
    probs = []
    for _ in range(2):
        prob = rng.uniform(0, 0.05, truth.shape).astype(np.float32)
        prob[truth] = 0.55
        prob[spurious] = 0.35  # a false line: only a threshold above 0.35 drops it
        probs.append(prob)
    truths = truth_maps([truth, truth])
    post, report = calibrate_postprocess(probs, truths, Postprocess())
    assert report["boundary_f1"] > 0.97
    assert post.method == "watershed" or post.high > 0.35
    assert boundary_scores(trace_boundaries(probs[0], post), truths[0][0])["boundary_f1"] > 0.97
    bad = Postprocess(method="skeleton", low=0.2, high=0.3)
    assert (
        boundary_scores(trace_boundaries(probs[0], bad), truths[0][0])["boundary_f1"] < report["boundary_f1"]
    )
    # F1 minus |Heyn error|: never a larger Heyn error than the F1 objective's choice
    post_h, report_h = calibrate_postprocess(probs, truths, Postprocess(), objective="f1_heyn")
    assert abs(report_h["heyn_error"]) <= abs(report["heyn_error"]) + 1e-12
    assert report_h["boundary_f1"] <= report["boundary_f1"] + 1e-12
    with pytest.raises(ValueError, match="objective"):
        calibrate_postprocess(probs, truths, Postprocess(), objective="heyn")


def test_fast_f1_equals_the_metric():
    from grainlab.boundaries.calibrate import _near, fast_f1

    rng = np.random.default_rng(1)
    for tol in (0, 1, 2, 3):
        pred, truth = rng.random((40, 50)) < 0.05, rng.random((40, 50)) < 0.05
        expected = boundary_scores(pred, truth, tol)["boundary_f1"]
        assert fast_f1(pred, truth, _near(truth, tol), tol) == pytest.approx(expected)


def test_border_band_drops_a_scan_edge_but_keeps_lines_to_the_edge():
    prob = np.zeros((64, 64), np.float32)
    prob[:, 0:2] = 1.0  # a bright scan edge along the left border
    prob[31:34, :] = 1.0  # a real boundary running off both sides
    post = Postprocess(method="skeleton", low=0.5, high=0.5, dilate_px=0, spur_px=0)
    plain = trace_boundaries(prob, post)
    assert plain[5:25, :3].any()  # the edge became a boundary
    banded = trace_boundaries(prob, Postprocess(**{**post.__dict__, "border_px": 3}))
    assert not banded[5:25, :3].any() and not banded[40:60, :3].any()
    assert banded[30:35, 0].any() and banded[30:35, -1].any()  # the real line still reaches both edges


def test_dihedral_tta_averages_the_eight_views(workdir, trained):
    from grainlab.boundaries.infer import predict_logits, predict_probability_dihedral

    ckpt, image = trained
    model = load_model(ckpt)
    im = read_image(image, channels="grey")
    tta = predict_probability_dihedral(model, im, 64, 0.125, 8)
    total = np.zeros(im.shape, np.float32)
    for k in range(4):
        for flip in (False, True):
            view = np.rot90(im, k)
            view = view[:, ::-1] if flip else view
            logits = predict_logits(model, np.ascontiguousarray(view), 64, 0.125, 8)
            total += np.rot90(logits[:, ::-1] if flip else logits, -k)
    assert np.allclose(tta, torch.sigmoid(torch.from_numpy(total / 8)).numpy(), atol=1e-5)
