"""Shared by test_serving.py and test_load.py: a project with both models trained and
registered, the real `mlflow models serve` processes for them, and an HTTP client.

The fixtures `store` and `servers` (conftest.py) wrap make_store and run_servers; being
module-scoped, each test module that uses them gets its own store and servers.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
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
MODELS = ("grain-boundary-unet", "microstructure-recognizer")
# The request limits the servers run with (serving.py reads them when it loads a model).
SERVER_LIMITS = {
    "GRAINLAB_SERVING_MAX_IMAGE_BYTES": 2_000_000,
    "GRAINLAB_SERVING_MAX_PIXELS": 1_000_000,
    "GRAINLAB_SERVING_MAX_ROWS": 8,
}


def make_store(tmp_path_factory):
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Servers(dict):
    """Model name -> base URL, with the server processes in .procs (same order)."""

    procs: list[subprocess.Popen]


def serve_command(name: str, port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    return [
        str(bin_dir / "mlflow"),
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


def run_servers(store):
    """Both champions served by `mlflow models serve` on loopback ports, with SERVER_LIMITS."""
    bin_dir = Path(sys.executable).parent  # the server execs uvicorn from the environment's PATH
    env = {
        **os.environ,
        **{k: str(v) for k, v in SERVER_LIMITS.items()},
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    urls = Servers()
    urls.procs = []
    for name in MODELS:
        port = free_port()
        urls.procs.append(
            subprocess.Popen(
                serve_command(name, port),
                cwd=store,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        for (name, url), proc in zip(urls.items(), urls.procs, strict=True):
            deadline = time.monotonic() + 180
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
        for proc in urls.procs:
            proc.terminate()
            proc.wait(timeout=30)


def post(url, payload, timeout=120):
    """POST to /invocations: (HTTP status, parsed JSON body or {"message": text})."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read() or b"{}"
        try:
            return err.code, json.loads(text)
        except json.JSONDecodeError:
            return err.code, {"message": text.decode(errors="replace")}


def image_base64(array, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def png_base64(array) -> str:
    return image_base64(array, "PNG")


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the `mlflow models serve` CLI and
    the uvicorn server it starts); shared pages count once per process, so this errs high."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRSS:
    """Samples tree_rss(pid) every `every` seconds in a thread while the block runs: .idle (bytes
    before the block) and .peak (the highest sample)."""

    def __init__(self, pid: int, every: float = 0.05):
        self.pid, self.every = pid, every
        self.idle = self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, tree_rss(self.pid))

    def __enter__(self):
        self.idle = self.peak = tree_rss(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))
