import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from grainlab.images import (
    ImageError,
    OutputError,
    atomic_path,
    read_image,
    read_labels,
    read_mask,
    staged_dir,
    write_image,
    write_labels,
    write_mask,
)


def png_header_claiming(width, height):
    """A small PNG whose header claims width x height pixels, with only a few bytes of pixel data."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def test_round_trips(tmp_path):
    img = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    write_image(tmp_path / "a.png", img)
    assert np.abs(read_image(tmp_path / "a.png") - img).max() <= 0.5 / 255 + 1e-6
    write_image(tmp_path / "a.tif", img, bits=16)
    assert np.abs(read_image(tmp_path / "a.tif") - img).max() <= 0.5 / 65535 + 1e-6
    labels = np.arange(48 * 64).reshape(48, 64) % 1000
    write_labels(tmp_path / "l.png", labels)
    assert (read_labels(tmp_path / "l.png") == labels).all()
    mask = img > 0.5
    write_mask(tmp_path / "m.png", mask)
    assert (read_mask(tmp_path / "m.png") == mask).all()
    assert not list(tmp_path.glob(".*tmp"))


def test_rgb_and_grey_conversion(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "r.png")
    assert read_image(tmp_path / "r.png", channels="rgb").shape == (8, 8, 3)
    assert read_image(tmp_path / "r.png").shape == (8, 8)
    assert read_image(tmp_path / "r.png")[0, 0] == pytest.approx(0.299, abs=1e-3)


def test_black_on_white_antialiased_mask_is_inverted(tmp_path):
    mask = np.full((20, 20), 255, np.uint8)
    mask[10, :] = 0
    mask[9, :] = 100  # anti-aliased edge, below half: part of the line
    mask[11, :] = 200  # above half: background
    Image.fromarray(mask).save(tmp_path / "m.png")
    got = read_mask(tmp_path / "m.png")
    assert got[10].all() and got[9].all() and not got[11].any() and got.sum() == 40


def test_float_and_16bit_tiff(tmp_path):
    Image.fromarray(np.full((4, 4), 0.25, np.float32)).save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif")[0, 0] == pytest.approx(0.25)
    Image.fromarray(np.full((4, 4), 7.0, np.float32)).save(tmp_path / "big.tif")
    with pytest.raises(
        ImageError, match=r"big.tif: float pixel values span 7..7; expected values in \[0, 1\]"
    ):
        read_image(tmp_path / "big.tif")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "w.png")
    assert read_image(tmp_path / "w.png")[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty file (0 bytes)"),
        (b"this is plain text, not an image", "not a readable image"),
        (png_header_claiming(50000, 50000), "50000x50000 = 2500000000 pixels, over the limit"),
        (png_header_claiming(16, 16), "corrupt or truncated"),
    ],
)
def test_bad_files_are_refused_by_name(tmp_path, content, fragment):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        read_image(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_truncated_png(tmp_path):
    write_image(tmp_path / "ok.png", np.random.default_rng(0).random((64, 64)))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: corrupt or truncated"):
        read_image(tmp_path / "cut.png")


def test_pixel_limit_is_configurable(tmp_path):
    write_image(tmp_path / "a.png", np.zeros((10, 10)))
    with pytest.raises(ImageError, match="over the limit of 99"):
        read_image(tmp_path / "a.png", max_pixels=99)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk trouble")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_staged_dir_keeps_old_folder_on_error(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "keep.txt").write_text("v1")
    with pytest.raises(RuntimeError), staged_dir(target) as tmp:
        (tmp / "partial.txt").write_text("x")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with staged_dir(target) as tmp:
        (tmp / "new.txt").write_text("v2")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=2048),
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"\xff\xd8\xff"]),
)
def test_decoding_fuzz_raises_only_image_errors(tmp_path, data, prefix):
    path = tmp_path / "fuzz.png"
    path.write_bytes(prefix + data)
    try:
        img = read_image(path, max_pixels=1_000_000)
    except ImageError:
        return
    assert img.dtype == np.float32 and np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1


def _enospc():
    import errno
    import os

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_in_atomic_path_names_the_output_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(OutputError) as err, atomic_path(target) as tmp:
        tmp.write_text("half")
        raise _enospc()
    assert str(err.value).startswith(f"{target}: cannot write (No space left on device)")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(PermissionError), atomic_path(target):  # e.g. reading an input: not a write error
        raise PermissionError(13, "Permission denied", "some-input.png")


def test_full_disk_in_staged_dir_names_the_folder_not_the_temporary_one(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "keep.txt").write_text("v1")
    with pytest.raises(OutputError) as err, staged_dir(target) as tmp:
        write_image(tmp / "images" / "a.png", np.zeros((4, 4)))
        with atomic_path(tmp / "images" / "b.png"):
            raise _enospc()
    assert err.value.path == target and ".tmp" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"] and [p.name for p in target.iterdir()] == [
        "keep.txt"
    ]


def test_staged_dir_puts_the_old_folder_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    from pathlib import Path

    target = tmp_path / "ds"
    target.mkdir()
    (target / "keep.txt").write_text("v1")
    real_rename = Path.rename

    def rename(self, dest):
        if self.name.endswith(".tmp"):  # the new folder onto the target
            raise OSError(18, "Invalid cross-device link")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="cross-device"), staged_dir(target) as tmp:
        (tmp / "new.txt").write_text("v2")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"] and [p.name for p in target.iterdir()] == [
        "keep.txt"
    ]


def test_ensure_writable(tmp_path):
    from grainlab.images import ensure_writable

    assert (
        ensure_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
        and list((tmp_path / "a" / "b").iterdir()) == []
    )
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):  # not a write-permission problem: passed on as is
        ensure_writable(tmp_path / "file")
