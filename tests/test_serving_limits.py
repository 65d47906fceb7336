"""Serving limits sized to what a request can do in bounded time and memory (issue 15).

A 78 KB PNG of 9000 x 9000 blank pixels once tied the boundary server up for minutes and
7.9 GB: the served pixel limit is now data.serving_max_pixels (2**22 = 2048 x 2048) per
request, all its images together, checked on the image headers before any pixel is decoded;
the pixels being traced at once in one server process are capped too (PixelGate), and a
pixel size that is not a finite positive number is refused with HTTP 400 instead of
answering astm_g = NaN.

The first tests run the pyfunc model in this process with a tiny untrained U-Net; the last
ones send the same requests to the real `mlflow models serve` (fixtures `store`, `servers`).
"""

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image, ImageFile

from grainlab.boundaries.unet import UNetArgs, build_unet
from grainlab.config import DataConfig, load_params
from serving_helpers import SERVER_LIMITS, png_base64, post

REPO = Path(__file__).resolve().parents[1]
LIMIT_ENVS = (
    "GRAINLAB_SERVING_MAX_PIXELS",
    "GRAINLAB_SERVING_MAX_IMAGE_BYTES",
    "GRAINLAB_SERVING_MAX_ROWS",
    "GRAINLAB_SERVING_MAX_INFLIGHT_PIXELS",
)


def bomb_png(side: int = 9000) -> str:
    """The issue's image: a blank side x side PNG, a few dozen KB, as base64."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def boundary_model(tmp_path, monkeypatch):
    """Load a BoundaryModel the way the server does, with the limits of the environment set first."""
    from grainlab.serving import BoundaryModel

    for name in LIMIT_ENVS:
        monkeypatch.delenv(name, raising=False)
    args = UNetArgs(depth=2, base_channels=4)
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    params = {"boundaries": {"tile_px": 64}}
    torch.save({"model_args": args.to_dict(), "model": build_unet(args).state_dict(), "params": params}, path)

    class Context:
        artifacts = {"checkpoint": str(path)}

    def load(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        model = BoundaryModel()
        model.load_context(Context())
        return model

    return load


@pytest.fixture
def no_decoding(monkeypatch):
    """Any image whose pixels get decoded fails the test."""

    def load(self):
        raise AssertionError(f"decoded the pixels of a {self.size[0]}x{self.size[1]} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def refused(model, records, fragment, code="INVALID_PARAMETER_VALUE"):
    import pandas as pd

    with pytest.raises(MlflowException) as err:
        model.predict(None, pd.DataFrame(records))
    assert err.value.error_code == code, err.value.message
    assert fragment in err.value.message, err.value.message
    return err.value


def test_default_limit_is_the_config_value_and_params_yaml_mirrors_it(monkeypatch):
    from grainlab.serving import DEFAULT_MAX_PIXELS, serving_limits

    for name in LIMIT_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert DEFAULT_MAX_PIXELS == DataConfig().serving_max_pixels == 2**22
    assert load_params(REPO / "params.yaml").data.serving_max_pixels == DEFAULT_MAX_PIXELS
    assert serving_limits().inflight_pixels == 2 * DEFAULT_MAX_PIXELS


def test_the_issue_bomb_is_refused_by_default_before_its_pixels_are_decoded(boundary_model, no_decoding):
    model = boundary_model()
    text = bomb_png()
    assert len(text) < 120_000  # far below the 32 MiB base64 limit: only the header gives it away
    start = time.perf_counter()
    error = refused(
        model,
        [{"image": text}],
        "row 0: image: header claims 9000x9000 = 81000000 pixels, over the limit of 4194304 "
        "(GRAINLAB_SERVING_MAX_PIXELS)",
    )
    assert error.get_http_status_code() == 400
    assert time.perf_counter() - start < 5


def test_the_pixels_of_a_request_count_together(boundary_model, no_decoding, monkeypatch):
    model = boundary_model(GRAINLAB_SERVING_MAX_PIXELS=10_000)
    small = png_base64(np.zeros((80, 80), np.uint8))  # 6400 px: one fits, two do not
    refused(
        model,
        [{"image": small}, {"image": small}],
        "row 1: the request's images hold 12800 pixels together (rows 0 to 1), over the limit of 10000 "
        "pixels per request (GRAINLAB_SERVING_MAX_PIXELS); send them in several requests",
    )
    monkeypatch.undo()  # decoding allowed again
    import pandas as pd

    out = model.predict(None, pd.DataFrame([{"image": small}]))
    assert len(out) == 1


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), float("inf"), float("-inf"), 2e6, None])
def test_a_pixel_size_that_is_not_a_positive_finite_number_is_refused(boundary_model, value):
    model = boundary_model()
    image = png_base64(np.zeros((32, 32), np.uint8))
    error = refused(
        model,
        [{"image": image, "pixel_size_nm": value}],
        "row 0: 'pixel_size_nm' = ",
    )
    assert "expected the pixel size in nanometres, a finite number between 0.001 and 1000000" in error.message
    assert error.get_http_status_code() == 400


def test_every_row_of_a_request_with_pixel_sizes_needs_one(boundary_model):
    import pandas as pd

    model = boundary_model()
    image = png_base64(np.zeros((32, 32), np.uint8))
    refused(
        model,
        pd.DataFrame({"image": [image, image], "pixel_size_nm": [2.0, float("nan")]}),
        "row 1: 'pixel_size_nm' = nan (NaN, null or missing in this row)",
    )
    out = model.predict(None, pd.DataFrame({"image": [image, image], "pixel_size_nm": [2.0, 3.0]}))
    assert len(out) == 2
    out = model.predict(None, pd.DataFrame({"image": [image]}))  # no column: no pixel size, no ASTM G
    assert np.isnan(out["astm_g"][0])


def test_pixels_in_flight_are_capped_and_a_request_that_does_not_fit_gets_503(boundary_model, monkeypatch):
    import pandas as pd

    import grainlab.boundaries.infer as infer

    model = boundary_model(
        GRAINLAB_SERVING_MAX_PIXELS=10_000,
        GRAINLAB_SERVING_MAX_INFLIGHT_PIXELS=10_000,
        MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=3,  # a request waits at most 1 s for its turn
    )
    assert model.gate.budget == 10_000 and model.gate.wait_s == pytest.approx(1.0)
    started, release = threading.Event(), threading.Event()
    real = infer.predict_probability

    def slow(*args, **kwargs):
        if args[1].shape == (96, 96):
            started.set()
            assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "predict_probability", slow)
    big = pd.DataFrame([{"image": png_base64(np.zeros((96, 96), np.uint8))}])  # 9216 px
    small = pd.DataFrame([{"image": png_base64(np.zeros((32, 32), np.uint8))}])  # 1024 px
    results = []
    first = threading.Thread(target=lambda: results.append(model.predict(None, big)))
    first.start()
    try:
        assert started.wait(30)
        start = time.perf_counter()
        error = refused(model, small, "server busy: 9216 pixels are being traced", "TEMPORARILY_UNAVAILABLE")
        assert error.get_http_status_code() == 503
        assert "GRAINLAB_SERVING_MAX_INFLIGHT_PIXELS" in error.message
        assert 0.9 < time.perf_counter() - start < 10
    finally:
        release.set()
        first.join(60)
    assert len(results) == 1 and model.gate.in_flight == 0
    assert len(model.predict(None, small)) == 1  # its turn now


def test_a_waiting_request_runs_as_soon_as_pixels_are_free():
    from grainlab.serving import PixelGate

    gate = PixelGate(budget=100, wait_s=30)
    entered, leave = threading.Event(), threading.Event()

    def waiter():
        with gate.admit(50):
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=waiter)
    with gate.admit(80):
        thread.start()
        assert not entered.wait(0.3) and gate.in_flight == 80
        with gate.admit(20):  # what fits goes ahead of the waiting request
            assert gate.in_flight == 100
        assert not entered.is_set()
    assert entered.wait(10) and gate.in_flight == 50
    leave.set()
    thread.join(10)
    assert gate.in_flight == 0


# --------------------------------------------------------------------------- the real server


def test_boundary_server_refuses_bad_pixel_sizes_and_bombs_with_400(store, servers):
    url = servers["grain-boundary-unet"]
    path = sorted((store / "data" / "grain_boundaries" / "test" / "images").glob("*.png"))[0]
    image = png_base64(np.asarray(Image.open(path)))
    status, body = post(url, {"dataframe_records": [{"image": image, "pixel_size_nm": 2.0}]})
    assert status == 200, body
    for bad in ("NaN", "Infinity", "-Infinity", "0", "-1.5", "null"):  # as JSON spells them
        payload = json.dumps({"dataframe_records": [{"image": image, "pixel_size_nm": "VALUE"}]})
        status, body = post(url, payload.replace('"VALUE"', bad).encode())
        assert status == 400, (bad, status, body)
        assert "'pixel_size_nm'" in body["message"] and "between 0.001 and 1000000" in body["message"], body
    limit = SERVER_LIMITS["GRAINLAB_SERVING_MAX_PIXELS"]
    start = time.perf_counter()
    status, body = post(url, {"dataframe_records": [{"image": bomb_png()}]})
    assert status == 400 and f"over the limit of {limit} (GRAINLAB_SERVING_MAX_PIXELS)" in body["message"]
    assert time.perf_counter() - start < 10
    side = int((limit * 0.6) ** 0.5)
    rows = [{"image": png_base64(np.zeros((side, side), np.uint8))}] * 2
    status, body = post(url, {"dataframe_records": rows})
    assert status == 400 and "pixels together" in body["message"], body
    status, body = post(url, {"dataframe_records": [{"image": image, "pixel_size_nm": 2.0}]})
    assert status == 200, body  # still serving


def test_recognizer_server_refuses_the_bomb_with_400(store, servers):
    url = servers["microstructure-recognizer"]
    status, body = post(url, {"dataframe_records": [{"image": bomb_png(), "px_per_um": 20.0}]})
    assert status == 400, body
    assert "9000x9000" in body["message"] and "GRAINLAB_SERVING_MAX_PIXELS" in body["message"]
