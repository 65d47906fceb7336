"""Honest selection: the GMM component count and the "none" percentile chosen on training images
held out from the fit (stratified by class), never on a quiz.

The held-out images are predicted the way users predict (`Recognizer.predict`: crop-averaged,
open-set GMMs, members averaged; the same crops and seeds), once per candidate GMM; the
networks' descriptors of their crops are computed once.

"None" calibration can only use known classes (the unknown ones are, by definition, not in
training): for each component count, the percentile is the largest of the grid whose held-out
known images are answered "none" at most `false_none_rate` of the time (the smallest of the grid
when none qualifies). Among the component counts, the best held-out accuracy ("none" counted
wrong) wins; ties go to the higher mean held-out own-class log-likelihood, then to fewer components.
"""

from __future__ import annotations

import numpy as np

from grainlab.errors import GrainlabError
from grainlab.recognition.openset import NONE, OpenSetGMM, fit_gmm


def holdout_split(labels: np.ndarray, n_classes: int, fraction: float, seed: int):
    """(fit ids, held-out ids): round(fraction) of each class's images (at least 1) held out."""
    rng = np.random.default_rng(seed)
    held = []
    for k in range(n_classes):
        ids = np.flatnonzero(labels == k)
        n = max(1, round(len(ids) * fraction))
        if len(ids) - n < 1:
            raise GrainlabError(
                f"class {k}: {len(ids)} training image(s), none left to fit after holding out {n}; "
                "expected more images or recognition.holdout_fraction=0"
            )
        held.append(rng.permutation(ids)[:n])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def heldout_descriptors(recognizer, data, ids, n_crops: int, batch_size: int, seed: int) -> list[tuple]:
    """Per held-out image, `Recognizer.image_descriptors` with predict's seed (seed + image index)."""
    return [
        recognizer.image_descriptors(
            data.images[i],
            data.px_per_um[i],
            n_crops,
            batch_size,
            seed=seed + int(i),
            what=data.entries[i]["file"],
        )
        for i in ids
    ]


def predict_heldout(recognizer, data, ids, n_crops: int, batch_size: int, seed: int, gmms=None) -> list:
    """The Predictions of the held-out images, exactly as `recognizer.predict` would give them."""
    descs = heldout_descriptors(recognizer, data, ids, n_crops, batch_size, seed)
    return [recognizer.prediction_from(m, boxes, zs, gmms) for m, boxes, zs in descs]


def _with_threshold(gmm: OpenSetGMM, threshold: float) -> OpenSetGMM:
    return OpenSetGMM(gmm.classes, gmm.weights, gmm.means, gmm.covariances, threshold)


def select_open_set(recognizer, data, val_ids, fits: list[dict], cfg, seed: int):
    """Pick the component count and percentile on the held-out images.

    fits: per member, {"fit": (z, y) descriptors of the fitting crops, "calibration": (z, y) of a
    second set of crops of the same images}. Returns (the chosen per-member GMMs, the record)."""
    truths = np.array([data.classes[data.labels[i]] for i in val_ids])
    descs = heldout_descriptors(recognizer, data, val_ids, cfg.select_crops, cfg.batch_size, seed)
    candidates, chosen = [], None
    for c in cfg.gmm_components_grid:
        try:
            gmms = [
                fit_gmm(*f["fit"], data.classes, c, 50.0, 0.0, seed + m, None) for m, f in enumerate(fits)
            ]
        except GrainlabError:  # fewer fitting descriptors than components in some class
            continue
        own_cal = [g.log_likelihood(f["calibration"][0]) for g, f in zip(gmms, fits, strict=True)]
        own_cal = [ll[np.arange(len(ll)), f["calibration"][1]] for ll, f in zip(own_cal, fits, strict=True)]
        # Each held-out crop's class log-likelihoods, per member: the threshold does not change them.
        lls = [[g.log_likelihood(z) for g, z in zip(gmms, zs, strict=True)] for _, _, zs in descs]
        heldout_ll = np.mean(
            [np.mean(ll[:, data.labels[i]]) for per, i in zip(lls, val_ids, strict=True) for ll in per]
        )
        if cfg.none_threshold is not None:
            grid = [(None, [cfg.none_threshold] * len(gmms))]
        else:
            grid = [
                (p, [float(np.percentile(o, p)) for o in own_cal]) for p in sorted(cfg.none_percentile_grid)
            ]
        rows = []
        for p, thresholds in grid:
            thresholded = [_with_threshold(g, t) for g, t in zip(gmms, thresholds, strict=True)]
            # As Recognizer.prediction_from: the members' mean crop probabilities, averaged over the crops.
            dists = [
                np.mean([g.probabilities(ll) for g, ll in zip(thresholded, per, strict=True)], axis=0).mean(0)
                for per in lls
            ]
            labels = thresholded[0].labels
            answers = np.array([labels[int(np.argmax(d))] for d in dists])
            rows.append(
                {
                    "gmm_components": int(c),
                    "none_percentile": p,
                    "accuracy": float(np.mean(answers == truths)),
                    "false_none": float(np.mean(answers == NONE)),
                    "heldout_loglik": float(heldout_ll),
                    "_gmms": thresholded,
                }
            )
        ok = [r for r in rows if r["false_none"] <= cfg.false_none_rate]
        best = ok[-1] if ok else rows[0]  # the largest qualifying percentile, else the smallest
        candidates.append(best)
        key = (best["accuracy"], best["heldout_loglik"], -c)
        if chosen is None or key > chosen[0]:
            chosen = (key, best)
    if chosen is None:
        raise GrainlabError(
            f"recognition.gmm_components_grid = {list(cfg.gmm_components_grid)}: every count exceeds the "
            "fitting descriptors of some class; expected smaller counts or more recognition.gmm_crops_per_image"
        )
    best = chosen[1]
    record = {
        "holdout_images": [data.entries[i]["file"] for i in val_ids],
        "holdout_fraction": cfg.holdout_fraction,
        "false_none_target": cfg.false_none_rate,
        "crops_per_image": cfg.select_crops,
        "rule": "per component count the largest none_percentile with held-out false-none <= target; "
        "then the best held-out accuracy (ties: held-out log-likelihood, fewer components)",
        "gmm_components": best["gmm_components"],
        "none_percentile": best["none_percentile"],
        "accuracy": best["accuracy"],
        "false_none": best["false_none"],
        "candidates": [{k: v for k, v in r.items() if not k.startswith("_")} for r in candidates],
    }
    return best["_gmms"], record
