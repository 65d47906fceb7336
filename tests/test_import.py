import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grainlab.cli import main
from grainlab.datasets.folder import DatasetError, load_dataset, split_by_region
from grainlab.datasets.importer import import_dataset
from grainlab.errors import GrainlabError

REAL = Path(os.environ.get("GRAINLAB_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/tbm-dev"))
needs_real = pytest.mark.skipif(
    not (REAL / "images").is_dir(), reason=f"real tbm-dev data not found at {REAL} (set GRAINLAB_REAL_DATA)"
)


def make_source(root: Path, stems=("a-0-0", "a-0-1", "b-0-0"), size=(32, 24), invert=False, rgb=True):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem in stems:
        img = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(img if rgb else img[..., 0]).save(root / "images" / f"{stem}.png")
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[size[1] // 2, :] = 255
        mask[:, size[0] // 2] = 180  # anti-aliased line
        Image.fromarray(255 - mask if invert else mask).save(root / "masks" / f"{stem}.png")
    return root


def test_import_writes_the_dataset_layout(tmp_path):
    src = make_source(tmp_path / "src", invert=True)
    manifest = import_dataset(src, tmp_path / "out", "mine", pixel_size_nm=5.0)
    ds = load_dataset(tmp_path / "out" / "mine")
    assert len(ds.pairs) == 3 and ds.channels == 3 and ds.pixel_size_nm == 5.0
    assert ds.regions == ["a", "b"]
    mask = np.asarray(Image.open(ds.pairs[0].label))
    assert set(np.unique(mask)) == {0, 255}
    assert mask.mean() < 128  # black-on-white input stored white-on-black
    assert manifest["pairs"][0]["source_image"] == "a-0-0.png"


def bad_case(tmp_path, case):
    src = make_source(tmp_path / "src")
    if case == "image without tracing":
        (src / "masks" / "b-0-0.png").unlink()
        return src, "micrographs without a tracing: ['b-0-0.png']"
    if case == "tracing without image":
        (src / "images" / "b-0-0.png").unlink()
        return src, "tracings without a micrograph: ['b-0-0.png']"
    if case == "size mismatch":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / "masks" / "a-0-1.png")
        return src, "size mismatch: micrograph"
    if case == "corrupt file":
        (src / "images" / "a-0-1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return src, "a-0-1.png"
    if case == "zero-byte file":
        (src / "masks" / "a-0-1.png").write_bytes(b"")
        return src, "a-0-1.png: empty file"
    if case == "empty mask":
        Image.fromarray(np.zeros((24, 32), np.uint8)).save(src / "masks" / "a-0-1.png")
        return src, "a-0-1.png: the tracing is empty"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "image without tracing",
        "tracing without image",
        "size mismatch",
        "corrupt file",
        "zero-byte file",
        "empty mask",
    ],
)
def test_bad_sources_fail_cleanly_and_write_nothing(tmp_path, case, capsys):
    src, fragment = bad_case(tmp_path, case)
    out = tmp_path / "data"
    code = main(["data", "import", str(src), "--name", "x", "--out", str(out), "--params", str(PARAMS)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and "Traceback" not in err
    assert not (out / "grain_boundaries" / "x").exists()
    assert not out.exists() or not any(p.name != "grain_boundaries" for p in out.iterdir())
    if (out / "grain_boundaries").exists():
        assert list((out / "grain_boundaries").iterdir()) == []


PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "/abs"])
def test_names_that_escape_the_target_are_refused(tmp_path, name):
    src = make_source(tmp_path / "src")
    with pytest.raises(DatasetError, match="not a plain folder name"):
        import_dataset(src, tmp_path / "out", name)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_failed_reimport_keeps_the_previous_dataset(tmp_path):
    src = make_source(tmp_path / "src")
    import_dataset(src, tmp_path / "out", "ds")
    (src / "masks" / "a-0-0.png").write_bytes(b"")
    with pytest.raises(GrainlabError, match="a-0-0.png: empty file"):
        import_dataset(src, tmp_path / "out", "ds", replace=True)
    assert len(load_dataset(tmp_path / "out" / "ds").pairs) == 3


def test_manifest_paths_cannot_escape(tmp_path):
    src = make_source(tmp_path / "src")
    import_dataset(src, tmp_path / "out", "ds")
    path = tmp_path / "out" / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["pairs"][0]["image"] = "../../src/images/a-0-0.png"
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="points outside the dataset folder"):
        load_dataset(path.parent)


@needs_real
def test_import_real_tbm_dev(tmp_path, capsys):
    code = main(
        ["data", "import", str(REAL), "--name", "tbm-dev", "--out", str(tmp_path), "--params", str(PARAMS)]
    )
    assert code == 0, capsys.readouterr().err
    ds = load_dataset(tmp_path / "grain_boundaries" / "tbm-dev")
    assert len(ds.pairs) == len(list((REAL / "images").glob("*.png")))
    assert ds.channels == 3
    assert len(ds.regions) >= 10 and all(r.isdigit() for r in ds.regions)
    train, val = split_by_region(ds.pairs, 0.25, seed=0)
    assert {p.region for p in train}.isdisjoint({p.region for p in val})
    fractions = [np.asarray(Image.open(p.label)).mean() / 255 for p in ds.pairs[:10]]
    assert all(0.01 < f < 0.4 for f in fractions)  # thresholded boundary lines, not whole images


def test_split_by_region_needs_two_regions(tmp_path):
    src = make_source(tmp_path / "src", stems=("a-1", "a-2"))
    import_dataset(src, tmp_path / "out", "one")
    with pytest.raises(DatasetError, match="at least 2 regions"):
        split_by_region(load_dataset(tmp_path / "out" / "one").pairs, 0.2, 0)


def test_import_needs_the_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no micrograph folder"):
        import_dataset(tmp_path / "empty", tmp_path / "out", "x")
    shutil.rmtree(tmp_path / "empty")
    with pytest.raises(DatasetError, match="source folder not found"):
        import_dataset(tmp_path / "empty", tmp_path / "out", "x")
