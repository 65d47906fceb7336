"""`grainlab boundaries trace` writes an image's outputs as a group or not at all (issue 15).

A tiny untrained U-Net checkpoint is enough: what is tested is where the outputs go when a
write fails midway, not what they hold.
"""

import contextlib
import errno
import os

import numpy as np
import pytest
import torch

from grainlab import images
from grainlab.boundaries import tracing
from grainlab.boundaries.unet import UNetArgs, build_unet
from grainlab.cli import main
from grainlab.images import write_image

OUTPUTS = {
    "a-probability.png",
    "a-tracing.png",
    "a-grains.png",
    "a-overlay.png",
    "a-grains.csv",
    "stats.csv",
    "stats.json",
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    args = UNetArgs(depth=2, base_channels=4)
    torch.manual_seed(0)
    torch.save(
        {"model_args": args.to_dict(), "model": build_unet(args).state_dict(), "params": {}, "epoch": 0},
        tmp_path / "model.pt",
    )
    write_image(tmp_path / "a.png", np.random.default_rng(0).random((48, 64)))
    return tmp_path


def trace(*extra):
    return main(
        ["boundaries", "trace", "a.png", "--model", "model.pt", "--set", "boundaries.tile_px=64", *extra]
    )


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else None


def error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()]


def fail_on_write(monkeypatch, nth: int):
    """Every output goes through images.atomic_path; the nth write runs out of disk space
    after its bytes went into the temporary file."""
    real = images.atomic_path
    calls = []

    @contextlib.contextmanager
    def failing(path):
        with real(path) as tmp:
            yield tmp
            calls.append(path)
            if len(calls) == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(images, "atomic_path", failing)
    return calls


def test_trace_writes_all_outputs_and_leaves_no_temporary_files(project, capsys):
    assert trace("--out", "out") == 0
    assert listing(project / "out") == sorted(OUTPUTS)
    assert trace("--out", "out") == 0  # again into the same folder: replaced, nothing left over
    assert listing(project / "out") == sorted(OUTPUTS)


def test_full_disk_on_the_fourth_file_leaves_no_partial_outputs(project, capsys, monkeypatch):
    calls = fail_on_write(monkeypatch, 4)
    assert trace("--out", "out") == 2
    assert len(calls) == 4
    assert listing(project / "out") is None  # the folder this run made is gone again
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("grainlab: error: ")
    assert "out/a-overlay.png: cannot write (No space left on device)" in lines[0]
    assert ".tmp" not in lines[0] and "Traceback" not in lines[0]


def test_full_disk_keeps_the_previous_run_outputs(project, capsys, monkeypatch):
    assert trace("--out", "out") == 0
    before = {name: (project / "out" / name).read_bytes() for name in OUTPUTS}
    (project / "out" / "notes.txt").write_text("mine")
    write_image(project / "a.png", np.random.default_rng(1).random((48, 64)))  # new outputs would differ
    fail_on_write(monkeypatch, 6)
    assert trace("--out", "out") == 2
    assert listing(project / "out") == sorted([*OUTPUTS, "notes.txt"])
    assert {name: (project / "out" / name).read_bytes() for name in OUTPUTS} == before
    assert len(error_lines(capsys)) == 1


def test_a_failed_rename_midway_puts_the_previous_outputs_back(project, capsys, monkeypatch):
    assert trace("--out", "out") == 0
    before = {name: (project / "out" / name).read_bytes() for name in OUTPUTS}
    write_image(project / "a.png", np.random.default_rng(1).random((48, 64)))
    real = os.replace
    moved_in = []

    def replace(src, dst):
        if os.path.dirname(os.path.abspath(dst)) == os.fspath(project / "out"):
            moved_in.append(dst)
            if len(moved_in) == 3:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(dst))
        return real(src, dst)

    monkeypatch.setattr(tracing.os, "replace", replace)
    assert trace("--out", "out") == 2
    monkeypatch.setattr(tracing.os, "replace", real)
    assert listing(project / "out") == sorted(OUTPUTS)
    assert {name: (project / "out" / name).read_bytes() for name in OUTPUTS} == before
    lines = error_lines(capsys)
    assert len(lines) == 1 and "Read-only file system" in lines[0], lines


def test_out_pointing_at_a_file_is_one_clear_line(project, capsys):
    (project / "taken").write_text("a file")
    assert trace("--out", "taken") == 2
    lines = error_lines(capsys)
    assert lines == ["grainlab: error: taken: is a file; expected an output folder (made if missing)"]
    assert trace("--out", "taken/sub") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "taken/sub: lies under taken, which is a file" in lines[0], lines
    assert (project / "taken").read_text() == "a file"
