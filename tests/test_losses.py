"""The boundary loss registry: hand-computed values, finite gradients, perfect prediction is the minimum."""

import math

import pytest
import torch

from grainlab.boundaries.losses import LOSSES, loss_names, make_loss, search_space, soft_skeleton
from grainlab.errors import GrainlabError

LOGITS = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]])
TARGET = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
PROBS = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.0, 3.0)]
TRUTH = [1.0, 0.0, 1.0, 0.0]


def bce_terms():
    return [-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(PROBS, TRUTH, strict=False)]


def tversky(alpha, beta, smooth=1.0):
    tp = sum(p * t for p, t in zip(PROBS, TRUTH, strict=False))
    fp = sum(p * (1 - t) for p, t in zip(PROBS, TRUTH, strict=False))
    fn = sum((1 - p) * t for p, t in zip(PROBS, TRUTH, strict=False))
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def expected_focal(alpha=0.25, gamma=2.0):
    out = []
    for p, t, ce in zip(PROBS, TRUTH, bce_terms(), strict=False):
        p_t = p if t else 1 - p
        a_t = alpha if t else 1 - alpha
        out.append(a_t * (1 - p_t) ** gamma * ce)
    return sum(out) / 4


def expected_balanced():
    w = [1.0 if t == 0 else 2 / 2 for t in TRUTH]  # 2 positives, 2 negatives -> weight 1
    return sum(wi * c for wi, c in zip(w, bce_terms(), strict=False)) / sum(w)


HAND = {
    "bce": lambda: sum(bce_terms()) / 4,
    "mse": lambda: sum((p - t) ** 2 for p, t in zip(PROBS, TRUTH, strict=False)) / 4,
    "focal": expected_focal,
    "dice": lambda: tversky(0.5, 0.5),
    "tversky": lambda: tversky(0.3, 0.7),
    "bce_dice": lambda: sum(bce_terms()) / 4 + tversky(0.5, 0.5),
    "weighted_bce": expected_balanced,
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_loss_matches_hand_computation(name):
    assert make_loss(name)(LOGITS, TARGET).item() == pytest.approx(HAND[name](), rel=1e-5)


def test_focal_and_tversky_use_their_arguments():
    assert make_loss("focal", alpha=0.6, gamma=1.0)(LOGITS, TARGET).item() == pytest.approx(
        expected_focal(0.6, 1.0), rel=1e-5
    )
    assert make_loss("tversky", alpha=0.9, beta=0.1)(LOGITS, TARGET).item() == pytest.approx(
        tversky(0.9, 0.1), rel=1e-5
    )


def test_weighted_bce_balanced_weighs_the_minority_class():
    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    logits = torch.tensor([[[[0.0, 1.0, -1.0, 2.0]]]])
    probs = torch.sigmoid(logits)[0, 0, 0].tolist()
    ce = [-math.log(probs[0])] + [-math.log(1 - p) for p in probs[1:]]
    w = [3.0, 1.0, 1.0, 1.0]
    expected = sum(a * b for a, b in zip(w, ce, strict=False)) / sum(w)
    assert make_loss("weighted_bce")(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_weighted_bce_distance_weights_by_hand():
    target = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    logits = torch.zeros(1, 1, 1, 3)
    w = [1 + 5 * math.exp(-(d**2) / (2 * 3.0**2)) for d in (0, 1, 2)]
    expected = math.log(2)  # every pixel has the same CE, so the weighted mean is log 2
    loss = make_loss("weighted_bce", mode="distance", w0=5.0, sigma=3.0)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    logits = torch.tensor([[[[0.0, 1.0, 2.0]]]])
    ce = [math.log(2), math.log(1 + math.e), math.log(1 + math.e**2)]
    expected = sum(a * b for a, b in zip(w, ce, strict=False)) / sum(w)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_cldice_by_hand_on_a_line():
    """A perfect one-pixel line: skeletons equal the line, clDice = 1, the loss is the BCE alone."""
    target = torch.zeros(1, 1, 7, 7)
    target[0, 0, 3, :] = 1
    logits = (target * 2 - 1) * 30
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()
    assert make_loss("cldice")(logits, target).item() == pytest.approx(bce, abs=1e-6)
    skel = soft_skeleton(target, 3)
    assert torch.equal(skel, target)
    # predicting nothing: precision = 1/1 (smooth), sensitivity = (0 + 1) / (7 + 1)
    empty = torch.full_like(target, -30.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(empty, target).item()
    sens = 1 / 8
    cl = 2 * 1 * sens / (1 + sens)
    assert make_loss("cldice", weight=0.5)(empty, target).item() == pytest.approx(
        bce + 0.5 * (1 - cl), rel=1e-4
    )


def random_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(2, 1, 16, 16, generator=g) > 0.8).float()
    logits = torch.randn(2, 1, 16, 16, generator=g)
    return logits, target


@pytest.mark.parametrize("name", loss_names())
def test_gradients_are_finite(name):
    logits, target = random_case()
    logits.requires_grad_(True)
    loss = make_loss(name)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    extreme = torch.full((1, 1, 8, 8), 80.0, requires_grad=True)
    make_loss(name)(extreme, torch.zeros(1, 1, 8, 8)).backward()
    assert torch.isfinite(extreme.grad).all()


@pytest.mark.parametrize("name", loss_names())
def test_perfect_prediction_is_the_minimum(name):
    _, target = random_case(1)
    perfect = (target * 2 - 1) * 20
    loss = make_loss(name)
    best = loss(perfect, target).item()
    g = torch.Generator().manual_seed(2)
    for scale in (0.5, 2.0, 8.0):
        worse = perfect + scale * torch.randn(perfect.shape, generator=g)
        worse[0, 0, :4, :4] *= -1  # flip some pixels
        assert best < loss(worse, target).item()


def test_unknown_loss_lists_valid_names():
    with pytest.raises(GrainlabError, match="unknown loss 'hinge'.*'bce'.*'focal'"):
        make_loss("hinge")


def test_bad_arguments_are_errors():
    with pytest.raises(GrainlabError, match="focal"):
        make_loss("focal", delta=1)
    with pytest.raises(GrainlabError, match="mode"):
        make_loss("weighted_bce", mode="other")


def test_search_spaces_are_data():
    assert set(LOSSES) >= {"bce", "mse", "focal", "dice", "tversky", "bce_dice", "cldice", "weighted_bce"}
    assert search_space("focal") == {"alpha": ("float", 0.05, 0.95), "gamma": ("float", 0.5, 5.0)}
    assert search_space("bce") == {}
    for name in loss_names():
        for key, spec in search_space(name).items():
            assert spec[0] in ("float", "int", "categorical"), (name, key)


@pytest.mark.parametrize("name", loss_names())
def test_search_space_values_build_the_loss(name):
    """tuning.py samples from these ranges: every corner must construct a working loss."""
    logits, target = random_case(3)
    for end in (0, -1):
        kwargs = {}
        for key, (kind, *rest) in search_space(name).items():
            values = rest[0] if kind == "categorical" else rest
            kwargs[key] = values[end]
        assert torch.isfinite(make_loss(name, **kwargs)(logits, target))
