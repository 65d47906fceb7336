"""Issue 18: the held-out selection inside `recognition train`, and `evaluate --seeds` on fresh quizzes."""

import hashlib
import json

import numpy as np
import pytest

from grainlab.datasets.microstructures import FRESH_SEED_BASE, build_library, build_quiz, fresh_seeds
from grainlab.errors import GrainlabError
from grainlab.recognition import train as train_module
from grainlab.recognition.evaluate import fpr_at_tpr
from grainlab.recognition.select import holdout_split
from test_recognition_cli import FAST, TINY, run_cli

SELECT = [s for s in FAST if not s.startswith("recognition.members")] + [
    "recognition.members=1",
    "recognition.ablation=false",
    "recognition.select_crops=8",
]


MICRO = [f"microstructures.{k}={getattr(TINY, k)}" for k in ("image_px", "quiz1_train", "quiz1_quiz_known")]
MICRO += [
    f"microstructures.{k}={getattr(TINY, k)}" for k in ("quiz1_quiz_unknown", "quiz2_train", "quiz2_quiz")
]


def settings():
    return [a for s in SELECT + MICRO for a in ("--set", s)]


def _library_digest(root):
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
            h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    build_library(TINY, root / "data" / "microstructures", seed=0, workers=1)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    (root / "params.yaml").write_text("seed: 0\n")
    read, fitted = [], []
    real_read, real_train = train_module.read_image, train_module.train_network

    def spy_read(path, *a, **kw):
        read.append(str(path))
        return real_read(path, *a, **kw)

    def spy_train(cfg, data, *a, **kw):
        fitted.append([e["file"] for e in data.entries])
        return real_train(cfg, data, *a, **kw)

    mp.setattr(train_module, "read_image", spy_read)
    mp.setattr(train_module, "train_network", spy_train)
    run_cli(["recognition", "train", *settings()])
    mp.setattr(train_module, "read_image", real_read)
    mp.setattr(train_module, "train_network", real_train)
    yield root, read, fitted
    mp.undo()


def test_train_never_reads_a_quiz_image_and_holds_images_out_of_the_fit(trained):
    root, read, fitted = trained
    assert read and all("/train/" in p for p in read)  # the quiz is never read during train
    selection = json.loads((root / "outputs/recognition/quiz1/gmm.json").read_text())["selection"]
    held = set(selection["holdout_images"])
    manifest = json.loads((root / "data/microstructures/manifest.json").read_text())
    train_files = {e["file"] for e in manifest["images"] if e["task"] == "quiz1" and e["split"] == "train"}
    assert held < train_files
    # one held-out image per class (2 training images each, 20 %, at least 1), none of them fitted
    assert sorted(f.split("_", 1)[1] for f in held) == sorted(f"{c}.png" for c in TINY_CLASSES)
    assert len(fitted) == 1 and held.isdisjoint(fitted[0]) and set(fitted[0]) | held == train_files


TINY_CLASSES = ("ferrite", "pearlite", "ferrite-pearlite", "martensite", "spheroidite")


def test_chosen_values_are_stored_and_follow_the_rule(trained):
    import mlflow

    root, _, _ = trained
    doc = json.loads((root / "outputs/recognition/quiz1/gmm.json").read_text())
    sel = doc["selection"]
    grid_c, grid_p = [1, 2, 3, 4, 6], [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0]
    assert sel["gmm_components"] in grid_c and sel["none_percentile"] in grid_p
    # the stored mixtures have the chosen component count
    assert all(len(w) == sel["gmm_components"] for m in doc["members"] for w in m["weights"])
    # 4 fitting crops per class: 6 components cannot be fitted and is skipped
    assert [c["gmm_components"] for c in sel["candidates"]] == [1, 2, 3, 4]
    for c in sel["candidates"]:  # the largest percentile within the false-"none" target, else the smallest
        assert c["false_none"] <= sel["false_none_target"] or c["none_percentile"] == grid_p[0]
    assert sel["accuracy"] == max(c["accuracy"] for c in sel["candidates"])
    runs = mlflow.search_runs(experiment_names=["microstructure-recognition"])
    run = runs.loc[runs["tags.mlflow.runName"] == "quiz1"].iloc[0]
    assert int(run["params.selected.gmm_components"]) == sel["gmm_components"]
    assert float(run["params.selected.none_percentile"]) == sel["none_percentile"]
    assert run["metrics.select/heldout_accuracy"] == pytest.approx(sel["accuracy"])


def test_holdout_split_is_stratified_disjoint_and_reproducible():
    labels = np.repeat(np.arange(3), [10, 5, 2])
    fit, held = holdout_split(labels, 3, 0.2, seed=7)
    assert np.bincount(labels[held]).tolist() == [2, 1, 1]
    assert set(fit).isdisjoint(held) and len(fit) + len(held) == len(labels)
    assert np.array_equal(held, holdout_split(labels, 3, 0.2, seed=7)[1])
    with pytest.raises(GrainlabError, match="holdout_fraction"):
        holdout_split(np.array([0, 1, 1]), 2, 0.2, seed=0)


def test_evaluate_seeds_reports_mean_sd_and_per_quiz_rows_without_touching_the_library(trained, capsys):
    root, _, _ = trained
    before = _library_digest(root / "data/microstructures")
    run_cli(["recognition", "evaluate", "--seeds", "2", "--quiz-dir", str(root / "fresh"), *settings()])
    assert _library_digest(root / "data/microstructures") == before
    metrics = json.loads((root / "reports/recognition/metrics.json").read_text())
    seeds = sorted({int(k.split("/")[1].removeprefix("fresh_seed")) for k in metrics if "/fresh_seed" in k})
    assert seeds == [FRESH_SEED_BASE, FRESH_SEED_BASE + 1]
    assert metrics["quiz1/fresh_quizzes"] == 2
    for k in ("quiz_accuracy", "open_set_auroc", "oscr", "fpr95"):
        per = [metrics[f"quiz1/fresh_seed{s}/{k}"] for s in seeds]
        assert metrics[f"quiz1/fresh_mean/{k}"] == pytest.approx(np.mean(per))
        assert metrics[f"quiz1/fresh_sd/{k}"] == pytest.approx(np.std(per, ddof=1))
    for s in seeds:  # a fresh quiz has the library quiz's classes and counts, with new images
        fresh = json.loads((root / f"fresh/seed{s}/manifest.json").read_text())
        assert fresh["seed"] == s and {e["split"] for e in fresh["images"]} == {"quiz"}
        assert len(fresh["images"]) == TINY.quiz1_quiz_known + TINY.quiz1_quiz_unknown
    out = capsys.readouterr().out
    assert "fresh_quizzes" not in out and "±" in out and f"{FRESH_SEED_BASE + 1}:" in out


def test_fresh_quiz_seeds_must_be_unused(trained):
    with pytest.raises(GrainlabError, match="unused seeds"):
        fresh_seeds(3, {0, 1, 5}, first=4)
    with pytest.raises(GrainlabError, match=r"\[0\]"):  # 0 is the library's and the training seed
        run_cli(["recognition", "evaluate", "--seeds", "1", "--first-seed", "0", *settings()])


def test_fresh_quiz_matches_the_library_quiz_plan_with_new_images(tmp_path):
    lib, quiz = tmp_path / "lib", tmp_path / "quiz"
    build_library(TINY, lib, seed=0, workers=1)
    build_quiz(TINY, quiz, seed=FRESH_SEED_BASE)
    old = [e for e in json.loads((lib / "manifest.json").read_text())["images"] if e["split"] == "quiz"]
    new = json.loads((quiz / "manifest.json").read_text())["images"]
    assert [(e["task"], e["class"], e["answer"]) for e in new] == [
        (e["task"], e["class"], e["answer"]) for e in old
    ]
    assert all((quiz / e["file"]).read_bytes() != (lib / e["file"]).read_bytes() for e in new)


def test_fpr95_counts_unknowns_above_the_threshold_keeping_95_percent_of_knowns():
    known = np.arange(20.0)  # the threshold keeping 19 of 20 (95 %) is 1.0
    assert fpr_at_tpr(known, np.array([0.5, 1.0, 5.0, -3.0])) == 0.5
    assert fpr_at_tpr(known, np.array([-1.0])) == 0.0


def test_tuning_objective_predicts_the_shared_held_out_split(tmp_path, monkeypatch):
    from grainlab import tuning
    from grainlab.config import load_params
    from grainlab.recognition import select

    build_library(TINY, tmp_path / "microstructures", seed=0, workers=1)
    params = load_params(
        None,
        [
            *SELECT,
            "recognition.holdout_fraction=0",
            f"data.root={tmp_path}",
            "tuning.recognition.eval_crops=8",
        ],
    )
    seen = {}
    real = select.predict_heldout

    def spy(recognizer, data, ids, *a, **kw):
        seen["ids"] = ids
        seen["preds"] = real(recognizer, data, ids, *a, **kw)
        seen["truths"] = [data.classes[data.labels[i]] for i in ids]
        return seen["preds"]

    monkeypatch.setattr(select, "predict_heldout", spy)
    accuracy = tuning.validation_accuracy(params)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])  # TINY: 2 training images per class, in class order
    assert np.array_equal(seen["ids"], holdout_split(labels, 5, 0.25, 0)[1])
    assert accuracy == np.mean([p.answer == t for p, t in zip(seen["preds"], seen["truths"], strict=True)])


def test_selection_scores_the_held_out_images_as_predict_answers_them(trained):
    from grainlab.recognition.predict import Recognizer
    from grainlab.recognition.select import predict_heldout
    from grainlab.recognition.train import load_images

    root, _, _ = trained
    rec = Recognizer.load(root / "outputs/recognition/quiz1", "cpu")
    data = load_images(root / "data/microstructures", "quiz1", "train")
    ids = [i for i, e in enumerate(data.entries) if e["file"] in set(rec.selection["holdout_images"])]
    preds = predict_heldout(rec, data, ids, rec.selection["crops_per_image"], 250, seed=0)
    answers = np.array([p.answer for p in preds])
    truths = np.array([data.classes[data.labels[i]] for i in ids])
    assert rec.selection["accuracy"] == np.mean(answers == truths)
    assert rec.selection["false_none"] == np.mean(answers == "none")
