"""Every MLflow call of grainlab: where runs go, their tags, metrics and artifacts.

By default runs go to the repository's `mlflow.db` (SQLite, as an absolute path so that
`dvc exp run --temp` still finds it) with artifacts under `mlruns/`. The environment
variable MLFLOW_TRACKING_URI points everything at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import subprocess
from pathlib import Path

from grainlab.errors import GrainlabError

BOUNDARY_EXPERIMENT = "grain-boundaries"
RECOGNITION_EXPERIMENT = "microstructure-recognition"


def project_root() -> Path:
    """The repository root, also from inside a `dvc exp run --temp` copy under .dvc/tmp/exps."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def mask_url(url: str) -> str:
    """Hide the password of a URL such as postgresql://user:secret@host/db (up to the last '@'
    before any whitespace, so an unencoded '@' or '/' in the password stays hidden too)."""
    return re.sub(r"(//[^:/@\s]+:)\S*@", r"\1***@", url)


def tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it with its artifacts under the repo's mlruns/ if needed."""
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (project_root() / "mlruns").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


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
):
    """Start (or, with run_id, resume) an MLflow run; mark it FAILED with the reason on error.

    parent_run_id nests the run under another (as a tag, so the parent need not be active).
    """
    mlflow = _mlflow()
    exp_id = ensure_experiment(experiment)
    active = mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp_id,
        run_name=run_name,
        log_system_metrics=system_metrics,
    )
    try:
        if params and not run_id:
            log_params(params)
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


def log_to_run(run_id: str, metrics: dict | None = None, artifacts=(), finish: bool = True):
    """Log metrics and files to a run that is not the active one, and mark it finished."""
    from mlflow import MlflowClient

    _mlflow()
    client = MlflowClient()
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run_id, key, float(value))
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    if finish:
        client.set_terminated(run_id, "FINISHED")


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
