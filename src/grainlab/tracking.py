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
    """Hide the password of a URL such as postgresql://user:secret@host/db."""
    return re.sub(r"(//[^:/@]+:)[^@/]+@", r"\1***@", url)


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


@contextlib.contextmanager
def run(experiment: str, *, run_name: str | None = None, run_id: str | None = None, params=None,
        tags=None, system_metrics: bool = True, nested: bool = False):
    """Start (or, with run_id, resume) an MLflow run; mark it FAILED with the reason on error."""
    mlflow = _mlflow()
    exp_id = ensure_experiment(experiment)
    active = mlflow.start_run(
        run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name,
        nested=nested, log_system_metrics=system_metrics,
    )
    try:
        if params and not run_id:
            log_params(params)
        if tags:
            mlflow.set_tags(tags)
        yield active
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"[:5000]
        mlflow.set_tag("failure_reason", reason)
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
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


def get_run(run_id: str):
    try:
        return _mlflow().get_run(run_id)
    except Exception as exc:  # MLflow raises its own exception types
        raise GrainlabError(f"MLflow run {run_id!r} not found at {mask_url(tracking_uri())}: {exc}") from None


def log_pyfunc_model(name: str, python_model, artifacts: dict, signature, input_example=None,
                     code_paths=None):
    """Log a pyfunc model (see serving.py) whose weights are plain tensors loaded with weights_only=True."""
    mlflow = _mlflow()
    return mlflow.pyfunc.log_model(
        name=name, python_model=python_model, artifacts=artifacts, signature=signature,
        input_example=input_example, code_paths=code_paths,
    )
