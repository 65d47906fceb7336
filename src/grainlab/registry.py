"""Champion/challenger promotion in the MLflow Model Registry.

For each model family the candidate is the best finished run by a validation metric. Its
version is tagged with its metrics, the data.dvc md5 and the git commit. The alias
`champion` moves to it only when it beats the current champion on the held-out metric;
otherwise it gets `challenger`. Registering the same run twice changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grainlab import tracking
from grainlab.config import Params
from grainlab.images import write_json


@dataclass(frozen=True)
class ModelFamily:
    name: str  # registered model name
    experiment: str
    run_filter: str  # MLflow search filter for the training runs of this family
    select_metric: str  # validation metric that picks the candidate run
    heldout_metric: str  # held-out (test / quiz) metric that decides the champion
    artifact: str  # the run's logged pyfunc model


FAMILIES = (
    ModelFamily(
        "grain-boundary-unet",
        tracking.BOUNDARY_EXPERIMENT,
        "tags.stage = 'boundary-train'",
        "val/boundary_f1",
        "test/boundary_f1",
        "model",
    ),
    ModelFamily(
        "microstructure-recognizer",
        tracking.RECOGNITION_EXPERIMENT,
        "tags.stage = 'recognition-train' and tags.model = 'quiz1'",
        "quiz/accuracy",
        "quiz/accuracy",
        "pyfunc",
    ),
)


def promote(family: ModelFamily) -> dict:
    """Register the family's candidate and move `champion` or `challenger` to it."""
    run = tracking.best_run(family.experiment, family.run_filter, family.select_metric)
    if run is None:
        return {
            "model": family.name,
            "status": f"no finished run with {family.select_metric} in {family.experiment}",
        }
    metrics = run.data.metrics
    if family.heldout_metric not in metrics:
        return {"model": family.name, "status": f"run {run.info.run_id} has no {family.heldout_metric}"}
    score = metrics[family.heldout_metric]
    tags = {
        family.select_metric: metrics[family.select_metric],
        family.heldout_metric: score,
        "heldout_metric": family.heldout_metric,
        "data_dvc_md5": run.data.tags.get("data_dvc_md5", "unknown"),
        "git_commit": run.data.tags.get("git_commit", "unknown"),
        "run_name": run.info.run_name,
    }
    version = tracking.register_version(family.name, run, family.artifact, tags)
    champion = tracking.alias_version(family.name, "champion")
    champion_score = float(champion.tags.get(family.heldout_metric, "-inf")) if champion else float("-inf")
    if champion is not None and champion.version == version.version:
        alias = "champion"
    elif champion is None or score > champion_score:
        alias = "champion"
        tracking.set_alias(family.name, "champion", version.version)
    else:
        alias = "challenger"
        tracking.set_alias(family.name, "challenger", version.version)
    return {
        "model": family.name,
        "version": int(version.version),
        "alias": alias,
        "run_name": run.info.run_name,  # not the run id, which differs between identical runs (dvc.lock)
        family.heldout_metric: score,
        "previous_champion": int(champion.version) if champion else None,
        "previous_champion_score": champion_score if champion else None,
    }


def register_best(params: Params, out_json: Path) -> list[str]:
    """Promote every family; write the registry state to out_json; return one line per model."""
    states = [promote(family) for family in FAMILIES]
    write_json(out_json, {"profile": params.profile, "models": states})
    lines = []
    for s in states:
        if "version" in s:
            lines.append(f"{s['model']}: version {s['version']} ({s['run_name']}) is {s['alias']}")
        else:
            lines.append(f"{s['model']}: not registered: {s['status']}")
    return lines
