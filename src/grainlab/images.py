"""Image files in and out: validated decoding, and writes that never leave half a file.

Every reader refuses bad files with an ImageError that names the file: empty, truncated
or corrupt files, files that are no image, images whose header claims more pixels than
the limit (a decompression bomb is refused before it is decoded), and pixel types that
are neither 8/16-bit integers nor floats in [0, 1].

Every writer goes through a temporary path (atomic_path, staged_dir). A write that fails
for a full disk or a read-only or unwritable folder raises an OutputError that names the
output path, and leaves the old file or folder as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from grainlab.errors import GrainlabError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
DEFAULT_MAX_PIXELS = 100_000_000

# The pixel limit is ours (checked on the header before decoding); PIL's own bomb check
# would raise its own error type, so it is switched off.
Image.MAX_IMAGE_PIXELS = None

# Files made through a temporary path get the usual permissions, not mkstemp's 0600.
_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageError(GrainlabError):
    pass


class OutputError(GrainlabError):
    """An output could not be written: a full disk, or a read-only or unwritable folder."""

    def __init__(self, path, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = Path(path), reason

    def __str__(self):
        return (
            f"{self.path}: cannot write ({self.reason}); nothing was left half-written there. "
            "Free some space or choose a writable output folder"
        )


# Errors that mean "this output cannot be written here". While creating a file or folder
# a permission error means the same; inside a write block it may come from reading an input.
_SETUP_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _output_errors(path, errnos=_SETUP_ERRNOS):
    """Turn an OSError with one of `errnos` into an OutputError naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in errnos:
            raise OutputError(path, _reason(exc)) from None
        raise


def ensure_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and check a file can be made in it (OutputError if not)."""
    folder = Path(folder)
    with _output_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    return folder


def _open_checked(path: Path, max_pixels: int, data: bytes | None = None) -> Image.Image:
    """Open an image and check its header (size, pixel count) without decoding any pixel.

    `data`, when given, holds the file's bytes (then `path` only names the image in messages).
    """
    if data is None:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageError(f"{path}: cannot read file ({exc.strerror})") from None
    else:
        size = len(data)
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); expected a PNG, TIFF or JPEG image")
    try:
        im = Image.open(path if data is None else io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image; expected a PNG, TIFF or JPEG file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: cannot read image ({exc})") from None
    w, h = im.size
    if w < 1 or h < 1:
        im.close()
        raise ImageError(f"{path}: image has size {w}x{h}; expected at least 1x1")
    if w * h > max_pixels:
        im.close()
        raise ImageError(
            f"{path}: header claims {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
            "(data.max_image_pixels); refusing to decode it"
        )
    return im


def _to_float(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.int32, np.uint32) or arr.dtype == np.dtype(">u2"):
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(f"{path}: integer pixel values outside 0..65535; expected an 8- or 16-bit image")
        return arr.astype(np.float32) / 65535.0
    if arr.dtype.kind == "b":
        return arr.astype(np.float32)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"{path}: float image holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"{path}: float pixel values span {lo:g}..{hi:g}; expected values in [0, 1]")
        return arr.astype(np.float32)
    raise ImageError(f"{path}: unsupported pixel type {arr.dtype}; expected 8/16-bit integers or floats")


def image_size(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None):
    """(width, height) from the image header, checked as read_image checks it; no pixel is decoded.

    `data`, when given, holds the file's bytes (then `path` only names the image in messages).
    """
    with _open_checked(Path(path), max_pixels, data) as im:
        return im.size


def read_image(
    path: str | Path,
    *,
    channels: str = "grey",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
) -> np.ndarray:
    """Decode an image as float32 in [0, 1]: (H, W) for channels='grey', (H, W, 3) for 'rgb'.

    `data`, when given, holds the file's bytes (then `path` only names the image in messages).
    """
    path = Path(path)
    im = _open_checked(path, max_pixels, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            if im.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
                im = im.convert(
                    "RGB" if channels == "rgb" or im.mode in ("P", "PA", "CMYK", "YCbCr") else "L"
                )
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None
    img = _to_float(arr, path)
    if img.ndim == 3:
        img = img[..., :3]
        if channels == "grey":
            img = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif channels == "rgb":
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img, dtype=np.float32)


def read_mask(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A boundary tracing as bool (H, W), True on boundaries.

    Anti-aliased lines are thresholded at half range. Masks drawn black-on-white are
    detected (boundaries are the minority of pixels) and inverted.
    """
    grey = read_image(path, channels="grey", max_pixels=max_pixels)
    mask = grey >= 0.5
    if mask.mean() > 0.5:
        mask = ~mask
    return mask


def read_labels(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A grain instance map saved by write_labels, as int32 (H, W)."""
    path = Path(path)
    im = _open_checked(path, max_pixels)
    try:
        arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: corrupt or truncated label image ({exc})") from None
    if arr.ndim != 2 or arr.dtype.kind not in "ui":
        raise ImageError(
            f"{path}: expected a single-channel integer label image, got {arr.dtype} {arr.shape}"
        )
    return arr.astype(np.int32)


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A full disk or an unwritable folder raises OutputError naming `path`; the old file stays.
    """
    path = Path(path)
    with _output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(path, _reason(exc)) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_bytes(path: str | Path, data) -> None:
    """Write a file atomically and durably: a temporary sibling, fsync, then rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_ready(obj):
    """Non-finite floats become null, so the file stays valid JSON."""
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_json(path: str | Path, data, *, sort_keys: bool = False):
    """Write data as indented JSON through a temporary file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_ready(data), indent=1, sort_keys=sort_keys) + "\n")


def _save(im: Image.Image, path: Path, **kw):
    fmt = "TIFF" if path.suffix.lower() in (".tif", ".tiff") else "PNG"
    with atomic_path(path) as tmp:
        im.save(tmp, format=fmt, **kw)


def write_image(path: str | Path, img: np.ndarray, *, bits: int = 8):
    """Write a float image in [0, 1] (grey or RGB) as 8-bit PNG, or 16-bit (PNG or TIFF)."""
    path = Path(path)
    arr = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)
    if bits == 16:
        if arr.ndim != 2:
            raise ValueError("16-bit output is grey only")
        _save(Image.fromarray(np.round(arr * 65535).astype(np.uint16)), path)
    else:
        _save(Image.fromarray(np.round(arr * 255).astype(np.uint8)), path)


def write_mask(path: str | Path, mask: np.ndarray):
    """Write a boolean or {0,255} mask as an 8-bit PNG, white boundaries on black."""
    _save(Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8)), Path(path))


def write_labels(path: str | Path, labels: np.ndarray):
    """Write an integer instance map (ids < 65536) as a 16-bit PNG."""
    labels = np.asarray(labels)
    if labels.max(initial=0) > 65535 or labels.min(initial=0) < 0:
        raise ValueError("label ids must lie in 0..65535")
    _save(Image.fromarray(labels.astype(np.uint16)), Path(path))


@contextlib.contextmanager
def staged_dir(target: str | Path):
    """Build a folder in a temporary sibling and swap it onto `target` only on success.

    On any error the partial folder is removed and the old `target`, if any, is kept. A full
    disk or an unwritable folder raises OutputError naming `target`.
    """
    target = Path(target)
    with _output_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            if old is not None:
                old.rename(target)
            raise
        if old is not None:
            shutil.rmtree(old)
    except OutputError as exc:  # a file inside the staged folder: name the folder, not the temporary path
        raise OutputError(target, exc.reason) from None
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(target, _reason(exc)) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_stages(target: str | Path) -> list[Path]:
    """Remove what an interrupted staged_dir or atomic_path left beside `target`.

    That is `.NAME.XXXXXXXX.tmp` (a temporary folder or file) and `.NAME.old` (the previous
    folder, set aside during the final swap). Only call it where no other process is
    building `target` at the same time. Returns the paths removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    temp = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]+\.tmp")
    removed = []
    for entry in sorted(target.parent.iterdir()):
        if entry.name != f".{target.name}.old" and not temp.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def worker_threads(n_items: int) -> int:
    """Threads for n items: one per core, at most one per item, at least one."""
    return max(1, min(n_items, os.cpu_count() or 1))


def parallel_map(fn, items: list) -> list:
    """fn over items in one thread per core, results in order. Decoding images, post-processing
    and scoring spend their time in Pillow, NumPy, SciPy and scikit-image code that releases the GIL."""
    with ThreadPoolExecutor(worker_threads(len(items))) as pool:
        return list(pool.map(fn, items))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _watch_owner(owner: int):
    while os.getppid() == owner:
        time.sleep(1.0)
    os._exit(1)


def _end_with_owner(owner: int):
    """Pool initializer: this worker ends when the process that made the pool ends, even by SIGKILL.

    On Linux the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); elsewhere
    a thread watches the parent pid. A parent that died before that took effect shows as a
    changed parent pid, checked after it.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            watched = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            watched = False
        if watched:
            if os.getppid() != owner:
                os._exit(1)
            return
    threading.Thread(target=_watch_owner, args=(owner,), daemon=True).start()


@contextlib.contextmanager
def process_pool(workers: int):
    """A ProcessPoolExecutor whose workers never outlive this process.

    The workers are direct children (fork on Linux, as before; spawn elsewhere) and die with
    it (see _end_with_owner), so a killed command leaves no orphans; on Linux they are bound
    to the thread that starts them, so use the pool from one thread. On an error or Ctrl-C,
    queued jobs are cancelled instead of waited for.
    """
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_end_with_owner, initargs=(os.getpid(),)
    )
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
