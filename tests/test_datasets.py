"""The synthetic recipes end to end: a fresh checkout, `grainlab data synth`, `dvc add data`.

The session fixture copies the checkout (the files git tracks or would track) into a
temporary folder, makes the data there and re-adds it with DVC: data.dvc must come out
byte-identical to the committed one. That is the reproducibility promise of data.dvc.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grainlab.config import load_params
from grainlab.datasets.folder import load_dataset, load_test_set
from grainlab.datasets.recipes import build_region
from grainlab.images import read_labels, read_mask

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def fresh_clone(tmp_path_factory):
    clone = tmp_path_factory.mktemp("clone")
    files = run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / rel)
    run(["git", "init", "-q"], clone)
    run([BIN / "grainlab", "data", "synth"], clone)
    return clone


def test_fresh_synth_then_dvc_add_leaves_data_dvc_unchanged(fresh_clone):
    committed = (ROOT / "data.dvc").read_bytes()
    run([BIN / "dvc", "add", "-q", "data"], fresh_clone)
    assert (fresh_clone / "data.dvc").read_bytes() == committed
    status = run([BIN / "dvc", "status", "data.dvc"], fresh_clone)
    assert "up to date" in status


def test_recipe_counts_and_layout(fresh_clone):
    root = fresh_clone / "data" / "grain_boundaries"
    counts = {
        name: len(load_dataset(root / name).pairs) for name in ("lopez-toderas", "grae", "gong", "grae-large")
    }
    assert counts == {"lopez-toderas": 299, "grae": 299, "gong": 490, "grae-large": 490}
    params = load_params(ROOT / "params.yaml")
    assert len(load_test_set(root / "test")) == params.test_set.regions * params.test_set.tilts_per_region


def test_composite_recipes_share_one_tracing_per_region(fresh_clone):
    ds = load_dataset(fresh_clone / "data" / "grain_boundaries" / "lopez-toderas")
    labels_by_region = {}
    for p in ds.pairs:
        labels_by_region.setdefault(p.region, set()).add(p.label)
    assert len(labels_by_region) == 23
    assert all(len(labels) == 1 for labels in labels_by_region.values())
    tilts = [tuple(p.meta["tilt_deg"]) for p in ds.pairs if p.region == "r000"]
    assert len(set(tilts)) < len(tilts)  # repeat exposures: tilts are not unique


def test_per_image_recipes_have_unique_tilts_and_tracings(fresh_clone):
    ds = load_dataset(fresh_clone / "data" / "grain_boundaries" / "grae")
    assert len({p.label for p in ds.pairs}) == 299
    assert len({tuple(p.meta["tilt_deg"]) for p in ds.pairs}) == 299


def test_sloppy_tracer_is_worse_than_careful(fresh_clone):
    """Gong's labels match the exact network worse than Lopez-Toderas' (same construction)."""
    root = fresh_clone / "data" / "grain_boundaries"

    def label_f1(name):
        ds = load_dataset(root / name)
        scores = []
        for p in ds.pairs[:: len(ds.pairs) // 8]:
            truth = read_mask(root / name / "truth" / f"{p.region}_boundaries.png")
            label = read_mask(p.label)
            from scipy.ndimage import binary_dilation

            near_truth = binary_dilation(truth, iterations=2)
            near_label = binary_dilation(label, iterations=2)
            precision = (label & near_truth).sum() / max(label.sum(), 1)
            recall = (truth & near_label).sum() / max(truth.sum(), 1)
            scores.append(2 * precision * recall / max(precision + recall, 1e-9))
        return np.mean(scores)

    assert label_f1("gong") < label_f1("lopez-toderas") - 0.05


def test_test_set_has_exact_truth(fresh_clone):
    item = load_test_set(fresh_clone / "data" / "grain_boundaries" / "test")[0]
    grains = read_labels(item.grains)
    boundaries = read_mask(item.boundaries)
    assert grains.max() > 10 and boundaries.any()
    # Every boundary pixel touches two different grains (within one pixel).
    from scipy.ndimage import maximum_filter, minimum_filter

    g = np.where(grains > 0, grains, grains.max() + 1)
    differs = maximum_filter(grains, size=3) != minimum_filter(g, size=3)
    assert differs[boundaries].mean() > 0.95


def test_build_region_is_deterministic_and_seed_dependent(tmp_path):
    params = load_params(None, ["tem.image_px=96", "recipes.grae.pairs_per_region=2"])
    a = build_region(params, "grae", 0, tmp_path / "a")
    b = build_region(params, "grae", 0, tmp_path / "b")
    assert a == b
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    other = load_params(None, ["tem.image_px=96", "recipes.grae.pairs_per_region=2", "seed=1"])
    build_region(other, "grae", 0, tmp_path / "c")
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()
