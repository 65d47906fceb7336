"""The quiz evaluation: accuracies, open-set AUROC and OSCR, the confusion matrix, the per-image
probability table, the descriptor scatter with GMM contours, and saliency examples."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from grainlab.images import atomic_path  # noqa: E402
from grainlab.recognition.crops import crop_magnification, extract, sample_boxes  # noqa: E402
from grainlab.recognition.openset import NONE  # noqa: E402
from grainlab.recognition.predict import Prediction, Recognizer, plot_saliency  # noqa: E402
from grainlab.recognition.train import LabelledImages  # noqa: E402

MAG_BINS = ((0.0, 10.0), (10.0, 100.0), (100.0, float("inf")))


@dataclass
class QuizResult:
    """One model's answers on one quiz set."""

    name: str
    labels: list[str]
    quiz: LabelledImages
    predictions: list[Prediction]

    @property
    def truths(self) -> list[str]:
        return [e["answer"] for e in self.quiz.entries]

    @property
    def distributions(self) -> np.ndarray:
        return np.stack([p.distribution for p in self.predictions])


def run_quiz(
    recognizer: Recognizer, quiz: LabelledImages, name: str, n_crops: int, batch_size: int, seed: int = 0
) -> QuizResult:
    preds = [
        recognizer.predict(img, e["px_per_um"], n_crops, batch_size, seed=seed + i, what=e["file"])
        for i, (e, img) in enumerate(zip(quiz.entries, quiz.images, strict=True))
    ]
    return QuizResult(name, recognizer.labels, quiz, preds)


def oscr(correct: np.ndarray, known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Area under the open-set classification rate curve: correct-classification rate of known
    images against the false-positive rate of unknown ones, over all score thresholds."""
    thresholds = np.unique(np.concatenate([known_scores, unknown_scores]))[::-1]
    ccr = [0.0] + [float(np.mean(correct & (known_scores >= t))) for t in thresholds]
    fpr = [0.0] + [float(np.mean(unknown_scores >= t)) for t in thresholds]
    return float(np.trapezoid(ccr, fpr))


def fpr_at_tpr(known_scores: np.ndarray, unknown_scores: np.ndarray, tpr: float = 0.95) -> float:
    """FPR95: the share of unknown images accepted at the highest threshold that still accepts at
    least `tpr` of the known ones (higher score = more typical of the known classes)."""
    known = np.sort(np.asarray(known_scores, float))
    threshold = known[int(np.floor((1 - tpr) * len(known) + 1e-9))]
    return float(np.mean(np.asarray(unknown_scores, float) >= threshold))


FRESH_KEYS = ("quiz_accuracy", "closed_accuracy", "open_set_auroc", "oscr", "fpr95")


def fresh_summary(per_quiz: dict[int, dict]) -> dict:
    """{seed: quiz metrics} -> mean, sd (n - 1, with two or more quizzes) and the per-quiz figures."""
    out = {"fresh_quizzes": len(per_quiz)}
    for k in FRESH_KEYS:
        values = np.array([m[k] for m in per_quiz.values() if k in m], float)
        if len(values):
            out[f"fresh_mean/{k}"] = float(values.mean())
            if len(values) > 1:
                out[f"fresh_sd/{k}"] = float(values.std(ddof=1))
    for seed, m in per_quiz.items():
        out.update({f"fresh_seed{seed}/{k}": m[k] for k in FRESH_KEYS if k in m})
    return out


def fresh_table(summaries: dict[str, dict]) -> str:
    """Markdown: per model, mean +- sd and every quiz's figure of each metric."""
    rows = ["| model | metric | mean ± sd | per quiz (seed: value) |", "|---|---|---|---|"]
    for name, s in summaries.items():
        seeds = [k.split("/")[0].removeprefix("fresh_seed") for k in s if k.startswith("fresh_seed")]
        seeds = list(dict.fromkeys(seeds))
        for k in FRESH_KEYS:
            if f"fresh_mean/{k}" not in s:
                continue
            sd = s.get(f"fresh_sd/{k}")
            spread = f"{s[f'fresh_mean/{k}']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
            per = ", ".join(f"{q}: {s[f'fresh_seed{q}/{k}']:.3f}" for q in seeds if f"fresh_seed{q}/{k}" in s)
            rows.append(f"| {name} | {k} | {spread} | {per} |")
    return "\n".join(rows) + "\n"


def quiz_metrics(result: QuizResult) -> dict:
    """Quiz accuracy ("none" counted), closed-set accuracy, AUROC and OSCR, accuracy per magnification band."""
    labels, dist = result.labels, result.distributions
    truths = np.array(result.truths)
    answers = np.array([labels[i] for i in dist.argmax(axis=1)])
    known = truths != NONE
    closed = np.array([labels[i] for i in dist[:, :-1].argmax(axis=1)]) == truths
    mags = result.quiz.px_per_um
    metrics = {
        "quiz_accuracy": float(np.mean(answers == truths)),
        "closed_accuracy": float(np.mean(closed[known])) if known.any() else float("nan"),
        "extrapolating_images": int(sum(p.extrapolating for p in result.predictions)),
        "images": len(truths),
    }
    for lo, hi in MAG_BINS:
        band = known & (mags >= lo) & (mags < hi)
        if band.any():
            metrics[f"closed_accuracy_{lo:g}-{hi:g}px_per_um"] = float(np.mean(closed[band]))
    if known.any() and (~known).any():
        # The open-set score is the image's typicality: how well its crops fit their best class
        # mixture. The crop-averaged P(none) thresholds the same likelihoods (coarser); both reported.
        typical = np.array([p.typicality for p in result.predictions])
        metrics["open_set_auroc"] = float(roc_auc_score(~known, -typical))
        metrics["open_set_auroc_p_none"] = float(roc_auc_score(~known, dist[:, -1]))
        metrics["oscr"] = oscr(closed[known], typical[known], typical[~known])
        metrics["fpr95"] = fpr_at_tpr(typical[known], typical[~known])
    return metrics


def confusion(result: QuizResult) -> np.ndarray:
    """Counts, rows = truth, columns = answer, over the labels (classes and "none")."""
    idx = {k: i for i, k in enumerate(result.labels)}
    out = np.zeros((len(idx), len(idx)), int)
    for t, p in zip(result.truths, result.predictions, strict=True):
        out[idx[t], idx[p.answer]] += 1
    return out


def write_table(result: QuizResult, path: Path) -> None:
    """The per-image probability table (CSV), like the paper's supplementary tables."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["file", "truth", "px_per_um", "style", "answer", "extrapolating", "typicality", *result.labels]
        )
        for e, p in zip(result.quiz.entries, result.predictions, strict=True):
            w.writerow(
                [
                    e["file"],
                    e["answer"],
                    e["px_per_um"],
                    e["style"],
                    p.answer,
                    p.extrapolating,
                    f"{p.typicality:.2f}",
                    *[f"{v:.3f}" for v in p.distribution],
                ]
            )


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_confusion(result: QuizResult, path: Path) -> None:
    cm = confusion(result)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cm), 0.8 + 0.6 * len(cm)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > cm.max() / 2 else "black"
        )
    ax.set_xticks(range(len(cm)), result.labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(cm)), result.labels, fontsize=8)
    ax.set_xlabel("answer")
    ax.set_ylabel("truth")
    ax.set_title(f"{result.name}: quiz confusion", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_descriptors(
    recognizer: Recognizer, result: QuizResult, path: Path, crops_per_image: int = 40, seed: int = 0
) -> bool:
    """Quiz crops in the descriptor space of the first ensemble member with its class GMMs'
    log-likelihood contours and the "none" threshold contour (the paper's Fig. 2). Only for 2-D
    descriptors; returns whether it drew."""
    gmm = recognizer.gmms[0]
    if gmm.means[0].shape[1] != 2:
        return False
    rng = np.random.default_rng(seed)
    zs, names = [], []
    for e, img in zip(result.quiz.entries, result.quiz.images, strict=True):
        boxes = sample_boxes(rng, img.shape, crops_per_image, recognizer.crop_min_px, recognizer.crop_max_px)
        crops = extract(img, boxes, recognizer.crop_px)
        zs.append(
            recognizer.descriptors(crops, crop_magnification(e["px_per_um"], boxes, recognizer.crop_px))
        )
        names += [e["class"]] * crops_per_image
    z, names = np.concatenate(zs), np.array(names)
    centres = np.concatenate(gmm.means)
    lo = np.minimum(np.percentile(z, 1, axis=0), centres.min(0)) - 1
    hi = np.maximum(np.percentile(z, 99, axis=0), centres.max(0)) + 1
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    ll = gmm.log_likelihood(np.stack([gx.ravel(), gy.ravel()], axis=1)).reshape(200, 200, -1)
    fig, ax = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10").colors
    for k, cls in enumerate(gmm.classes):
        sel = names == cls
        ax.scatter(z[sel, 0], z[sel, 1], s=4, alpha=0.4, color=colours[k], label=cls)
        ax.contour(
            gx,
            gy,
            ll[..., k],
            levels=gmm.threshold + np.array([2.0, 4.0]),
            colors=[colours[k]],
            linewidths=0.6,
            alpha=0.8,
        )
    unknown = ~np.isin(names, gmm.classes)
    if unknown.any():
        ax.scatter(
            z[unknown, 0], z[unknown, 1], s=6, marker="x", color="black", alpha=0.5, label="unknown classes"
        )
    ax.contour(gx, gy, ll.max(axis=2), levels=[gmm.threshold], colors="red", linestyles="--", linewidths=1.2)
    ax.plot([], [], "r--", label=f"'none' threshold (log-lik {gmm.threshold:.1f})")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel("descriptor 1")
    ax.set_ylabel("descriptor 2")
    member = f", member 1 of {len(recognizer.nets)}" if len(recognizer.nets) > 1 else ""
    ax.set_title(f"{result.name}: quiz crops, GMM log-likelihood contours{member}", fontsize=9)
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_saliency_examples(result: QuizResult, path: Path, per_label: int = 1) -> None:
    """One image per true label with its saliency overlay."""
    picks, seen = [], {}
    for i, t in enumerate(result.truths):
        if seen.get(t, 0) < per_label:
            seen[t] = seen.get(t, 0) + 1
            picks.append(i)
    fig, axes = plt.subplots(len(picks), 2, figsize=(7, 3.4 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        e = result.quiz.entries[i]
        title = f"{e['class']} ({e['answer']}), {e['px_per_um']:g} px/um, {e['style']}"
        plot_saliency(axes[row, 0], axes[row, 1], result.quiz.images[i], result.predictions[i], title)
    fig.tight_layout()
    _save(fig, path)


def write_report(recognizer: Recognizer, result: QuizResult, out_dir: Path) -> dict:
    """Every table and figure of one model into out_dir; returns its metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = quiz_metrics(result)
    write_table(result, out_dir / "quiz_probabilities.csv")
    plot_confusion(result, out_dir / "confusion.png")
    with atomic_path(out_dir / "confusion.json") as tmp:
        tmp.write_text(json.dumps({"labels": result.labels, "counts": confusion(result).tolist()}) + "\n")
    plot_descriptors(recognizer, result, out_dir / "descriptors.png")
    plot_saliency_examples(result, out_dir / "saliency_examples.png")
    return metrics


def comparison_table(metrics: dict[str, dict]) -> str:
    """Markdown: one row per metric, one column per model (e.g. quiz1 and its no-magnification ablation)."""
    names = list(metrics)
    keys = list(dict.fromkeys(k for m in metrics.values() for k in m))
    rows = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        cells = [metrics[n].get(k, "") for n in names]
        rows.append(
            f"| {k} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells) + " |"
        )
    return "\n".join(rows) + "\n"
