"""Run grainlab's benchmark suite: `python -m benchmarks [--quick] [--sections ...]`.

Prints a table (grainlab, plain reference, ratio) and writes every figure, with the date,
machine, torch version and threads, to benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, Figure, Skipped, add_set_option, load_average, machine
from grainlab.boundaries.infer import pick_device
from grainlab.config import load_params
from grainlab.images import write_json

SECTIONS = ("synth", "train", "infer", "memory", "recognition")
QUICK = {
    "synth_regions": 1,
    "synth_px": 64,
    "profiles": ["demo"],
    "train_px": 32,
    "steps": 1,
    "ref_images": 2,
    "matmul_n": 256,
    "infer_size": 128,
    "real_data": "none",
    "memory_size": 256,
    "crops": 8,
    "ref_crops": 2,
    "recognition_shape": [256, 256],
    "repeats": 1,
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a smoke run of seconds)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds per figure (best is kept)")
    add_set_option(ap, "override a setting in every profile, e.g. --set boundaries.compile=true (repeatable)")
    g = ap.add_argument_group("synth")
    g.add_argument("--synth-regions", type=int, default=4, help="regions per recipe (0: all, as configured)")
    g.add_argument("--synth-px", type=int, default=None, help="image side (default: the profile's)")
    g = ap.add_argument_group("train (and GFLOP/s)")
    g.add_argument(
        "--profiles", nargs="+", default=["demo", "paper"], help="params.yaml profiles of the U-Net"
    )
    g.add_argument("--train-px", type=int, default=256, help="training crop side")
    g.add_argument("--steps", type=int, default=2, help="timed grainlab training steps")
    g.add_argument("--batch", type=int, default=None, help="grainlab batch (default: the profile's)")
    g.add_argument("--ref-images", type=int, default=6, help="images timed in the plain batch-1 loop")
    g.add_argument(
        "--matmul-n", type=int, default=None, help="side of the reference matmul (default 2048; 8192 on CUDA)"
    )
    g = ap.add_argument_group("infer and memory")
    g.add_argument("--infer-size", type=int, default=2048, help="side of the square inference image")
    g.add_argument(
        "--real-data",
        default=str(ROOT.parent / "shared" / "data" / "tbm-dev" / "full"),
        help="folder or 'none'",
    )
    g.add_argument("--memory-size", type=int, default=8192, help="side of the bounded-memory image")
    g = ap.add_argument_group("recognition")
    g.add_argument("--crops", type=int, default=1000, help="crops per image")
    g.add_argument(
        "--ref-crops", type=int, default=100, help="crops timed in the per-crop loop (rate scaled)"
    )
    g.add_argument("--recognition-shape", type=int, nargs=2, default=[1000, 1200], metavar=("H", "W"))
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def table(figures: list[Figure], skipped: list[Skipped]) -> str:
    rows = [("section", "figure", "unit", "grainlab", "reference", "ratio")]
    rows += [
        (
            f.section,
            f.name,
            f.unit,
            fmt(f.value),
            fmt(f.reference),
            "" if f.ratio is None else f"x{f.ratio:.3g}",
        )
        for f in figures
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines += [f"skipped: {s.section} / {s.name}: {s.reason}" for s in skipped]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    from benchmarks import boundaries, memory, recognition, synth

    device = pick_device(args.device)
    demo = load_params(args.params, args.overrides, profile="demo")
    started = time.perf_counter()
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *(sys.argv[1:] if args.argv is None else args.argv)]),
        "machine": machine(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "load_average_start": load_average(),
        "options": {k: v for k, v in vars(args).items() if k != "argv"},
    }
    figures: list[Figure] = []
    skipped: list[Skipped] = []

    section_s = {}
    mark = [time.perf_counter()]

    def done(new):
        now = time.perf_counter()
        section = new[0].section if new else "?"
        section_s[section] = section_s.get(section, 0.0) + now - mark[0]
        mark[0] = now
        figures.extend(new)
        for f in new:
            ratio = "" if f.ratio is None else f"  (reference {fmt(f.reference)}, x{f.ratio:.3g})"
            print(f"[{f.section}] {f.name}: {fmt(f.value)} {f.unit}{ratio}", flush=True)

    if "synth" in args.sections:
        done(synth.synth_figures(demo, "demo", args.synth_regions or None, args.synth_px, args.repeats))
    if "train" in args.sections:
        for profile in args.profiles:
            params = load_params(args.params, args.overrides, profile=profile)
            done(
                boundaries.train_figures(
                    params,
                    profile,
                    device,
                    args.train_px,
                    args.steps,
                    args.ref_images,
                    args.batch,
                    args.matmul_n or (8192 if device.type == "cuda" else 2048),
                    args.repeats,
                )
            )
    if "infer" in args.sections:
        real = None if args.real_data == "none" else Path(args.real_data)
        real_params = load_params(args.params, args.overrides, profile="tbm-dev")
        new, skips = boundaries.infer_figures(
            demo, "demo", device, args.infer_size, args.repeats, real, real_params
        )
        done(new)
        skipped += skips
        for s in skips:
            print(f"[{s.section}] skipped {s.name}: {s.reason}", flush=True)
    if "memory" in args.sections:
        done(memory.memory_figures(args.params, "demo", args.memory_size, device))
    if "recognition" in args.sections:
        for profile in args.profiles:
            done(
                recognition.recognition_figures(
                    load_params(args.params, args.overrides, profile=profile),
                    profile,
                    args.crops,
                    args.ref_crops,
                    tuple(args.recognition_shape),
                    args.repeats,
                )
            )
    if device.type != "cuda":
        skipped.append(Skipped("gpu", "peak GPU memory, GPU utilisation", f"no CUDA device ({device})"))

    bad = [f.name for f in figures if not (math.isfinite(f.value) and f.value > 0)]
    if bad:
        raise RuntimeError(f"non-positive or non-finite figures: {bad}")
    result.update(
        load_average_end=load_average(),
        wall_s=time.perf_counter() - started,
        section_s=section_s,
        figures=[f.to_dict() for f in figures],
        skipped=[vars(s) for s in skipped],
    )
    return result


def main(argv=None):
    args = parse_args(argv)
    args.argv = argv
    result = run(args)
    print()
    print(
        f"{result['date']}  {result['machine']['cpu']} x{result['machine']['cpu_count']}  "
        f"torch {result['torch']}, {result['threads']} threads, device {result['machine']['device']}, "
        f"load {result['load_average_start']} -> {result['load_average_end']}"
    )
    print(table([Figure(**{k: v for k, v in f.items() if k != "ratio"}) for f in result["figures"]], []))
    for s in result["skipped"]:
        print(f"skipped: {s['section']} / {s['name']}: {s['reason']}")
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
