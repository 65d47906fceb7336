"""Recognition units: crops, triplet loss, open-set GMM, saliency, quiz metrics, the library plan."""

import json
import math

import cv2
import numpy as np
import pytest
import torch

from grainlab.config import MicroConfig
from grainlab.datasets.microstructures import build_library, load_manifest, plan_library, write_preview
from grainlab.errors import GrainlabError
from grainlab.recognition.crops import (
    check_px_per_um,
    check_size,
    crop_magnification,
    extract,
    sample_boxes,
    to_channels,
)
from grainlab.recognition.evaluate import QuizResult, oscr, quiz_metrics
from grainlab.recognition.model import TripletNet, log_magnification, triplet_loss
from grainlab.recognition.openset import OpenSetGMM, fit_gmm, load_gmms, save_gmms
from grainlab.recognition.predict import Prediction, Recognizer, saliency_map, saliency_overlay
from grainlab.recognition.train import LabelledImages
from grainlab.synth import micro

TINY = MicroConfig(
    image_px=64, quiz1_train=5, quiz1_quiz_known=2, quiz1_quiz_unknown=1, quiz2_train=6, quiz2_quiz=2
)


def test_library_plan_matches_the_paper_quizzes():
    entries = plan_library(MicroConfig(), seed=0)
    q1_train = [e for e in entries if e["task"] == "quiz1" and e["split"] == "train"]
    q1_quiz = [e for e in entries if e["task"] == "quiz1" and e["split"] == "quiz"]
    q2 = [e for e in entries if e["task"] == "quiz2"]
    assert len(q1_train) == 134 and len(q1_quiz) == 36
    assert {e["answer"] for e in q1_quiz} >= {"none", "ferrite"}
    assert all(1.0 <= e["px_per_um"] <= 200.0 for e in q1_train)
    assert sum(e["split"] == "train" for e in q2) == 58 and sum(e["split"] == "quiz" for e in q2) == 21
    assert {e["px_per_um"] for e in q2} == {53.0, 106.0} and {e["style"] for e in q2} == {"sem"}
    assert len({e["file"] for e in entries}) == len(entries)
    for e in entries:  # each class is drawn where it is imaged, e.g. no 200 px/um ferrite
        if e["task"] == "quiz1":
            lo, hi = micro.MAG_RANGE[e["class"]]
            assert lo <= e["px_per_um"] <= hi, e


def test_library_is_byte_identical_whatever_the_workers(tmp_path):
    build_library(TINY, tmp_path / "a", seed=1, workers=1)
    build_library(TINY, tmp_path / "b", seed=1, workers=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5 + 3 + 6 + 2 + 2  # images, manifest, preview
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    manifest = load_manifest(tmp_path / "a")
    assert manifest["tasks"]["quiz1"]["unknown"] and manifest["images"][0]["px_per_um"] > 0
    assert write_preview(tmp_path / "a", tmp_path / "p.png").stat().st_size > 1000


def test_missing_library_names_the_manifest(tmp_path):
    with pytest.raises(GrainlabError, match="manifest.json.*grainlab data synth"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("bad", [None, 0, -2.0, float("nan"), float("inf"), "abc"])
def test_bad_magnification_is_refused_with_its_name(bad):
    with pytest.raises(GrainlabError, match="--px-per-um.*positive"):
        check_px_per_um(bad, "--px-per-um")


def test_image_smaller_than_a_crop_is_refused():
    with pytest.raises(GrainlabError, match="a.png: 40x30 pixels is smaller than the smallest crop"):
        check_size((30, 40), 32, "a.png")


def test_crops_lie_inside_and_carry_their_magnification():
    rng = np.random.default_rng(0)
    boxes = sample_boxes(rng, (100, 150), 500, 20, 80)
    top, left, side = boxes.T
    assert side.min() >= 20 and side.max() <= 80 and (top + side <= 100).all() and (left + side <= 150).all()
    img = np.random.default_rng(1).random((100, 150), dtype=np.float32)
    crops = extract(img, boxes[:40], 32)
    assert crops.shape == (40, 32, 32)
    for crop, (t, lf, s) in zip(crops, boxes[:40], strict=True):  # threads keep each crop in its place
        interp = cv2.INTER_AREA if s > 32 else cv2.INTER_LINEAR
        assert np.array_equal(crop, cv2.resize(img[t : t + s, lf : lf + s], (32, 32), interpolation=interp))
    assert np.allclose(crop_magnification(10.0, np.array([[0, 0, 64]]), 32), 5.0)


def test_edge_channel_is_opencv_sobel_magnitude():
    crops = np.random.default_rng(2).random((3, 20, 24), dtype=np.float32)
    x = to_channels(torch.from_numpy(crops), edge_channel=True).numpy()
    assert x.shape == (3, 2, 20, 24)
    assert np.array_equal(x[:, 0], crops - 0.5)
    for c, edges in zip(crops, x[:, 1], strict=True):
        gx, gy = cv2.Sobel(c, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(c, cv2.CV_32F, 0, 1, ksize=3)
        assert np.allclose(edges, np.sqrt(gx * gx + gy * gy), atol=1e-5)
    assert to_channels(torch.from_numpy(crops), edge_channel=False).shape == (3, 1, 20, 24)


def test_network_takes_magnification_by_concat_or_film():
    x, m = torch.randn(4, 2, 32, 32), log_magnification([1.0, 10.0, 100.0, 200.0])
    for kw in (
        {"magnification_mode": "concat"},
        {"magnification_mode": "film"},
        {"use_magnification": False},
    ):
        net = TripletNet(2, (8, 16), descriptor_dim=3, **kw).eval()
        assert net(x, m).shape == (4, 3)
    net = TripletNet(2, (8, 16)).eval()
    assert not torch.allclose(
        net(x[:1].repeat(2, 1, 1, 1), log_magnification([1.0, 100.0]))[0],
        net(x[:1].repeat(2, 1, 1, 1), log_magnification([1.0, 100.0]))[1],
    )


@pytest.mark.parametrize("mining", ["batch-hard", "semi-hard"])
def test_triplet_loss_is_zero_when_classes_are_far_apart_and_positive_when_collapsed(mining):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    apart = torch.tensor([[0.0, 0], [0.1, 0], [10, 0], [10, 0.1], [0, 10], [0.1, 10]], requires_grad=True)
    loss, active = triplet_loss(apart, labels, 1.0, mining)
    assert loss.item() == 0 and active.item() == 0
    collapsed = torch.zeros(6, 2, requires_grad=True)
    loss, _ = triplet_loss(collapsed + 1e-3 * torch.randn(6, 2), labels, 1.0, mining)
    assert loss.item() == pytest.approx(1.0, abs=0.05)
    loss.backward()


def _blobs():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal([0, 0], 0.3, (200, 2)), rng.normal([5, 0], 0.3, (200, 2))])
    return z, np.repeat([0, 1], 200)


def test_open_set_gmm_answers_none_far_from_every_class(tmp_path):
    z, y = _blobs()
    gmm = fit_gmm(z, y, ["a", "b"], n_components=2, percentile=1.0)
    p = gmm.probabilities(gmm.log_likelihood(np.array([[0.0, 0.0], [5.0, 0.0], [2.5, 8.0]])))
    assert np.allclose(p.sum(axis=1), 1)
    assert p[0].argmax() == 0 and p[1].argmax() == 1 and p[2, -1] == 1.0
    assert gmm.labels == ["a", "b", "none"]
    other = fit_gmm(z + 1.0, y, ["a", "b"], n_components=1, percentile=5.0)
    save_gmms([gmm, other], tmp_path / "gmm.json")
    again = load_gmms(tmp_path / "gmm.json")
    assert [g["classes"] for g in json.loads((tmp_path / "gmm.json").read_text())["members"]] == [
        ["a", "b"]
    ] * 2
    for a, b in zip(again, [gmm, other], strict=True):
        assert np.allclose(a.log_likelihood(z[:5]), b.log_likelihood(z[:5])) and a.threshold == b.threshold
    (tmp_path / "bad.json").write_text('{"members": [{"classes": ["a"]}]}')
    with pytest.raises(GrainlabError, match="bad.json"):
        load_gmms(tmp_path / "bad.json")


def _recognizer(img, seeds):
    """A recognizer of untrained tiny networks, one per seed, each with 2-class GMMs fitted on its
    own descriptors of crops of img (split at the median of the first descriptor)."""
    meta = {
        "model_args": {"in_channels": 2, "widths": [8, 16]},
        "px_per_um_range": [1.0, 100.0],
        "crop_px": 24,
        "crop_min_px": 16,
        "crop_max_px": 40,
        "edge_channel": True,
    }
    nets = []
    for s in seeds:
        torch.manual_seed(s)
        nets.append(TripletNet(2, (8, 16)))
    rec = Recognizer(nets, [], meta, torch.device("cpu"))
    boxes = sample_boxes(np.random.default_rng(1), img.shape, 200, 16, 40)
    crops, mags = extract(img, boxes, 24), crop_magnification(20.0, boxes, 24)
    for m in range(len(nets)):
        z = rec.descriptors(crops, mags, member=m)
        rec.gmms.append(fit_gmm(z, (z[:, 0] > np.median(z[:, 0])).astype(int), ["a", "b"], 1, 30.0))
    return rec


def test_ensemble_averages_its_members_and_survives_a_save(tmp_path):
    img = micro.render("pearlite", (64, 80), 20.0, "sem", np.random.default_rng(0))
    ensemble = _recognizer(img, [0, 1])
    singles = [_recognizer(img, [0]), _recognizer(img, [1])]
    preds = [r.predict(img, 20.0, n_crops=50, batch_size=16, seed=3) for r in [ensemble, *singles]]
    assert np.allclose(
        preds[0].crop_probabilities, (preds[1].crop_probabilities + preds[2].crop_probabilities) / 2
    )
    assert not np.allclose(preds[1].crop_probabilities, preds[2].crop_probabilities)
    # typicality: the median crop's best log-likelihood above the threshold, averaged over the members
    x = extract(img, preds[0].boxes, 24)
    mags = crop_magnification(20.0, preds[0].boxes, 24)
    margins = [
        g.log_likelihood(ensemble.descriptors(x, mags, member=m)).max(axis=1) - g.threshold
        for m, g in enumerate(ensemble.gmms)
    ]
    assert preds[0].typicality == pytest.approx(np.median(np.mean(margins, axis=0)), rel=1e-5)
    again = Recognizer.load(ensemble.save(tmp_path / "model"), "cpu")
    assert np.allclose(
        again.predict(img, 20.0, n_crops=50, batch_size=16, seed=3).distribution, preds[0].distribution
    )
    save_gmms(ensemble.gmms[:1], tmp_path / "model" / "gmm.json")
    with pytest.raises(GrainlabError, match="1 open-set GMMs for the 2 networks"):
        Recognizer.load(tmp_path / "model", "cpu")


def test_none_threshold_is_a_percentile_of_the_held_out_crops():
    z, y = _blobs()
    held_out = (z + np.random.default_rng(1).normal(0, 0.3, z.shape), y)  # wider than the fitting crops
    fit_only = fit_gmm(z, y, ["a", "b"], n_components=1, percentile=15.0)
    calibrated = fit_gmm(z, y, ["a", "b"], n_components=1, percentile=15.0, calibration=held_out)
    own = calibrated.log_likelihood(held_out[0])[np.arange(len(y)), y]
    assert calibrated.threshold == pytest.approx(np.percentile(own, 15.0))
    assert calibrated.threshold < fit_only.threshold


def test_gmm_log_likelihood_matches_scikit_learn():
    from sklearn.mixture import GaussianMixture

    z, y = _blobs()
    g = GaussianMixture(2, random_state=0).fit(z[y == 0])
    ours = OpenSetGMM(["a"], [g.weights_], [g.means_], [g.covariances_], 0.0)
    assert np.allclose(ours.log_likelihood(z[:20])[:, 0], g.score_samples(z[:20]))


def test_saliency_is_the_mean_of_covering_crops():
    boxes = np.array([[0, 0, 4], [2, 2, 4]])
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    sal = saliency_map((8, 8), boxes, probs)
    assert (
        np.allclose(sal[0, 0], [1, 0])
        and np.allclose(sal[3, 3], [0.5, 0.5])
        and np.allclose(sal[5, 5], [0, 1])
    )
    assert np.allclose(sal[7, 7], 0)
    assert saliency_overlay(np.zeros((8, 8)), sal).shape == (8, 8, 3)


def test_oscr_is_one_for_a_perfect_open_set_classifier_and_lower_otherwise():
    assert oscr(np.array([True, True]), np.array([0.9, 0.8]), np.array([0.1, 0.2])) == pytest.approx(1.0)
    worse = oscr(np.array([True, False]), np.array([0.9, 0.8]), np.array([0.85, 0.2]))
    assert 0 < worse < 1 and not math.isnan(worse)


def test_open_set_auroc_ranks_images_by_typicality_and_p_none_is_reported_beside_it():
    labels = ["a", "b", "none"]
    truths = ["a", "b", "none", "none"]
    # The unknown images are the least typical, but one known image has more crops under the threshold.
    p_none = [0.6, 0.1, 0.3, 0.5]
    typicality = [-2.0, -1.0, -9.0, -7.0]
    preds = [
        Prediction(
            labels,
            np.array([(1 - n) if i == 0 else 0.0, (1 - n) if i == 1 else 0.0, n]),
            False,
            np.zeros((1, 3), int),
            np.zeros((1, 3)),
            t,
        )
        for i, (n, t) in enumerate(zip(p_none, typicality, strict=True))
    ]
    entries = [
        {"file": f"{i}.png", "answer": t, "class": t, "px_per_um": 5.0, "style": "sem"}
        for i, t in enumerate(truths)
    ]
    quiz = LabelledImages(
        [np.zeros((4, 4))] * 4, np.full(4, 5.0), np.array([0, 1, -1, -1]), ["a", "b"], entries
    )
    m = quiz_metrics(QuizResult("t", labels, quiz, preds))
    assert m["open_set_auroc"] == pytest.approx(1.0)
    assert m["open_set_auroc_p_none"] == pytest.approx(0.5)
    assert m["oscr"] == pytest.approx(1.0)
    assert preds[2].as_dict()["typicality"] == -9.0
