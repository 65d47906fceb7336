"""Every MLflow call of grainlab: where runs go, their tags, metrics and artifacts.

By default runs go to the repository's `mlflow.db` (SQLite, as an absolute path so that
`dvc exp run --temp` still finds it) with artifacts under `mlruns/`. The environment
variable MLFLOW_TRACKING_URI points everything at a tracking server instead.

The first call in a process checks that the tracking server answers (urls.reach: one line
within GRAINLAB_CONNECT_TIMEOUT_S, not minutes of retries) and, on PostgreSQL, sets the store's
tables up under an advisory lock, so that workers starting together on an empty database do not
race. Experiments are marked as model-training experiments, so that MLflow 3's UI opens on the
runs table. Each run records its host and pid: a run left RUNNING by a killed process is marked
FAILED by `reap_orphans` (called when a run starts, and by `grainlab runs reap`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import socket
import subprocess
from pathlib import Path

from grainlab import urls
from grainlab.errors import GrainlabError
from grainlab.urls import mask_url

BOUNDARY_EXPERIMENT = "grain-boundaries"
RECOGNITION_EXPERIMENT = "microstructure-recognition"
# MLflow 3's UI opens an experiment of this kind on its runs table (not on the GenAI traces page).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
_READY: set[str] = set()


def project_root() -> Path:
    """The repository root, also from inside a `dvc exp run --temp` copy under .dvc/tmp/exps."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def _mlflow():
    import mlflow

    uri = tracking_uri()
    if uri not in _READY:
        _prepare(uri)
        _READY.add(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


def _prepare(uri: str):
    """Once per process: reach the server, set a PostgreSQL store's tables up under a lock, quiet logs."""
    from mlflow import MlflowClient

    # The system-metrics monitor logs INFO lines at every run start and stop; keep its warnings.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    # Fewer HTTP retries than MLflow's default 7 with exponential back-off (minutes on a dead server).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    urls.reach(uri, "the MLflow tracking server")
    with urls.schema_lock(uri, "the MLflow tracking store"):
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # creates or upgrades the tables
        except Exception as exc:  # SQLAlchemy's and MLflow's many error types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise GrainlabError(
                f"cannot open the MLflow tracking store {mask_url(uri)}: {type(exc).__name__}: {mask_url(first)}"
            ) from None


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it (artifacts under the repo's mlruns/) if needed, marked as a
    model-training experiment. Two processes creating it at once both get the same one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow = _mlflow()
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            location = (project_root() / "mlruns").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:
            exp = mlflow.get_experiment_by_name(name)  # another process created it meanwhile
            if exp is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def ui_links(base_url: str) -> list[str]:
    """The MLflow UI's runs-table link of each experiment. MLflow 3's UI opens experiments in its
    GenAI mode (a traces overview) unless its model-training mode is asked for in the link."""
    from mlflow import MlflowClient

    _mlflow()
    return [
        f"{e.name}: {base_url}/#/experiments/{e.experiment_id}?workflowType=machine_learning"
        for e in MlflowClient().search_experiments()
        if e.name != "Default"
    ]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=project_root(), check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_md5() -> str:
    """The md5 of data.dvc: which version of the data a run saw."""
    path = project_root() / "data.dvc"
    if not path.is_file():
        return "none"
    return hashlib.md5(path.read_bytes()).hexdigest()


def standard_tags(**extra) -> dict[str, str]:
    return {"git_commit": git_commit(), "data_dvc_md5": data_md5(), **{k: str(v) for k, v in extra.items()}}


class RunStopped(Exception):
    """Raised to stop a run on purpose (e.g. an Optuna trial pruned): the run ends as KILLED, not FAILED."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run: it ends KILLED, as after Ctrl-C."""


@contextlib.contextmanager
def _sigterm_stops_run():
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _process_tags() -> dict[str, str]:
    import psutil

    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": str(pid),
        "pid_start": str(psutil.Process(pid).create_time()),
    }


def _alive(tags: dict) -> bool:
    import psutil

    try:
        return str(psutil.Process(int(tags["pid"])).create_time()) == tags.get("pid_start")
    except (KeyError, ValueError, psutil.Error):
        return False


def reap_orphans(experiment_ids: list[str] | None = None) -> list[str]:
    """Mark FAILED the RUNNING runs that this host's processes started and that are gone
    (SIGKILL, a crash, a power cut); return their ids. Runs of other hosts are left alone."""
    from mlflow import MlflowClient

    _mlflow()
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    host = socket.gethostname()
    reaped = []
    for run in client.search_runs(
        experiment_ids, f"attributes.status = 'RUNNING' and tags.host = '{host}'", max_results=1000
    ):
        if "pid" in run.data.tags and not _alive(run.data.tags):
            reason = f"orphaned: process {run.data.tags['pid']} on {host} ended without closing the run"
            client.set_tag(run.info.run_id, "failure_reason", reason)
            client.set_terminated(run.info.run_id, "FAILED")
            reaped.append(run.info.run_id)
    return reaped


def log_dataset(name: str, path: str | Path):
    """The run's dataset as an MLflow dataset input (the UI's Dataset column), digest = data.dvc's md5."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name, digest=data_md5())
    _mlflow().log_input(dataset, context="training")


@contextlib.contextmanager
def run(
    experiment: str,
    *,
    run_name: str | None = None,
    run_id: str | None = None,
    params=None,
    tags=None,
    system_metrics: bool = True,
    parent_run_id: str | None = None,
    dataset: tuple[str, Path] | None = None,
):
    """Start (or, with run_id, resume) an MLflow run; mark it FAILED with the reason on error,
    KILLED on Ctrl-C, SIGTERM or RunStopped.

    parent_run_id nests the run under another (as a tag, so the parent need not be active);
    dataset = (name, folder) logs the run's dataset input.
    """
    mlflow = _mlflow()
    exp_id = ensure_experiment(experiment)
    reap_orphans([exp_id])
    active = mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp_id,
        run_name=run_name,
        log_system_metrics=system_metrics,
    )
    try:
        with _sigterm_stops_run():
            mlflow.set_tags(_process_tags())
            if params and not run_id:
                log_params(params)
            if dataset and not run_id:
                log_dataset(*dataset)
            if parent_run_id:
                mlflow.set_tag("mlflow.parentRunId", parent_run_id)
            if tags:
                mlflow.set_tags(tags)
            yield active
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, RunStopped))
        mlflow.set_tag("stop_reason" if stopped else "failure_reason", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run(status="KILLED" if stopped else "FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_params(params: dict):
    mlflow = _mlflow()
    items = [(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def log_metrics(metrics: dict, step: int | None = None):
    """Log the finite numeric metrics of a flat dict (names like 'val/boundary_f1')."""
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if clean:
        _mlflow().log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None):
    _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None):
    _mlflow().log_artifacts(str(folder), artifact_path=artifact_path)


def set_tags(tags: dict):
    _mlflow().set_tags({k: str(v) for k, v in tags.items()})


def active_tags() -> dict[str, str]:
    mlflow = _mlflow()
    return dict(mlflow.get_run(mlflow.active_run().info.run_id).data.tags)


def download_model_checkpoint(uri: str) -> Path:
    """The checkpoint file (*.pt) of a logged boundary model: models:/NAME/VERSION or runs:/ID/model."""
    mlflow = _mlflow()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # MLflow raises its own exception types
        raise GrainlabError(
            f"cannot fetch model {uri!r} from {mask_url(tracking_uri())}: {mask_url(str(exc))}"
        ) from None
    found = sorted(local.rglob("*.pt"))
    if not found:
        raise GrainlabError(
            f"{uri}: the model's artifacts hold no checkpoint (*.pt); is it a boundary model?"
        )
    return found[0]


def log_pyfunc_model(name: str, python_model, artifacts: dict, signature, packages, code_paths=None):
    """Log a pyfunc model (see serving.py) to the active run, its pip requirements pinned to the
    installed versions of `packages`. Its weights are plain tensors, loaded with weights_only=True.

    Pinning skips MLflow's requirement inference, which loads and runs the model in a subprocess.
    """
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in packages:
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return _mlflow().pyfunc.log_model(
        name=name,
        python_model=python_model,
        artifacts=artifacts,
        signature=signature,
        code_paths=code_paths,
        pip_requirements=requirements,
    )


def create_run(experiment: str, run_name: str, tags: dict) -> str:
    """Create a run without making it active (e.g. an Optuna study's parent run); return its id."""
    from mlflow import MlflowClient

    _mlflow()
    run = MlflowClient().create_run(ensure_experiment(experiment), run_name=run_name, tags=tags)
    return run.info.run_id


def log_to_run(
    run_id: str, metrics: dict | None = None, artifacts=(), finish: bool = True, status: str = "FINISHED"
):
    """Log metrics and files to a run that is not the active one, and end it with `status`
    (FINISHED, or FAILED / KILLED) when finish."""
    from mlflow import MlflowClient

    _mlflow()
    client = MlflowClient()
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run_id, key, float(value))
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    if finish:
        client.set_terminated(run_id, status)


# --------------------------------------------------------------------------- model registry


def best_run(experiment: str, filter_string: str, metric: str):
    """The FINISHED run of an experiment with the highest `metric` among those matching the filter."""
    from mlflow import MlflowClient

    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    status = "attributes.status = 'FINISHED'"
    runs = MlflowClient().search_runs(
        [exp.experiment_id],
        f"{filter_string} and {status}" if filter_string else status,
        order_by=[f"metrics.`{metric}` DESC"],
        max_results=50,
    )
    runs = [r for r in runs if metric in r.data.metrics and math.isfinite(r.data.metrics[metric])]
    return runs[0] if runs else None


def register_version(name: str, run, model_name: str, tags: dict):
    """Register the run's logged model under `name` (once per run) with up-to-date tags; return the version."""
    from mlflow import MlflowClient

    mlflow = _mlflow()
    client = MlflowClient()
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run.info.run_id:
            for key, value in tags.items():  # the run's metrics may have been updated since
                client.set_model_version_tag(name, version.version, key, str(value))
            return client.get_model_version(name, version.version)
    return mlflow.register_model(
        f"runs:/{run.info.run_id}/{model_name}", name, tags={k: str(v) for k, v in tags.items()}
    )


def alias_version(name: str, alias: str):
    """The version holding an alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _mlflow()
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str):
    from mlflow import MlflowClient

    _mlflow()
    MlflowClient().set_registered_model_alias(name, alias, str(version))
