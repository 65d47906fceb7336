"""After `make run`: the MLflow UI, opened in headless Chromium, lists the study's runs.

Slow and dependent on the demo's outputs: `make test-slow` after `make run`. Needs Debian's
`chromium` (apt-get install chromium chromium-driver); skips with the reason otherwise.
The screenshot goes to reports/mlflow_runs.png.
"""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=20000",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"),
    pytest.mark.skipif(not (ROOT / "mlflow.db").is_file(), reason="no mlflow.db: run `make run` first"),
]


def test_mlflow_ui_lists_the_study_runs(tmp_path):
    from mlflow import MlflowClient

    from grainlab.config import load_params

    uri = f"sqlite:///{ROOT / 'mlflow.db'}"
    experiment = MlflowClient(uri).get_experiment_by_name("grain-boundaries")
    assert experiment is not None, "no grain-boundaries experiment: run `make run` first"
    cfg = load_params(ROOT / "params.yaml").boundaries
    expected = [f"{d}-{loss}" for d in cfg.study_datasets for loss in cfg.study_losses]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    ui = subprocess.Popen(
        [bin_dir / "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "the MLflow UI did not start"
                time.sleep(0.5)
        page = f"{url}/#/experiments/{experiment.experiment_id}/runs"
        dom = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'a'}", "--dump-dom", page],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        shot = ROOT / "reports" / "mlflow_runs.png"
        shot.parent.mkdir(exist_ok=True)
        subprocess.run(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={tmp_path / 'b'}",
                "--window-size=1600,1000",
                f"--screenshot={shot}",
                page,
            ],
            capture_output=True,
            timeout=120,
        )
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    missing = [name for name in expected if name not in dom]
    assert not missing, f"runs not in the MLflow UI's runs table: {missing}"
    assert shot.is_file() and shot.stat().st_size > 10_000
