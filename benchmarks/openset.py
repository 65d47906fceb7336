"""Open-set scores on the same embeddings: the GMM likelihood against energy, Mahalanobis and k-NN (issue 18).

    python -m benchmarks.openset --train-seeds 0 1 2 --quizzes 3 --work /tmp/openset
    python -m benchmarks.openset --from /tmp/openset/openset.json      # print a finished run's table

For each training seed, a 1-member quiz-1 recognizer is trained as `grainlab recognition train`
trains it (held-out selection of the GMM component count and "none" percentile included), on
the library under DATA_ROOT/microstructures. Fresh quiz-1 quizzes are drawn with seeds that no
library, training or selection used (`microstructures.fresh_seeds`, as `evaluate --seeds`), and
every quiz image's crops (the crops `predict` takes) are embedded once. Four scores of a crop's
descriptor z, each aggregated per image as the median over its crops (like the typicality):

- gmm: the best class log-likelihood of the open-set GMMs (the paper's score, the default);
- energy: logsumexp_k of -|z - mu_k|^2 / 2, class means mu_k of the fitting crops (logits of a
  nearest-prototype classifier; temperature 1);
- mahalanobis: minus the smallest Mahalanobis distance to a class mean, tied (pooled
  within-class) covariance (Lee et al. 2018);
- knn: minus the distance to the k-th nearest fitting-crop descriptor (k = 10, fixed beforehand;
  scikit-learn NearestNeighbors; Sun et al. 2022).

All four rank the same images; the closed-set answers (for OSCR) are the recognizer's own. The
fitting crops are those the GMMs were fitted on (held-out images excluded). Reported per score:
AUROC (unknown vs known), FPR95 and OSCR, mean ± sd over (training seed, quiz) pairs, and the
mean paired difference to the GMM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from benchmarks.common import ROOT, add_set_option, load_average, machine
from grainlab.config import load_params
from grainlab.datasets.microstructures import build_quiz, fresh_seeds, load_manifest
from grainlab.recognition.evaluate import fpr_at_tpr, oscr
from grainlab.recognition.openset import NONE
from grainlab.recognition.select import holdout_split
from grainlab.recognition.train import load_images, open_set_crops, train_recognizer

SCORES = ("gmm", "energy", "mahalanobis", "knn")
KNN_K = 10


class Scorers:
    """The four crop scores, fitted on the fitting crops' descriptors (z, y) and the member's GMMs."""

    def __init__(self, z: np.ndarray, y: np.ndarray, gmm):
        self.gmm = gmm
        self.means = np.stack([z[y == k].mean(0) for k in range(len(gmm.classes))])
        centred = z - self.means[y]
        self.precision = np.linalg.inv(centred.T @ centred / len(z) + 1e-6 * np.eye(z.shape[1]))
        self.knn = NearestNeighbors(n_neighbors=KNN_K).fit(z)

    def __call__(self, z: np.ndarray) -> dict[str, np.ndarray]:
        d = z[:, None, :] - self.means[None]
        sq = (d**2).sum(-1)
        maha = np.einsum("nkd,de,nke->nk", d, self.precision, d)
        return {
            "gmm": self.gmm.log_likelihood(z).max(axis=1),
            "energy": logsumexp(-0.5 * sq, axis=1),
            "mahalanobis": -maha.min(axis=1),
            "knn": -self.knn.kneighbors(z)[0][:, -1],
        }


def quiz_figures(recognizer, scorer, quiz, n_crops: int, batch_size: int, seed: int) -> dict:
    truths = np.array([e["answer"] for e in quiz.entries])
    known = truths != NONE
    image_scores = {s: [] for s in SCORES}
    closed, answers = [], []
    for i, (e, img) in enumerate(zip(quiz.entries, quiz.images, strict=True)):
        m, boxes, zs = recognizer.image_descriptors(
            img, e["px_per_um"], n_crops, batch_size, seed + i, e["file"]
        )
        pred = recognizer.prediction_from(m, boxes, zs)
        answers.append(pred.answer)
        closed.append(pred.labels[int(np.argmax(pred.distribution[:-1]))] == e["answer"])
        for s, v in scorer(zs[0]).items():
            image_scores[s].append(float(np.median(v)))
    closed = np.array(closed)
    out = {"quiz_accuracy": float(np.mean(np.array(answers) == truths))}
    for s in SCORES:
        v = np.array(image_scores[s])
        out[s] = {
            "auroc": float(roc_auc_score(~known, -v)),
            "fpr95": fpr_at_tpr(v[known], v[~known]),
            "oscr": oscr(closed[known], v[known], v[~known]),
        }
    return out


def summarise(rows: list[dict]) -> dict:
    out = {"quiz_accuracy": _ms([r["quiz_accuracy"] for r in rows])}
    for s in SCORES:
        out[s] = {}
        for k in ("auroc", "fpr95", "oscr"):
            vals = np.array([r[s][k] for r in rows])
            diff = vals - np.array([r["gmm"][k] for r in rows])
            better = -diff if k == "fpr95" else diff  # FPR95: lower is better
            out[s][k] = {
                **_ms(vals),
                "diff_to_gmm": _ms(diff),
                "wins": int((better > 0).sum()),
                "losses": int((better < 0).sum()),
            }
    return out


def _ms(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None}


def markdown(report: dict) -> str:
    s, n = report["summary"], len(report["rows"])
    lines = [
        f"{n} (training seed, fresh quiz) pairs: training seeds {report['train_seeds']}, quiz seeds "
        f"{report['quiz_seeds']}; mean ± sd, and the mean paired difference to the GMM (wins/losses of {n}; "
        "FPR95: lower is better). Recognizer quiz accuracy (GMM answers): "
        f"{s['quiz_accuracy']['mean']:.3f} ± {s['quiz_accuracy']['sd'] or 0:.3f}.",
        "",
        "| score | AUROC | Δ AUROC | FPR95 | Δ FPR95 | OSCR | Δ OSCR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SCORES:
        cells = []
        for k in ("auroc", "fpr95", "oscr"):
            f = s[name][k]
            cells.append(f"{f['mean']:.3f} ± {f['sd']:.3f}")
            d = f["diff_to_gmm"]
            cells.append("—" if name == "gmm" else f"{d['mean']:+.3f} ({f['wins']}/{f['losses']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.openset", description=__doc__.splitlines()[0])
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quizzes", type=int, default=3, help="fresh quiz-1 quizzes")
    ap.add_argument("--first-quiz-seed", type=int, default=None)
    ap.add_argument(
        "--crops", type=int, default=None, help="crops per quiz image (default: recognition.eval_crops)"
    )
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default="demo")
    add_set_option(ap)
    ap.add_argument("--work", default="/tmp/grainlab-openset", help="fresh quizzes and openset.json go here")
    ap.add_argument("--from", dest="from_file", default=None, help="print the table of a finished run")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_file:
        print(markdown(json.loads(Path(args.from_file).read_text())))
        return 0
    params = load_params(args.params, ["recognition.members=1", *args.overrides], profile=args.profile)
    cfg = params.recognition
    library = Path(params.data.root) / "microstructures"
    work = Path(args.work)
    started, start, load = dt.datetime.now(dt.UTC), time.perf_counter(), load_average()
    manifest = load_manifest(library)
    used = {int(manifest["seed"]), *args.train_seeds}
    quiz_seeds = fresh_seeds(args.quizzes, used, args.first_quiz_seed)
    quizzes = {}
    for q in quiz_seeds:
        build_quiz(params.microstructures, work / f"quiz{q}", q, ("quiz1",), params.data.workers)
        quizzes[q] = load_images(work / f"quiz{q}", "quiz1", "quiz")
    data = load_images(library, "quiz1", "train")
    rows = []
    for seed in args.train_seeds:
        t0 = time.perf_counter()
        recognizer = train_recognizer(cfg, data, seed)
        fit, _ = holdout_split(data.labels, len(data.classes), cfg.holdout_fraction, seed)
        crops = open_set_crops(recognizer, data.subset(fit), cfg, seed)  # the crops the GMMs were fitted on
        scorer = Scorers(*crops["fit"], recognizer.gmms[0])
        sel = recognizer.selection
        print(
            f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s; selected {sel['gmm_components']} "
            f"components, none percentile {sel['none_percentile']}",
            flush=True,
        )
        for q, quiz in quizzes.items():
            fig = quiz_figures(
                recognizer, scorer, quiz, args.crops or cfg.eval_crops, cfg.batch_size, params.seed
            )
            rows.append(
                {
                    "train_seed": seed,
                    "quiz_seed": q,
                    "selection": {k: sel[k] for k in ("gmm_components", "none_percentile")},
                    **fig,
                }
            )
            print(
                f"  quiz {q}: accuracy {fig['quiz_accuracy']:.3f}; AUROC "
                + ", ".join(f"{s} {fig[s]['auroc']:.3f}" for s in SCORES),
                flush=True,
            )
    report = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(recognizer.device),
        "load_average": load,
        "wall_s": time.perf_counter() - start,
        "train_seeds": args.train_seeds,
        "quiz_seeds": quiz_seeds,
        "settings": {
            "members": 1,
            "epochs": cfg.epochs,
            "crops": args.crops or cfg.eval_crops,
            "knn_k": KNN_K,
        },
        "rows": rows,
        "summary": summarise(rows),
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "openset.json").write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"{report['date']}, {report['wall_s']:.0f} s, {report['machine']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
