"""Open set: a Gaussian mixture per class on the descriptors, and a "none of these" threshold.

The mixtures are fitted with scikit-learn and stored as plain arrays (JSON), never pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from grainlab.errors import GrainlabError
from grainlab.images import atomic_path

NONE = "none"


class OpenSetGMM:
    """Class mixtures (weights, means, covariances per class) and the log-likelihood threshold."""

    def __init__(self, classes, weights, means, covariances, threshold: float):
        self.classes = list(classes)
        self.weights = [np.asarray(w, float) for w in weights]
        self.means = [np.asarray(m, float) for m in means]
        self.covariances = [np.asarray(c, float) for c in covariances]
        self.threshold = float(threshold)
        self._chol = [np.linalg.cholesky(c) for c in self.covariances]

    @property
    def labels(self) -> list[str]:
        """The classes and "none", the order of every probability vector."""
        return [*self.classes, NONE]

    def log_likelihood(self, z: np.ndarray) -> np.ndarray:
        """(n, dim) descriptors -> (n, classes) log-likelihood under each class mixture."""
        z = np.asarray(z, float)
        out = np.empty((len(z), len(self.classes)))
        for k in range(len(self.classes)):
            comp = []
            for w, mu, chol in zip(self.weights[k], self.means[k], self._chol[k], strict=True):
                sol = np.linalg.solve(chol, (z - mu).T)
                logdet = 2 * np.log(np.diag(chol)).sum()
                comp.append(np.log(w) - 0.5 * ((sol**2).sum(0) + logdet + z.shape[1] * np.log(2 * np.pi)))
            out[:, k] = logsumexp(np.stack(comp), axis=0)
        return out

    def probabilities(self, ll: np.ndarray) -> np.ndarray:
        """(n, classes) log-likelihoods -> (n, classes + 1): class posteriors (equal priors), or all
        mass on "none" where the best class log-likelihood is below the threshold."""
        p = np.zeros((len(ll), len(self.classes) + 1))
        known = ll.max(axis=1) >= self.threshold
        p[known, :-1] = softmax(ll[known], axis=1)
        p[~known, -1] = 1.0
        return p

    def to_dict(self) -> dict:
        return {
            "classes": self.classes,
            "threshold": self.threshold,
            "weights": [w.tolist() for w in self.weights],
            "means": [m.tolist() for m in self.means],
            "covariances": [c.tolist() for c in self.covariances],
        }

    @classmethod
    def from_dict(cls, d: dict) -> OpenSetGMM:
        return cls(d["classes"], d["weights"], d["means"], d["covariances"], d["threshold"])


def save_gmms(gmms: list[OpenSetGMM], path: Path, selection: dict | None = None) -> None:
    """The open-set GMMs of an ensemble's members, in member order, as one JSON file, with the
    held-out selection that chose their component count and "none" percentile (if any)."""
    doc = {"members": [g.to_dict() for g in gmms]}
    if selection is not None:
        doc["selection"] = selection
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")


def load_selection(path: Path) -> dict | None:
    """The selection record of a gmm.json (None when the model was trained without one)."""
    try:
        return json.loads(Path(path).read_text()).get("selection")
    except (OSError, ValueError, AttributeError) as exc:
        raise GrainlabError(f"{path}: not a readable open-set GMM file ({exc})") from None


def load_gmms(path: Path) -> list[OpenSetGMM]:
    try:
        return [OpenSetGMM.from_dict(d) for d in json.loads(Path(path).read_text())["members"]]
    except (OSError, ValueError, KeyError, TypeError, np.linalg.LinAlgError) as exc:
        raise GrainlabError(f"{path}: not a readable open-set GMM file ({exc})") from None


def fit_gmm(
    descriptors: np.ndarray,
    labels: np.ndarray,
    classes,
    n_components: int,
    percentile: float,
    threshold: float | None = None,
    seed: int = 0,
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
) -> OpenSetGMM:
    """Fit one mixture per class and set the "none" threshold.

    Without an explicit `threshold` it is `percentile` of the own-class log-likelihood of the
    `calibration` (descriptors, labels), crops held out from the fit; of the fitting crops
    themselves when none are given (those sit a little deeper in their mixtures).
    """
    weights, means, covs = [], [], []
    for k, name in enumerate(classes):
        z = descriptors[labels == k]
        if len(z) < n_components:
            raise GrainlabError(
                f"class {name!r}: {len(z)} training descriptors for {n_components} GMM components"
            )
        # One thread: k-means on a few hundred 2-D points is ~20x cheaper without the OpenMP pool.
        with threadpool_limits(1):
            g = GaussianMixture(n_components, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(
                z
            )
        weights.append(g.weights_)
        means.append(g.means_)
        covs.append(g.covariances_)
    model = OpenSetGMM(classes, weights, means, covs, threshold=0.0)
    if threshold is None:
        z, y = calibration if calibration is not None else (descriptors, labels)
        own = model.log_likelihood(z)[np.arange(len(y)), y]
        threshold = float(np.percentile(own, percentile))
    model.threshold = threshold
    return model
