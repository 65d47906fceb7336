"""`grainlab boundaries train | trace | evaluate | study | losses` end to end on tiny data."""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

from grainlab import cli
from grainlab.boundaries import commands
from grainlab.images import read_labels, read_mask, write_image
from test_boundaries_fixtures import write_data_root
from test_boundaries_train import TINY

REAL_DATA = Path(
    os.environ.get("GRAINLAB_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/tbm-dev")
)


def grainlab(*argv) -> int:
    parser = argparse.ArgumentParser(prog="grainlab")
    groups = parser.add_subparsers(dest="group", required=True)
    commands.register(groups, cli.common_options())
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except cli.GrainlabError as exc:
        print(f"grainlab: error: {exc}")
        return 2


@pytest.fixture
def workdir(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    write_data_root(tmp_path / "data", datasets=("toy", "toy2"))
    (tmp_path / "params.yaml").write_text("profile: demo\n")
    return tmp_path


def sets(*extra):
    return [x for kv in [*TINY, *extra] for x in ("--set", kv)]


def test_train_trace_evaluate(workdir, capsys):
    assert (
        grainlab(
            "boundaries",
            "train",
            "--dataset",
            "toy",
            "--loss",
            "dice",
            *sets("boundaries.epochs=2", "boundaries.snapshot_epochs=[2]"),
        )
        == 0
    )
    ckpt = workdir / "outputs/boundaries/toy-dice/checkpoints/last.pt"
    assert ckpt.is_file()
    big = workdir / "big.png"
    write_image(big, np.random.default_rng(0).random((150, 333)))
    tiny = workdir / "tiny.png"
    write_image(tiny, np.zeros((1, 1)))
    assert (
        grainlab(
            "boundaries",
            "trace",
            str(big),
            str(tiny),
            "--model",
            str(ckpt),
            "--out",
            "traced",
            "--pixel-size",
            "2.0",
            *sets(),
        )
        == 0
    )
    out = workdir / "traced"
    assert read_mask(out / "big-tracing.png").shape == (150, 333)
    assert read_labels(out / "big-grains.png").shape == (150, 333)
    for name in ("big-probability.png", "big-overlay.png", "big-grains.csv", "tiny-tracing.png", "stats.csv"):
        assert (out / name).is_file(), name
    stats = json.loads((out / "stats.json").read_text())
    assert stats[0]["pixel_size_nm"] == 2.0 and "heyn_intercept_px" in stats[0]
    assert grainlab("boundaries", "evaluate", "--model", str(ckpt), "--out", "scores.json", *sets()) == 0
    scores = json.loads((workdir / "scores.json").read_text())
    assert {"model/boundary_f1", "baseline/boundary_f1", "model/vi", "baseline/ks"} <= set(scores)
    assert "baseline" in capsys.readouterr().out
    assert (
        grainlab(
            "boundaries", "evaluate", "--model", str(ckpt), "--dataset", "toy", "--out", "val.json", *sets()
        )
        == 0
    )
    assert "mean |Heyn error|" in capsys.readouterr().out
    assert "model/heyn_abs_error" in json.loads((workdir / "val.json").read_text())


def test_cli_errors_are_one_line(workdir, capsys):
    assert grainlab("boundaries", "trace", "nothere.png", "--model", "none.pt", "--out", "o", *sets()) == 2
    assert "none.pt: checkpoint not found" in capsys.readouterr().out
    assert grainlab("boundaries", "train", "--dataset", "toy", "--loss", "nope", *sets()) == 2
    assert "expected one of" in capsys.readouterr().out


def test_losses_verb_lists_search_spaces(workdir, capsys):
    assert grainlab("boundaries", "losses", *sets()) == 0
    assert '"gamma": ["float", 0.5, 5.0]' in capsys.readouterr().out


def test_study_writes_table_grid_and_answers(workdir, capsys):
    study = sets('boundaries.study_datasets=["toy", "toy2"]', 'boundaries.study_losses=["bce"]')
    assert grainlab("boundaries", "study", "--out", "report", *study) == 0
    report = workdir / "report"
    text = (report / "study.md").read_text()
    assert "## Ceilings" in text and "classical baseline" in text
    assert text.count("| toy2 | bce |") == 2  # snapshots at epochs 1 and 2
    for name in ("poster_grid.png", "gsd-toy.png", "gsd-toy2.png", "study.json"):
        assert (report / name).is_file(), name
    assert set(json.loads((report / "study.json").read_text())) == {
        "baseline",
        "ceilings",
        "toy/bce",
        "toy2/bce",
    }
    # the size distributions are the last snapshot's test tracings: those of the final weights
    from grainlab.boundaries.evaluate import model_tracer
    from grainlab.boundaries.grains import equivalent_diameters
    from grainlab.boundaries.infer import load_model
    from grainlab.boundaries.train import snapshot_diameters, test_items
    from grainlab.config import load_params
    from grainlab.images import read_image

    run = workdir / "outputs/boundaries/toy2-bce"
    params = load_params(None, TINY)
    tracer = model_tracer(load_model(run / "checkpoints/last.pt"), params.boundaries)
    traced = [tracer(read_image(item.image, channels="grey")) for item in test_items(params)]
    expected = np.concatenate([equivalent_diameters(t.grains) for t in traced])
    got = snapshot_diameters(run, 2)
    assert len(expected) > 0 and got.shape == expected.shape and np.allclose(got, expected, atol=1e-3)
    assert len(snapshot_diameters(run, 1)) > 0
    # a run without them (made by an older grainlab) is a clear error, not a traceback
    (run / "snapshots/epoch-002-grain-diameters.csv").unlink()
    assert grainlab("boundaries", "study", "--from-runs", "--out", "report2", *study) == 2
    out = capsys.readouterr().out
    assert "epoch-002-grain-diameters.csv: not found" in out and "train it again" in out
    assert not (workdir / "report2").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_DATA / "images").is_dir(), reason=f"real data not found at {REAL_DATA} (set GRAINLAB_REAL_DATA)"
)
def test_tbm_dev_imports_and_trains_with_a_source_split(workdir):
    from grainlab.datasets.importer import import_dataset

    import_dataset(REAL_DATA, workdir / "data/grain_boundaries", "tbm-dev")
    assert (
        grainlab(
            "boundaries",
            "train",
            "--dataset",
            "tbm-dev",
            "--loss",
            "bce",
            *sets("boundaries.epochs=1", "boundaries.snapshot_epochs=[1]", "boundaries.unet.in_channels=3"),
        )
        == 0
    )
    import csv

    rows = list(csv.DictReader(open(workdir / "outputs/boundaries/tbm-dev-bce/history.csv")))
    assert 0 <= float(rows[-1]["val/boundary_f1"]) <= 1
    ckpt = "outputs/boundaries/tbm-dev-bce/checkpoints/last.pt"
    assert grainlab("boundaries", "evaluate", "--model", ckpt, "--dataset", "tbm-dev", *sets()) == 0
