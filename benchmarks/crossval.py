"""Boundary tracing on sources it has never seen: leave-sources-out cross-validation (issue 16).

    python -m benchmarks.crossval --dataset tbm-dev --folds 7 --profile tbm-dev --set data.root=/tmp/tbmdata
    python -m benchmarks.crossval --from outputs/crossval/tbm-dev      # print a finished run's table

Runs `grainlab.boundaries.crossval.run_crossval` (the U-Net trained on the other folds' sources,
its post-processing calibrated on a validation split of them; the classical baseline calibrated
on them) and prints the per-source table and the mean ± sd over sources, as
`grainlab boundaries crossval` writes it to crossval.md. Prints the date, machine and the
wall time with it, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, add_set_option, load_average, machine
from grainlab.boundaries.crossval import markdown_table, run_crossval
from grainlab.boundaries.infer import pick_device
from grainlab.config import load_params


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.crossval", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="tbm-dev", help="hand-traced dataset (name or folder)")
    ap.add_argument("--folds", type=int, default=7)
    ap.add_argument("--loss", default=None)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default="tbm-dev")
    add_set_option(ap)
    ap.add_argument("--out", default=None, help="output folder (default: outputs/crossval/<dataset>)")
    ap.add_argument(
        "--from", dest="from_dir", default=None, help="print the table of a finished run's folder"
    )
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_dir:
        report = json.loads((Path(args.from_dir) / "crossval.json").read_text())
        print(markdown_table(report["rows"], report["summary"], f"{report['dataset']} ({args.from_dir})"))
        return 0
    params = load_params(args.params, args.overrides, profile=args.profile)
    started = dt.datetime.now(dt.UTC)
    start, load = time.perf_counter(), load_average()
    result = run_crossval(
        params,
        args.dataset,
        args.folds,
        Path(args.out) if args.out else None,
        args.loss,
        echo=lambda msg: print(msg, flush=True),
    )
    print(markdown_table(result.rows, result.summary, f"{args.dataset}, {args.folds} folds"))
    cpu = machine(pick_device())
    print(
        f"{started:%Y-%m-%d %H:%M} UTC, {time.perf_counter() - start:.0f} s on {cpu.get('cpu')} "
        f"({cpu.get('cpu_count')} cores, {cpu.get('device')}), load average at start {load}; {result.json_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
