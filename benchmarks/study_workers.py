"""The boundary study over workers (issue 21): wall time of a small study with 1 worker against
2 workers, each worker a `grainlab boundaries study --workers-join` process with one torch thread.

    python -m benchmarks.study_workers                    # local journal file, MLflow SQLite, temp folder
    python -m benchmarks.study_workers --storage postgresql://postgres@127.0.0.1:5432/test \\
        --mlflow postgresql://postgres@127.0.0.1:5432/mlflow

Synthesises a small demo data set (benchmarks.synth.scaled) in a temporary project, then times
the whole study (claiming the runs, training them, writing the report) for 1 worker and for 2,
in a fresh study each time, and checks that both reports (study.json, study.md, figures) are
byte-identical. Prints the times, their ratio (the goal: 2 workers in <= 0.6 x 1 worker's time on
2 cores), the date, machine and load average, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import ROOT, add_set_option, load_average, machine
from benchmarks.synth import scaled
from grainlab.boundaries.infer import pick_device
from grainlab.config import load_params
from grainlab.datasets.recipes import build_tem_datasets

# 8 runs of the demo's U-Net and epochs on small images: long enough that a worker's start-up
# (imports, MLflow, the Optuna study: about 10 CPU s) does not hide the speed-up
SMALL = [
    "boundaries.study_datasets=[grae, gong]",
    "boundaries.study_losses=[bce, focal]",
    "boundaries.study_seeds=[0, 1]",
    "boundaries.val_max_images=2",
    "boundaries.test_max_images=2",
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.study_workers", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    add_set_option(ap, "settings after the small study's (repeatable)")
    ap.add_argument("--regions", type=int, default=2, help="synthesised regions per recipe")
    ap.add_argument("--image-px", type=int, default=128, help="synthesised image side")
    ap.add_argument("--workers", type=int, default=2, help="workers timed against 1 worker")
    ap.add_argument("--storage", default=None, help="Optuna storage URL (default: the local journal file)")
    ap.add_argument("--mlflow", default=None, help="MLflow tracking URI (default: SQLite in the project)")
    return ap.parse_args(argv)


def make_project(root: Path, args) -> list[str]:
    """A project folder with the small data set; returns the settings of its study."""
    settings = [*SMALL, *args.overrides]
    params = scaled(load_params(args.params, settings, profile="demo"), args.regions, args.image_px)
    build_tem_datasets(params, root / "data" / "grain_boundaries", workers=1, progress=False)
    (root / "params.yaml").write_text("profile: demo\n")
    return settings


def time_workers(root: Path, n: int, settings: list[str], args) -> tuple[float, float]:
    """(wall, CPU) seconds of n worker processes, started together, finishing one fresh study."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": args.mlflow or f"sqlite:///{root / 'mlflow.db'}",
    }
    cmd = [Path(sys.executable).parent / "grainlab", "boundaries", "study", "--workers-join"]
    cmd += ["--study", f"bench-{n}-{uuid.uuid4().hex[:8]}", "--out", f"report-{n}", "--runs", f"runs-{n}"]
    cmd += [x for kv in settings for x in ("--set", kv)]
    if args.storage:
        cmd += ["--storage", args.storage]
    cpu_before = _children_cpu_s()
    start = time.perf_counter()
    workers = [
        subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(n)
    ]
    outputs = [w.communicate()[0] for w in workers]
    seconds = time.perf_counter() - start
    if any(w.returncode for w in workers):
        raise SystemExit("a worker failed:\n" + "\n".join(outputs))
    return seconds, _children_cpu_s() - cpu_before


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    load = load_average()
    with tempfile.TemporaryDirectory(prefix="study-workers-") as tmp:
        root = Path(tmp)
        settings = make_project(root, args)
        one = time_workers(root, 1, settings, args)
        many = time_workers(root, args.workers, settings, args)
        files = sorted(p.name for p in (root / "report-1").iterdir())
        identical = files == sorted(p.name for p in (root / f"report-{args.workers}").iterdir()) and all(
            (root / "report-1" / f).read_bytes() == (root / f"report-{args.workers}" / f).read_bytes()
            for f in files
        )
    cpu = machine(pick_device("cpu"))
    for n, (wall, cpu_s) in ((1, one), (args.workers, many)):
        print(f"{n} worker(s): {wall:.1f} s, {cpu_s:.1f} CPU s (on average {cpu_s / wall:.2f} cores busy)")
    print(f"ratio {args.workers} workers / 1 worker: {many[0] / one[0]:.2f} (goal <= 0.6)")
    print(f"reports identical ({', '.join(files)}): {'yes' if identical else 'NO'}")
    print(
        f"{started:%Y-%m-%d %H:%M} UTC on {cpu.get('cpu')} ({cpu.get('cpu_count')} cores), one torch thread "
        f"per worker, load average {load} -> {load_average()}; storage {args.storage or 'journal file'}"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
