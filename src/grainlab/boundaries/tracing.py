"""Trace image files with a trained model and write every output for them.

For each IMAGE, into the output folder:
    <stem>-probability.png   boundary probability (8-bit)
    <stem>-tracing.png       one-pixel boundary network
    <stem>-grains.png        grain label map (16-bit)
    <stem>-overlay.png       the image with the tracing in red
    <stem>-grains.csv        one row per grain (area, equivalent diameter, centroid)
and for all images together stats.csv and stats.json (count, mean area and diameter,
Heyn mean intercept, ASTM E112 G when the pixel size is known).

The outputs of one run are written as a group or not at all: every file goes first into a
hidden temporary folder inside the output folder, and only when all of them are written are
they renamed into place. A full disk, an unwritable folder or any other error midway leaves
the output folder as it was (files of an earlier run included) and raises one error.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from grainlab import images as image_io
from grainlab.boundaries.evaluate import model_tracer
from grainlab.boundaries.figures import overlay
from grainlab.boundaries.grains import grain_stats, grain_table
from grainlab.boundaries.infer import LoadedModel
from grainlab.config import BoundaryConfig
from grainlab.errors import GrainlabError
from grainlab.images import OutputError, image_size, read_image, write_image, write_labels, write_mask

# OS errors that mean "outputs cannot be written here" (as in images.OutputError): while making
# the folder, and (narrower, since a permission error there may come from reading an input) later
_SETUP_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _write_csv(path: Path, rows: list[dict]):
    with image_io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["grain"])
        writer.writeheader()
        writer.writerows(rows)


def check_out_dir(out_dir: Path) -> Path:
    """The output folder may exist or not, but neither it nor a folder above it may be a file."""
    out_dir = Path(out_dir)
    for path in (out_dir, *out_dir.parents):
        if path.is_dir():
            break
        if path.exists() or path.is_symlink():
            where = "is a file" if path == out_dir else f"lies under {path}, which is a file"
            raise GrainlabError(f"{out_dir}: {where}; expected an output folder (made if missing)")
    return out_dir


@contextlib.contextmanager
def staged_outputs(out_dir: Path):
    """Yield a temporary folder inside `out_dir`; on success move every file written there into
    `out_dir` (replacing files of the same name), else remove it and leave `out_dir` as it was.

    A full disk or an unwritable folder raises OutputError naming the output that failed, in
    `out_dir`, never the temporary path.
    """
    out_dir = check_out_dir(out_dir)
    made = not out_dir.exists()
    try:
        image_io.ensure_writable(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=".trace.", suffix=".tmp", dir=out_dir))
    except (OSError, OutputError) as exc:
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        if isinstance(exc, OSError) and exc.errno in _SETUP_ERRNOS:
            raise OutputError(out_dir, exc.strerror or str(exc)) from None
        raise
    try:
        yield tmp
        _move_into(tmp, out_dir)
    except OutputError as exc:
        target = out_dir / exc.path.name if exc.path.parent == tmp else out_dir
        raise OutputError(target, exc.reason) from None
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(out_dir, exc.strerror or str(exc)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when nothing was moved in: rmdir refuses a folder with files


def _move_into(staged: Path, out_dir: Path):
    """Rename the files of `staged` into `out_dir`; if one rename fails, undo the others."""
    names = sorted(p.name for p in staged.iterdir() if p.is_file())
    for name in names:
        if (out_dir / name).is_dir():
            raise GrainlabError(f"{out_dir / name}: is a folder; cannot write the output file of that name")
    old = staged / ".old"  # files of an earlier run that are being replaced, kept until all are in
    old.mkdir()
    moved = []
    try:
        for name in names:
            if (out_dir / name).exists():
                os.replace(out_dir / name, old / name)
            os.replace(staged / name, out_dir / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            with contextlib.suppress(OSError):
                os.unlink(out_dir / name)
        for kept in old.iterdir():
            with contextlib.suppress(OSError):
                os.replace(kept, out_dir / kept.name)
        raise


def trace_files(
    model: LoadedModel,
    images: list[Path],
    out_dir: Path,
    cfg: BoundaryConfig,
    pixel_size_nm: float | None = None,
    max_pixels: int = 100_000_000,
) -> list[dict]:
    """Trace each image file and write all outputs as one group; returns one statistics row per image."""
    check_out_dir(out_dir)
    for path in images:  # a missing or oversized image stops the run before any tracing
        image_size(path, max_pixels=max_pixels)
    tracer = model_tracer(model, cfg)
    channels = "rgb" if model.in_channels == 3 else "grey"
    rows = []
    with staged_outputs(out_dir) as stage:
        for path in images:
            image = read_image(path, channels=channels, max_pixels=max_pixels)
            result = tracer(image)
            stem = Path(path).stem
            write_image(stage / f"{stem}-probability.png", result.probability)
            write_mask(stage / f"{stem}-tracing.png", result.tracing)
            write_labels(stage / f"{stem}-grains.png", result.grains)
            write_image(stage / f"{stem}-overlay.png", overlay(image, result.tracing))
            _write_csv(stage / f"{stem}-grains.csv", grain_table(result.grains, pixel_size_nm))
            rows.append(
                {"image": str(path), **grain_stats(result.tracing, result.grains, pixel_size_nm).to_dict()}
            )
        _write_csv(stage / "stats.csv", rows)
        with image_io.atomic_path(stage / "stats.json") as tmp:
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
    return rows
