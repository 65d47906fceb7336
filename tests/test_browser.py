"""After `make run`, what a user opens, in headless Chromium (Debian's chromium and chromedriver,
driven by Selenium): reports/index.html with every figure loaded and no console error, and the
MLflow UI (`make ui` on a free loopback port) listing the study's runs with their metrics.

`make test-browser` runs them (CI does, after `make run`); there a missing Chromium or a missing
`make run` output is a failure, elsewhere a skip with the reason. Screenshots go to reports/.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = bool(os.environ.get("GRAINLAB_REQUIRE_BROWSER"))
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,1000",
]

pytestmark = pytest.mark.browser


def _need(condition: bool, reason: str):
    if not condition:
        (pytest.fail if REQUIRED else pytest.skip)(reason)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    _need(
        bool(chromium and driver),
        "headless Chromium not installed (apt-get install chromium chromium-driver)",
    )
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_page_load_timeout(120)
    yield session
    session.quit()


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout:.0f} s")
        time.sleep(0.5)


def test_report_figures_load_without_console_errors(browser):
    report = ROOT / "reports" / "index.html"
    _need(report.is_file(), "no reports/index.html: run `make run` first")
    browser.get(report.as_uri())
    _wait(
        lambda: browser.execute_script("return document.readyState") == "complete",
        60,
        "the report never loaded",
    )
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
    )
    assert len(images) >= 10, f"the report shows only {len(images)} figures"
    broken = [src for src, ok in images if not ok]
    assert not broken, f"figures that did not load: {broken}"
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"
    browser.save_screenshot(str(ROOT / "reports" / "index_screenshot.png"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_lists_the_study_runs_with_their_metrics(browser):
    from mlflow import MlflowClient

    from grainlab.config import load_params

    _need((ROOT / "mlflow.db").is_file(), "no mlflow.db: run `make run` first")
    experiment = MlflowClient(f"sqlite:///{ROOT / 'mlflow.db'}").get_experiment_by_name("grain-boundaries")
    _need(experiment is not None, "no grain-boundaries experiment: run `make run` first")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    cfg = load_params(ROOT / "params.yaml").boundaries
    expected = [f"{d}-{loss}" for d in cfg.study_datasets for loss in cfg.study_losses]
    assert len(expected) == 12

    port = _free_port()
    ui = subprocess.Popen(
        ["make", "--no-print-directory", "ui", f"UI_PORT={port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # make and the server it starts end together
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def answers():
            assert ui.poll() is None, f"`make ui` ended:\n{ui.communicate()[0]}"
            try:
                return urllib.request.urlopen(base, timeout=2).status == 200
            except OSError:
                return False

        _wait(answers, 120, "the MLflow UI did not answer")
        # The link `make ui` prints: the experiment's runs table, in the UI's model-training mode.
        browser.get(f"{base}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
        body = lambda: browser.find_element("tag name", "body").text  # noqa: E731
        _wait(lambda: all(name in body() for name in expected), 90, f"runs not all in the table: {expected}")
        browser.find_element("xpath", "//*[text()='Columns']").click()  # the metric columns on offer
        _wait(lambda: "test/boundary_f1" in body(), 30, "no test/boundary_f1 metric column in the runs table")
        browser.save_screenshot(str(ROOT / "reports" / "mlflow_runs.png"))
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
