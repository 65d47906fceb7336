"""The model registry (champion / challenger) and the real `mlflow models serve` REST server.

A tiny boundary U-Net and a tiny recognizer are trained into a temporary MLflow store,
registered by `grainlab register`, and served from `models:/NAME@champion` on a free
loopback port. Valid requests get answers; bad payloads get a 4xx with a clear message
while the server keeps serving.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grainlab.boundaries.train import train_boundaries
from grainlab.cli import main
from grainlab.config import load_params
from grainlab.datasets.microstructures import build_library
from test_boundaries_fixtures import write_data_root
from test_recognition_cli import FAST, TINY

BOUNDARY_TINY = [
    "boundaries.unet.base_channels=4",
    "boundaries.unet.depth=2",
    "boundaries.epochs=1",
    "boundaries.snapshot_epochs=[1]",
    "boundaries.samples_per_epoch=8",
    "boundaries.crop_px=32",
    "boundaries.val_max_images=1",
    "boundaries.test_max_images=1",
    "boundaries.tile_px=64",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A project folder with tiny data, one boundary run and one recognizer, both registered."""
    root = tmp_path_factory.mktemp("serving")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    write_data_root(root / "data")
    build_library(TINY, root / "data" / "microstructures", seed=0, workers=1)
    (root / "params.yaml").write_text("seed: 0\n")
    train_boundaries(load_params(None, BOUNDARY_TINY), "toy", "bce", out_root=root / "outputs" / "boundaries")
    sets = [x for s in FAST for x in ("--set", s)]
    assert main(["recognition", "train", *sets]) == 0
    assert main(["recognition", "evaluate", *sets]) == 0
    assert main(["register"]) == 0
    yield root
    mp.undo()


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
    assert state["alias"] == "challenger" and state["run_id"] == worse.run_id
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(store):
    """Both champions served by `mlflow models serve` on loopback ports."""
    bin_dir = Path(sys.executable).parent  # the server execs uvicorn from the environment's PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    procs, urls = [], {}
    for name in ("grain-boundary-unet", "microstructure-recognizer"):
        port = free_port()
        cmd = [
            bin_dir / "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{name}@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        for (name, url), proc in zip(urls.items(), procs, strict=True):
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{url}/ping", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"{name} server did not start:\n{proc.stdout.read().decode()[-3000:]}")
                    time.sleep(0.5)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def post(url, payload):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def png_base64(array) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


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
    image = sorted((store / "data" / "microstructures").rglob("*.png"))[0]
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
