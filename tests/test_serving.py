"""The model registry (champion / challenger) and the real `mlflow models serve` REST server.

A tiny boundary U-Net and a tiny recognizer are trained into a temporary MLflow store,
registered by `grainlab register`, and served from `models:/NAME@champion` on a free
loopback port. Valid requests get answers; bad payloads get a 4xx with a clear message
while the server keeps serving.
"""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from grainlab.boundaries.train import train_boundaries
from grainlab.cli import main
from grainlab.config import load_params
from serving_helpers import BOUNDARY_TINY, SERVER_LIMITS, image_base64, png_base64, post
from test_images import png_header_claiming


def registry_state(root):
    return {m["model"]: m for m in json.loads((root / "outputs" / "registry.json").read_text())["models"]}


def test_register_sets_champion_and_is_idempotent(store):
    state = registry_state(store)
    assert state["grain-boundary-unet"]["alias"] == "champion"
    assert state["microstructure-recognizer"]["alias"] == "champion"
    assert main(["register"]) == 0
    again = registry_state(store)
    assert again["grain-boundary-unet"]["version"] == state["grain-boundary-unet"]["version"]


def test_candidate_worse_on_heldout_becomes_challenger_better_becomes_champion(store):
    from mlflow import MlflowClient

    client = MlflowClient()
    champion = registry_state(store)["grain-boundary-unet"]
    held = champion["test/boundary_f1"]
    worse = train_boundaries(
        load_params(None, [*BOUNDARY_TINY, "seed=1"]), "toy", "mse", out_root=store / "outputs" / "boundaries"
    )
    # The new run wins on validation but loses on the held-out test metric.
    client.log_metric(worse.run_id, "val/boundary_f1", 2.0, step=99)
    client.log_metric(worse.run_id, "test/boundary_f1", held - 0.1, step=99)
    assert main(["register"]) == 0
    state = registry_state(store)["grain-boundary-unet"]
    assert state["alias"] == "challenger" and state["run_name"] == "toy-mse"
    assert (
        int(client.get_model_version_by_alias("grain-boundary-unet", "champion").version)
        == champion["version"]
    )
    # Now it also wins on the held-out metric: the champion alias moves.
    client.log_metric(worse.run_id, "test/boundary_f1", held + 0.1, step=100)
    client.log_metric(worse.run_id, "val/boundary_f1", 2.0, step=100)
    assert main(["register"]) == 0
    new = registry_state(store)["grain-boundary-unet"]
    assert new["alias"] == "champion"
    version = client.get_model_version_by_alias("grain-boundary-unet", "champion")
    assert version.run_id == worse.run_id
    assert version.tags["data_dvc_md5"] and version.tags["git_commit"]
    assert float(version.tags["test/boundary_f1"]) == pytest.approx(held + 0.1)


def test_boundary_server_answers_and_rejects_bad_payloads(store, servers):
    url = servers["grain-boundary-unet"]
    image = sorted((store / "data" / "grain_boundaries" / "test" / "images").glob("*.png"))[0]
    good = {"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode()}]}
    status, body = post(url, good)
    assert status == 200, body
    row = body["predictions"][0]
    tracing = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["tracing_png"]))))
    assert tracing.shape == np.asarray(Image.open(image)).shape[:2] and row["grain_count"] >= 1

    bad = [
        {"dataframe_records": [{"image": base64.b64encode(b"not an image at all").decode()}]},
        {"dataframe_records": [{"img": good["dataframe_records"][0]["image"]}]},
        {"dataframe_records": [{"image": "%%% not base64 %%%"}]},
        b"{ this is not json",
    ]
    for payload in bad:
        status, body = post(url, payload)
        assert 400 <= status < 500, (payload, status, body)
        assert body.get("message"), body
    assert post(url, good)[0] == 200  # still serving


def test_recognizer_server_answers_and_rejects_bad_payloads(store, servers):
    url = servers["microstructure-recognizer"]
    image = sorted((store / "data" / "microstructures" / "quiz1").rglob("*.png"))[0]
    b64 = base64.b64encode(image.read_bytes()).decode()
    status, body = post(url, {"dataframe_records": [{"image": b64, "px_per_um": 20.0}]})
    assert status == 200, body
    row = body["predictions"][0]
    assert "none" in json.dumps(row) and "extrapolating" in json.dumps(row)
    for payload in (
        {"dataframe_records": [{"image": b64}]},  # missing px/um
        {"dataframe_records": [{"image": b64, "px_per_um": -3.0}]},
        {"dataframe_records": [{"image": base64.b64encode(b"GIF89a junk").decode(), "px_per_um": 5.0}]},
        {"dataframe_records": [{"picture": b64, "px_per_um": 5.0}]},
    ):
        status, body = post(url, payload)
        assert 400 <= status < 500, (payload, status, body)
        assert body.get("message"), body
    assert post(url, {"dataframe_records": [{"image": b64, "px_per_um": 20.0}]})[0] == 200


# --------------------------------------------------------------------------- odd images and size limits


def _tiff_base64(array) -> str:
    return image_base64(array, "TIFF")


def _refused(url, payload, fragment):
    status, body = post(url, payload)
    assert 400 <= status < 500, (status, body)
    assert fragment in body.get("message", ""), body
    assert "Traceback" not in body.get("message", "")


def test_boundary_server_odd_images_and_size_limits(store, servers):
    url = servers["grain-boundary-unet"]
    path = sorted((store / "data" / "grain_boundaries" / "test" / "images").glob("*.png"))[0]
    grey8 = np.asarray(Image.open(path))

    def rows(*images):
        return {"dataframe_records": [{"image": b} for b in images]}

    status, body = post(url, rows(png_base64(grey8)))
    assert status == 200, body
    reference = body["predictions"][0]
    # A 16-bit PNG and a float32 TIFF of the same picture are normalised to the same floats.
    for same in (png_base64(grey8.astype(np.uint16) * 257), _tiff_base64(grey8.astype(np.float32) / 255)):
        status, body = post(url, rows(same))
        assert status == 200, body
        assert body["predictions"][0] == reference
    status, body = post(url, rows(png_base64(np.full((1, 1), 128, np.uint8))))  # one pixel: still traced
    assert status == 200, body
    assert np.asarray(
        Image.open(io.BytesIO(base64.b64decode(body["predictions"][0]["tracing_png"])))
    ).shape == (1, 1)

    limit_px = SERVER_LIMITS["GRAINLAB_SERVING_MAX_PIXELS"]
    limit_bytes = SERVER_LIMITS["GRAINLAB_SERVING_MAX_IMAGE_BYTES"]
    limit_rows = SERVER_LIMITS["GRAINLAB_SERVING_MAX_ROWS"]
    _refused(url, rows(_tiff_base64(np.full((8, 8), 7.0, np.float32))), "expected values in [0, 1]")
    bomb = base64.b64encode(png_header_claiming(50000, 50000)).decode()
    _refused(url, rows(bomb), f"over the limit of {limit_px} (GRAINLAB_SERVING_MAX_PIXELS)")
    _refused(url, rows(png_base64(np.zeros((1001, 1000), np.uint8))), f"over the limit of {limit_px}")
    huge = base64.b64encode(b"\0" * (limit_bytes)).decode()  # ~2.7 MB of base64, refused before decoding
    _refused(url, rows(huge), f"over the limit of {limit_bytes} (GRAINLAB_SERVING_MAX_IMAGE_BYTES)")
    _refused(
        url, rows(*[png_base64(grey8)] * (limit_rows + 1)), f"over the limit of {limit_rows} per request"
    )
    status, body = post(url, rows(png_base64(grey8)))  # still serving, same answer
    assert status == 200 and body["predictions"][0] == reference


def test_recognizer_server_odd_images_and_size_limits(store, servers):
    url = servers["microstructure-recognizer"]
    path = sorted((store / "data" / "microstructures" / "quiz1").rglob("*.png"))[0]
    grey8 = np.asarray(Image.open(path).convert("L"))

    def rows(*images, px=20.0):
        return {"dataframe_records": [{"image": b, "px_per_um": px} for b in images]}

    status, body = post(url, rows(png_base64(grey8)))
    assert status == 200, body
    reference = body["predictions"][0]
    for same in (png_base64(grey8.astype(np.uint16) * 257), _tiff_base64(grey8.astype(np.float32) / 255)):
        status, body = post(url, rows(same))
        assert status == 200 and body["predictions"][0] == reference, body
    _refused(
        url, rows(png_base64(np.zeros((1, 1), np.uint8))), "1x1 pixels is smaller than the smallest crop"
    )
    _refused(
        url, rows(png_base64(np.zeros((20, 40), np.uint8))), "40x20 pixels is smaller than the smallest crop"
    )
    bomb = base64.b64encode(png_header_claiming(50000, 50000)).decode()
    _refused(url, rows(bomb), "over the limit of 1000000 (GRAINLAB_SERVING_MAX_PIXELS)")
    huge = base64.b64encode(b"\0" * SERVER_LIMITS["GRAINLAB_SERVING_MAX_IMAGE_BYTES"]).decode()
    _refused(url, rows(huge), "GRAINLAB_SERVING_MAX_IMAGE_BYTES")
    _refused(url, rows(*[png_base64(grey8)] * 9), "9 images, over the limit of 8 per request")
    _refused(url, {**rows(png_base64(grey8)), "params": {"n_crops": 0}}, "n_crops = 0")
    status, body = post(url, rows(png_base64(grey8)))
    assert status == 200 and body["predictions"][0] == reference


def test_serving_limits_come_from_the_environment(monkeypatch):
    from grainlab.errors import GrainlabError
    from grainlab.serving import DEFAULT_MAX_ROWS, serving_limits

    monkeypatch.delenv("GRAINLAB_SERVING_MAX_ROWS", raising=False)
    monkeypatch.setenv("GRAINLAB_SERVING_MAX_PIXELS", "1234")
    limits = serving_limits(default_pixels=99)
    assert limits.max_pixels == 1234 and limits.max_rows == DEFAULT_MAX_ROWS
    monkeypatch.delenv("GRAINLAB_SERVING_MAX_PIXELS")
    assert serving_limits(default_pixels=99).max_pixels == 99
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv("GRAINLAB_SERVING_MAX_IMAGE_BYTES", bad)
        with pytest.raises(
            GrainlabError, match=f"GRAINLAB_SERVING_MAX_IMAGE_BYTES='{bad}': expected a positive"
        ):
            serving_limits()
