"""`grainlab data ...`: make the synthetic datasets, preview them, import real micrographs."""

from __future__ import annotations

import time
from pathlib import Path

from grainlab.cli import params_from


def register(groups, common):
    data = groups.add_parser("data", help="make, preview and import datasets")
    verbs = data.add_subparsers(dest="verb", metavar="VERB", required=True)

    synth = verbs.add_parser(
        "synth",
        parents=[common],
        help="generate the synthetic datasets under data/",
        description="Generate the thin-film BF TEM recipes (lopez-toderas, grae, gong, grae-large) with "
        "their held-out test set under data/grain_boundaries/, and the steel microstructure library "
        "(quiz-1 and quiz-2 analogues) under data/microstructures/. Deterministic: the same params "
        "give byte-identical files. Each generated folder is replaced as a whole; other datasets "
        "under data/grain_boundaries/ (imported ones) are left alone.",
    )
    synth.add_argument(
        "--only",
        choices=("grain_boundaries", "microstructures"),
        default=None,
        help="make only one of the two data families (default: both)",
    )
    synth.add_argument("--out", default=None, help="data root (default: data.root from params, 'data')")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: data.workers)")
    synth.set_defaults(func=run_synth)

    preview = verbs.add_parser(
        "preview",
        parents=[common],
        help="write contact sheets of the synthetic data",
        description="Write PNG contact sheets: one synthetic region across its tilts with the per-image and "
        "composite tracings and the exact truth; and every microstructure class at several magnifications.",
    )
    preview.add_argument("--out", default="reports/preview", help="output folder (default: %(default)s)")
    preview.set_defaults(func=run_preview)

    imp = verbs.add_parser(
        "import",
        parents=[common],
        help="import real micrographs with hand tracings",
        description="Import a folder of micrographs and a folder of tracings (matched by file stem) into "
        "data/grain_boundaries/NAME in the same layout as the synthetic data. An existing NAME is "
        "replaced only with --replace; the synthetic datasets' names are never taken.",
    )
    imp.add_argument(
        "src", help="source folder holding images/ (or micrographs/) and masks/ (or labels/, tracings/)"
    )
    imp.add_argument("--name", required=True, help="dataset name, a plain folder name")
    imp.add_argument(
        "--replace",
        action="store_true",
        help="overwrite an existing imported dataset of that name (never a synthetic one)",
    )
    imp.add_argument(
        "--pixel-size", type=float, default=None, metavar="NM", help="pixel size in nm (optional)"
    )
    imp.add_argument("--images", default=None, help="micrograph folder, if not SRC/images")
    imp.add_argument("--masks", default=None, help="tracing folder, if not SRC/masks")
    imp.add_argument(
        "--region-pattern",
        default=r"^([^-_]+)",
        help="regex whose first group is the region (source) id in a file stem; train/validation "
        "splits keep a region on one side (default: %(default)r, e.g. '10' from '10-256-512')",
    )
    imp.add_argument("--out", default=None, help="data root (default: data.root)")
    imp.set_defaults(func=run_import)


def _data_root(args, params) -> Path:
    from grainlab.datasets.folder import check_folder_path

    if args.out:
        return check_folder_path(args.out, "--out")
    return check_folder_path(params.data.root, "data.root")


def run_synth(args):
    from grainlab.datasets.microstructures import build_library
    from grainlab.datasets.recipes import synthesize_tem
    from grainlab.images import remove_stale_stages, staged_dir

    params = params_from(args)
    root = _data_root(args, params)
    workers = args.workers or params.data.workers
    start = time.perf_counter()
    if args.only in (None, "grain_boundaries"):
        counts, removed = synthesize_tem(params, root / "grain_boundaries", workers=workers)
        for path in removed:
            print(f"removed {path}, left by an interrupted run")
        for name, n in counts.items():
            print(f"{root / 'grain_boundaries' / name}: {n} pairs")
    if args.only in (None, "microstructures"):
        for path in remove_stale_stages(root / "microstructures"):
            print(f"removed {path}, left by an interrupted run")
        with staged_dir(root / "microstructures") as tmp:
            build_library(params.microstructures, tmp, params.seed, workers)
        print(f"{root / 'microstructures'}: steel micrograph library")
    print(
        f"synthesised in {time.perf_counter() - start:.1f} s ({params.profile} profile, seed {params.seed})"
    )


def run_preview(args):
    from grainlab.datasets.microstructures import write_preview
    from grainlab.datasets.preview import write_tem_preview

    params = params_from(args)
    out = Path(args.out)
    print(f"wrote {write_tem_preview(params, out / 'tem_tilt_series.png')}")
    library = Path(params.data.root) / "microstructures"
    if (library / "manifest.json").is_file():
        print(f"wrote {write_preview(library, out / 'microstructures.png')}")
    else:
        print(f"no microstructure library at {library}; run `grainlab data synth` for its preview")


def run_import(args):
    from grainlab.cli import check_pixel_size
    from grainlab.datasets.importer import import_dataset
    from grainlab.datasets.recipes import synthetic_names

    params = params_from(args)
    root = _data_root(args, params) / "grain_boundaries"
    manifest = import_dataset(
        args.src,
        root,
        args.name,
        pixel_size_nm=check_pixel_size(args.pixel_size),
        images_dir=args.images,
        masks_dir=args.masks,
        region_pattern=args.region_pattern,
        max_pixels=params.data.max_image_pixels,
        replace=args.replace,
        reserved=synthetic_names(params),
    )
    regions = sorted({p["region"] for p in manifest["pairs"]})
    print(f"imported {len(manifest['pairs'])} pairs from {len(regions)} regions into {root / args.name}")
