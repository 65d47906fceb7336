"""The study's two truths, its ceilings and its answers with bootstrap intervals."""

import json

import numpy as np
import pytest

from grainlab.boundaries.ceilings import ceilings
from grainlab.boundaries.evaluate import baseline_tracer, score_items, summarise
from grainlab.boundaries.study_stats import (
    answers,
    best_loss,
    ceilings_table,
    compare,
    estimate,
    group_matrix,
    quality_vs_quantity,
)
from grainlab.config import BoundaryConfig, load_params
from grainlab.datasets.folder import load_test_set, write_manifest
from grainlab.datasets.recipes import TEST_SET, build_region
from grainlab.errors import GrainlabError
from grainlab.images import read_mask, write_mask
from test_boundaries_fixtures import write_test_set


def rows(f1, vi, visible=None):
    """Per-image rows as score_items returns them."""
    out = [
        {"image": f"t{i:03d}", "boundary_f1": float(a), "vi": float(b)}
        for i, (a, b) in enumerate(zip(f1, vi, strict=True))
    ]
    if visible is not None:
        for r, v in zip(out, visible, strict=True):
            r["visible/boundary_f1"] = float(v)
    return out


def noisy_runs(datasets, losses, seeds, images, shift=None, seed=0):
    """Runs whose per-image F1 and VI are noise around 0.5 and 2.0, plus shift[dataset or loss] (F1, VI)."""
    rng = np.random.default_rng(seed)
    shift = shift or {}
    runs = {}
    for d in datasets:
        for loss in losses:
            df1, dvi = np.add(shift.get(d, (0, 0)), shift.get(loss, (0, 0)))
            for s in range(seeds):
                runs[(d, loss, s)] = rows(
                    0.5 + df1 + rng.normal(0, 0.05, images), 2.0 + dvi + rng.normal(0, 0.2, images)
                )
    return runs


def test_interval_contains_the_mean_and_narrows_with_more_images():
    widths = []
    for images in (8, 80):
        e = estimate(group_matrix(noisy_runs(["grae"], ["bce"], 3, images), "boundary_f1", dataset="grae"))
        assert e.low < e.mean < e.high
        assert (e.seeds, e.images) == (3, images)
        widths.append(e.high - e.low)
    assert widths[1] < 0.6 * widths[0]


def test_interval_is_deterministic():
    m = group_matrix(noisy_runs(["grae"], ["bce"], 2, 10), "vi", dataset="grae")
    assert estimate(m) == estimate(m)


def test_equal_groups_show_no_significant_difference():
    base = noisy_runs(["grae"], ["bce", "dice"], 3, 12)
    runs = {**base, **{("gong", loss, s): r for (_, loss, s), r in base.items()}}
    diff = compare(group_matrix(runs, "boundary_f1", "grae"), group_matrix(runs, "boundary_f1", "gong"))
    assert diff.low <= 0 <= diff.high and not diff.significant
    line = quality_vs_quantity(runs, "grae", "gong", "full")
    assert line.endswith("no significant difference.")
    assert "full truth" in line and "3 seeds x 12 test images" in line


def test_noise_alone_is_no_significant_difference():
    runs = noisy_runs(["grae", "gong"], ["bce"], 3, 20, seed=4)
    assert "no significant difference" in quality_vs_quantity(runs, "grae", "gong", "full")


def test_a_clear_difference_is_reported():
    runs = noisy_runs(["grae", "gong"], ["bce", "dice"], 3, 20, shift={"grae": (0.2, -0.5)})
    line = quality_vs_quantity(runs, "grae", "gong", "full")
    assert "**grae** traces better." in line
    assert "no significant" not in line and "disagree" not in line
    worse = noisy_runs(["grae", "gong"], ["bce"], 3, 20, shift={"gong": (0.2, -0.5)})
    assert "**gong** traces better." in quality_vs_quantity(worse, "grae", "gong", "full")


def test_f1_and_vi_disagreeing_is_said_instead_of_picking_one():
    runs = noisy_runs(["grae", "gong"], ["bce"], 3, 20, shift={"grae": (0.2, 0.8)})  # better F1, worse VI
    line = quality_vs_quantity(runs, "grae", "gong", "full")
    assert "F1 and VI disagree (F1 favours grae but VI favours gong)" in line
    assert "**" not in line


def test_one_metric_significant_the_other_not():
    runs = noisy_runs(["grae", "gong"], ["bce"], 3, 30, shift={"grae": (0.2, 0.0)})
    line = quality_vs_quantity(runs, "grae", "gong", "full")
    assert "**grae** traces better; VI: no significant difference." in line


def test_best_loss_against_every_other_loss():
    losses = ["bce", "dice", "clDice"]
    clear = noisy_runs(["grae", "gong"], losses, 2, 20, shift={"dice": (0.2, -0.6)})
    assert best_loss(clear, losses, "full").endswith("**dice** traces best.")
    close = noisy_runs(["grae", "gong"], losses, 2, 20, shift={"dice": (0.2, -0.6), "bce": (0.2, -0.6)})
    assert best_loss(close, losses, "full").endswith("no significant difference.")


def test_answers_name_their_truth_and_use_the_visible_one_when_scored():
    runs = {
        (d, loss, s): rows([0.5, 0.6, 0.4], [2.0, 2.1, 1.9], visible=[0.8, 0.9, 0.7])
        for d in ("grae", "gong", "grae-large")
        for loss in ("bce", "dice")
        for s in (0, 1)
    }
    lines = answers(runs, ["grae", "gong", "grae-large"], ["bce", "dice"])
    assert len(lines) == 6
    assert all("full truth" in line for line in lines[:3])
    assert all("visible truth" in line and "VI" not in line for line in lines[3:])
    assert "grae-large vs gong" in lines[1]
    for r in runs[("grae", "bce", 0)]:
        del r["visible/boundary_f1"]
    assert len(answers(runs, ["grae", "gong", "grae-large"], ["bce", "dice"])) == 3
    one_loss = {k: r for k, r in runs.items() if k[1] == "bce"}
    assert not any("Best loss" in line for line in answers(one_loss, ["grae", "gong"], ["bce"]))


def test_runs_on_different_images_are_an_error():
    runs = noisy_runs(["grae"], ["bce", "dice"], 1, 4)
    runs[("grae", "dice", 0)][0]["image"] = "other"
    with pytest.raises(GrainlabError, match="expected the same 4 images"):
        group_matrix(runs, "vi", dataset="grae")
    with pytest.raises(GrainlabError, match="no run of dataset 'gong'"):
        group_matrix(runs, "vi", dataset="gong")


def visible_half(root, name):
    """The boundaries in the left half of a test image, as its visible truth."""
    mask = read_mask(root / "labels" / f"{name}.png")
    mask[:, mask.shape[1] // 2 :] = False
    write_mask(root / "truth" / "visible" / f"{name}.png", mask)
    return f"truth/visible/{name}.png"


@pytest.fixture
def test_set(tmp_path):
    """Two fixture test images; the first has a visible mask (left half of its network) and a composite
    one (its network shifted by 6 px), the second neither."""
    root = write_test_set(tmp_path / "test")
    manifest = json.loads((root / "manifest.json").read_text())
    first = manifest["pairs"][0]
    first["visible"] = visible_half(root, "t000")
    write_mask(root / "truth" / "composite.png", np.roll(read_mask(root / first["label"]), 6, axis=1))
    first["composite"] = "truth/composite.png"
    write_manifest(root, manifest)
    return root


def test_visible_truth_keys_only_for_items_with_a_visible_mask(test_set):
    items = load_test_set(test_set)
    assert items[0].visible is not None and items[1].visible is None
    scored = score_items(baseline_tracer(BoundaryConfig()), items, "grey", 2)
    visible_keys = {"visible/boundary_f1", "visible/boundary_precision", "visible/boundary_recall"}
    assert visible_keys <= set(scored[0]) and not visible_keys & set(scored[1])
    assert {"boundary_f1", "vi", "count_error"} <= set(scored[1])  # full-truth keys unchanged
    mean = summarise(scored)
    assert mean["visible/boundary_f1"] == scored[0]["visible/boundary_f1"]  # over the item that has it
    assert mean["boundary_f1"] == pytest.approx((scored[0]["boundary_f1"] + scored[1]["boundary_f1"]) / 2)


def test_a_visible_mask_outside_the_test_set_is_an_error(test_set):
    manifest = json.loads((test_set / "manifest.json").read_text())
    manifest["pairs"][1]["visible"] = "../elsewhere.png"
    write_manifest(test_set, manifest)
    with pytest.raises(GrainlabError, match="visible path '../elsewhere.png' points outside"):
        load_test_set(test_set)


def test_ceilings_of_fixture_masks(test_set):
    ceil = ceilings(load_test_set(test_set), BoundaryConfig())
    assert set(ceil) == {"visible-only", "composite"}
    visible_only, composite = ceil["visible-only"], ceil["composite"]
    assert visible_only["visible/boundary_f1"] == 1.0  # perfect against the truth it traces
    assert visible_only["boundary_precision"] == 1.0 and visible_only["boundary_recall"] < 0.7
    assert visible_only["boundary_f1"] < 0.85
    assert composite["boundary_f1"] < 0.5  # 6 px off with 2 px tolerance
    table = ceilings_table(ceil)
    assert table[2].startswith("| perfect visible-only tracer | ") and table[3].startswith(
        "| perfect composite"
    )


@pytest.fixture(scope="module")
def synthetic_test_region(tmp_path_factory):
    """One region of the generated test set (128 px, 3 tilts), written twice."""
    params = load_params(None, ["tem.image_px=128", "test_set.tilts_per_region=3"])
    roots = []
    for k in range(2):
        root = tmp_path_factory.mktemp(f"test{k}")
        write_manifest(root, {"pairs": build_region(params, TEST_SET, 0, root)})
        roots.append(root)
    return params, roots


def test_generated_test_set_has_visible_and_composite_truth_deterministically(synthetic_test_region):
    _, (root, again) = synthetic_test_region
    items = load_test_set(root)
    assert len(items) == 3 and len({i.composite for i in items}) == 1  # one composite per region
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
    composite = read_mask(items[0].composite)
    for item in items:  # the union of the series' views: more than any single one shows
        assert composite.sum() > read_mask(item.visible).sum()


def test_ceilings_of_the_generated_test_set(synthetic_test_region):
    params, (root, _) = synthetic_test_region
    ceil = ceilings(load_test_set(root), params.boundaries)
    visible_only, composite = ceil["visible-only"], ceil["composite"]
    assert visible_only["visible/boundary_f1"] == 1.0
    assert visible_only["boundary_f1"] < 1.0 and visible_only["boundary_recall"] < 1.0
    assert composite["boundary_f1"] < 1.0 and composite["boundary_precision"] < 1.0  # misaligned
