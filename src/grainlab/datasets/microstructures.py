"""The steel micrograph library: the quiz-1 and quiz-2 analogues of Larmuseau et al. (2020).

Layout under data/microstructures/:

    manifest.json                  every image: file, task, split, class, answer, px_per_um, style
    quiz1/train/NNNN_class.png     5 known classes at 1-200 px/um (each within the range where
                                   it is imaged, micro.MAG_RANGE), optical (only up to
                                   micro.OPTICAL_MAX_PX_PER_UM) or SEM style
    quiz1/quiz/NNNN_class.png      known classes plus unknown ones whose answer is "none"
    quiz2/train|quiz/...           6 martensitic variants at 53 or 106 px/um, SEM style
    preview.png                    every class at the low, mid and high end of its range

Every image has its own seed (from the params seed and its index), so the files are
byte-identical on every re-run, whatever the number of worker processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from grainlab.config import MicroConfig
from grainlab.errors import GrainlabError
from grainlab.images import atomic_path, process_pool, write_image, write_json
from grainlab.synth import micro

NONE = "none"
MANIFEST = "manifest.json"
QUIZ2_CLASSES = tuple(micro.VARIANTS)
# Fresh quizzes (`recognition evaluate --seeds`) draw their seeds from here on: a range that no
# library, training member or held-out split uses (those take the params seed and a few above it).
FRESH_SEED_BASE = 1_000_000


def _log_uniform_strata(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n magnifications log-uniform over [lo, hi], one per stratum (so every class spans the range), shuffled."""
    u = (np.arange(n) + rng.uniform(size=n)) / max(n, 1)
    return rng.permutation(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))


def _class_range(cls: str, mag_range) -> tuple[float, float]:
    """The configured px/um range narrowed to where this class is imaged (micro.MAG_RANGE)."""
    lo, hi = micro.MAG_RANGE.get(cls, mag_range)
    lo, hi = max(lo, mag_range[0]), min(hi, mag_range[1])
    return (lo, hi) if lo < hi else (mag_range[0], mag_range[1])


def _entries(task: str, split: str, classes, counts, mags, styles, answers=None) -> list[dict]:
    out = []
    for cls, n in zip(classes, counts, strict=True):
        for _ in range(n):
            out.append(
                {"task": task, "split": split, "class": cls, "answer": cls if answers is None else answers}
            )
    for e, m, s in zip(out, mags, styles, strict=True):
        e["px_per_um"] = float(f"{m:.4g}")
        e["style"] = s
    return out


def _split_counts(total: int, k: int) -> list[int]:
    return [total // k + (i < total % k) for i in range(k)]


def plan_library(cfg: MicroConfig, seed: int) -> list[dict]:
    """Every image of the library as a manifest entry (file names included), before rendering."""
    rng = np.random.default_rng([seed, 1])
    entries: list[dict] = []

    def add(task, split, classes, total, mag_range, answer=None, sem_only=False):
        counts = _split_counts(total, len(classes))
        mags = []
        for cls, n in zip(classes, counts, strict=True):
            if task == "quiz1":
                mags.extend(_log_uniform_strata(rng, n, *_class_range(cls, mag_range)))
            else:
                mags.extend(rng.choice(mag_range, n))
        optical = np.zeros(total, bool) if sem_only else rng.uniform(size=total) < cfg.optical_fraction
        optical &= np.asarray(mags) <= micro.OPTICAL_MAX_PX_PER_UM  # beyond optical resolution: SEM
        entries.extend(
            _entries(task, split, classes, counts, mags, np.where(optical, "optical", "sem"), answer)
        )

    add("quiz1", "train", micro.KNOWN, cfg.quiz1_train, cfg.quiz1_px_per_um)
    add("quiz1", "quiz", micro.KNOWN, cfg.quiz1_quiz_known, cfg.quiz1_quiz_px_per_um)
    add("quiz1", "quiz", micro.UNKNOWN, cfg.quiz1_quiz_unknown, cfg.quiz1_quiz_px_per_um, answer=NONE)
    add("quiz2", "train", QUIZ2_CLASSES, cfg.quiz2_train, cfg.quiz2_px_per_um, sem_only=True)
    add("quiz2", "quiz", QUIZ2_CLASSES, cfg.quiz2_quiz, cfg.quiz2_px_per_um, sem_only=True)
    counters: dict[tuple[str, str], int] = {}
    for e in entries:
        k = counters.get((e["task"], e["split"]), 0)
        counters[(e["task"], e["split"])] = k + 1
        e["file"] = f"{e['task']}/{e['split']}/{k:04d}_{e['class']}.png"
    return entries


def _render_entry(job) -> None:
    index, entry, image_px, seed, out_dir = job
    rng = np.random.default_rng([seed, 2, index])
    img = micro.render(entry["class"], (image_px, image_px), entry["px_per_um"], entry["style"], rng)
    write_image(Path(out_dir) / entry["file"], img)


def build_library(cfg: MicroConfig, out_dir: Path, seed: int, workers: int) -> None:
    """Render the whole library into out_dir: the PNGs, manifest.json and preview.png."""
    out_dir = Path(out_dir)
    entries = plan_library(cfg, seed)
    jobs = [(i, e, cfg.image_px, seed, str(out_dir)) for i, e in enumerate(entries)]
    if workers > 1:
        with process_pool(workers) as pool:
            list(pool.map(_render_entry, jobs, chunksize=8))
    else:
        for job in jobs:
            _render_entry(job)
    manifest = {"seed": seed, "image_px": cfg.image_px, "none": NONE, "tasks": _tasks(), "images": entries}
    write_json(out_dir / MANIFEST, manifest, sort_keys=True)
    write_preview(out_dir, out_dir / "preview.png")


def _tasks() -> dict:
    return {
        "quiz1": {"classes": list(micro.KNOWN), "unknown": list(micro.UNKNOWN)},
        "quiz2": {"classes": list(QUIZ2_CLASSES), "unknown": []},
    }


def fresh_seeds(n: int, used, first: int | None = None) -> list[int]:
    """n quiz seeds from FRESH_SEED_BASE (or `first`) on, none of them in `used` (the library,
    training and selection seeds): a GrainlabError if one is."""
    first = FRESH_SEED_BASE if first is None else int(first)
    seeds = list(range(first, first + n))
    clash = sorted(set(seeds) & {int(u) for u in used})
    if clash:
        raise GrainlabError(
            f"fresh quiz seeds {clash} were used for the library, training or selection; expected unused seeds"
        )
    return seeds


def build_quiz(
    cfg: MicroConfig, out_dir: Path, seed: int, tasks=("quiz1", "quiz2"), workers: int = 1
) -> Path:
    """A fresh quiz: the quiz split of the library `build_library(cfg, ..., seed)` would plan
    (same classes, counts, magnification ranges and styles; new random images), rendered into
    out_dir with its own manifest. Nothing else is read or written."""
    out_dir = Path(out_dir)
    entries = [e for e in plan_library(cfg, seed) if e["split"] == "quiz" and e["task"] in tasks]
    jobs = [(i, e, cfg.image_px, seed, str(out_dir)) for i, e in enumerate(entries)]
    if workers > 1:
        with process_pool(workers) as pool:
            list(pool.map(_render_entry, jobs, chunksize=8))
    else:
        for job in jobs:
            _render_entry(job)
    manifest = {"seed": seed, "image_px": cfg.image_px, "none": NONE, "tasks": _tasks(), "images": entries}
    write_json(out_dir / MANIFEST, manifest, sort_keys=True)
    return out_dir


def load_manifest(library_dir: Path) -> dict:
    """The library's manifest; a GrainlabError when it is missing or unreadable."""
    path = Path(library_dir) / MANIFEST
    if not path.is_file():
        raise GrainlabError(f"{path}: microstructure library not found; run `grainlab data synth` first")
    try:
        manifest = json.loads(path.read_text())
        manifest["images"], manifest["tasks"]
    except (ValueError, KeyError, TypeError) as exc:
        raise GrainlabError(
            f"{path}: not a valid library manifest ({exc}); run `grainlab data synth` again"
        ) from None
    return manifest


def select(manifest: dict, task: str, split: str) -> list[dict]:
    """The manifest entries of one task and split."""
    return [e for e in manifest["images"] if e["task"] == task and e["split"] == split]


def write_preview(library_dir: Path, out_png: Path) -> Path:
    """A sheet with one row per class of the library: freshly rendered at the low end, the (geometric)
    middle and the high end of its magnification range (its task's range narrowed to where the class is
    imaged, micro.MAG_RANGE), optical where the class has optical images and the magnification allows
    it, SEM otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = load_manifest(Path(library_dir))
    by_class: dict[str, list[dict]] = {}
    task_mags: dict[str, list[float]] = {}
    for e in manifest["images"]:
        by_class.setdefault(e["class"], []).append(e)
        task_mags.setdefault(e["task"], []).append(e["px_per_um"])
    rows = sorted(by_class, key=lambda c: (micro.CLASSES.index(c) if c in micro.CLASSES else 99, c))
    size = (manifest["image_px"], manifest["image_px"])
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.3 * len(rows)), squeeze=False)
    for r, cls in enumerate(rows):
        mags = task_mags[by_class[cls][0]["task"]]
        lo, hi = _class_range(cls, (min(mags), max(mags)))
        optical = any(e["style"] == "optical" for e in by_class[cls])
        for j, m in enumerate((lo, float(np.sqrt(lo * hi)), hi)):
            style = "optical" if optical and m <= micro.OPTICAL_MAX_PX_PER_UM else "sem"
            img = micro.render(cls, size, m, style, np.random.default_rng([manifest["seed"], 3, r, j]))
            ax = axes[r, j]
            ax.set_axis_off()
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{cls}\n{m:.3g} px/um, {style}", fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return out_png
