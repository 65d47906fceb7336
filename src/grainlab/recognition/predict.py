"""Crop-averaged image prediction with a trained recognizer, saliency maps and their overlays."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grainlab.errors import GrainlabError, load_error_reason, short
from grainlab.images import atomic_path, staged_dir, write_bytes
from grainlab.recognition.crops import (
    check_px_per_um,
    check_size,
    crop_magnification,
    extract,
    sample_boxes,
    to_channels,
)
from grainlab.recognition.model import TripletNet, log_magnification
from grainlab.recognition.openset import OpenSetGMM, load_gmms, load_selection, save_gmms

CHECKPOINT = "model.pt"
GMM_FILE = "gmm.json"


@dataclass
class Prediction:
    """One image's answer: the crop-averaged distribution over the classes and "none"."""

    labels: list[str]
    distribution: np.ndarray
    extrapolating: bool
    boxes: np.ndarray
    crop_probabilities: np.ndarray
    typicality: float  # median over the crops of the best class log-likelihood above the "none" threshold

    @property
    def answer(self) -> str:
        return self.labels[int(np.argmax(self.distribution))]

    def as_dict(self) -> dict:
        return {
            "answer": self.answer,
            "probabilities": {k: float(p) for k, p in zip(self.labels, self.distribution, strict=True)},
            "extrapolating": self.extrapolating,
            "typicality": self.typicality,
        }


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise GrainlabError(
                "recognition.device = 'cuda': no CUDA device is available; expected 'auto' or 'cpu'"
            )
        return torch.device("cuda")
    return torch.device("cpu")


class Recognizer:
    """An ensemble of trained triplet networks, each with its own open-set GMMs (a descriptor space
    is its network's own), and the crop settings they were trained with."""

    def __init__(self, nets: list[TripletNet], gmms: list[OpenSetGMM], meta: dict, device: torch.device):
        self.nets = [net.to(device).eval() for net in nets]
        self.gmms = gmms
        self.device = device
        self.meta = {k: v for k, v in meta.items() if k != "state_dicts"}
        self.crop_px = int(meta["crop_px"])
        self.crop_min_px = int(meta["crop_min_px"])
        self.crop_max_px = int(meta["crop_max_px"])
        self.edge_channel = bool(meta["edge_channel"])
        self.px_per_um_range = tuple(float(v) for v in meta["px_per_um_range"])
        self.selection: dict | None = None  # how the GMMs were chosen on held-out training images

    @property
    def labels(self) -> list[str]:
        return self.gmms[0].labels

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> Recognizer:
        """Load model.pt (weights_only) and gmm.json from a model folder."""
        model_dir = Path(model_dir)
        path = model_dir / CHECKPOINT
        if not path.is_file():
            raise GrainlabError(
                f"{path}: recognition model not found; run `grainlab recognition train` first"
            )
        expected = "expected a model.pt written by `grainlab recognition train`"
        try:
            with warnings.catch_warnings():  # torch warns about foreign pickle protocols on stderr
                warnings.simplefilter("ignore")
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt, foreign or malicious files
            raise GrainlabError(
                f"{path}: not a readable recognition checkpoint ({load_error_reason(exc)}); {expected}"
            ) from None
        try:
            nets = []
            for state in ckpt["state_dicts"]:
                nets.append(TripletNet(**ckpt["model_args"]))
                nets[-1].load_state_dict(state)
            if not nets:
                raise ValueError("no networks")
            cls._check_meta(ckpt)
        except Exception as exc:
            raise GrainlabError(
                f"{path}: not a grainlab recognition checkpoint ({load_error_reason(exc)}); {expected}"
            ) from None
        gmms = load_gmms(model_dir / GMM_FILE)
        if len(gmms) != len(nets):
            raise GrainlabError(
                f"{model_dir / GMM_FILE}: {len(gmms)} open-set GMMs for the {len(nets)} networks of {path}; "
                "expected one per network"
            )
        out = cls(nets, gmms, ckpt, pick_device(device))
        out.selection = load_selection(model_dir / GMM_FILE)
        return out

    @staticmethod
    def _check_meta(meta: dict) -> None:
        """The crop settings `__init__` reads, as it reads them (a KeyError, TypeError or ValueError if not)."""
        for key in ("crop_px", "crop_min_px", "crop_max_px"):
            int(meta[key])
        if len([float(v) for v in meta["px_per_um_range"]]) != 2:
            raise ValueError(f"px_per_um_range = {short(meta['px_per_um_range'])}: expected (low, high)")
        bool(meta["edge_channel"])

    def save(self, model_dir: str | Path) -> Path:
        """Write model.pt (plain tensors and values, readable with weights_only=True) and gmm.json,
        staged so that a failed write leaves the old folder (or none), never half a model."""
        model_dir = Path(model_dir)
        states = [{k: v.detach().cpu() for k, v in net.state_dict().items()} for net in self.nets]
        buffer = io.BytesIO()  # serialised in memory: torch's file writer hides a full disk's OSError
        torch.save({**self.meta, "state_dicts": states}, buffer)
        with staged_dir(model_dir) as tmp:
            write_bytes(tmp / CHECKPOINT, buffer.getbuffer())
            save_gmms(self.gmms, tmp / GMM_FILE, self.selection)
        return model_dir

    def extrapolates(self, px_per_um: float) -> bool:
        lo, hi = self.px_per_um_range
        return not lo <= px_per_um <= hi

    def descriptors(self, crops: np.ndarray, crop_px_per_um: np.ndarray, member: int = 0) -> np.ndarray:
        """(n, h, w) resampled crops and their px/um -> (n, dim) descriptors of one member network."""
        return self._descriptors(self._inputs(crops, crop_px_per_um), self.nets[member])

    def _inputs(self, crops: np.ndarray, crop_px_per_um: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_channels(torch.from_numpy(crops).to(self.device), self.edge_channel)
        return x, log_magnification(crop_px_per_um).to(self.device)

    @torch.inference_mode()
    def _descriptors(self, inputs: tuple[torch.Tensor, torch.Tensor], net: TripletNet) -> np.ndarray:
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            z = net(*inputs)
        return z.float().cpu().numpy()

    def crop_probabilities(
        self, crops: np.ndarray, crop_px_per_um: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, labels) probabilities of each crop, averaged over the members, and (n,) how far each
        crop's best class log-likelihood lies above the "none" threshold, averaged likewise."""
        inputs = self._inputs(crops, crop_px_per_um)
        return self.open_set([self._descriptors(inputs, net) for net in self.nets])

    def open_set(
        self, member_descriptors: list[np.ndarray], gmms: list[OpenSetGMM] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each member's (n, dim) descriptors through its GMMs (`gmms`, default the recognizer's):
        the members' mean (n, labels) probabilities and mean (n,) margins above the threshold."""
        gmms = self.gmms if gmms is None else gmms
        probs, margins = 0.0, 0.0
        for z, gmm in zip(member_descriptors, gmms, strict=True):
            ll = gmm.log_likelihood(z)
            probs = probs + gmm.probabilities(ll)
            margins = margins + ll.max(axis=1) - gmm.threshold
        return probs / len(gmms), margins / len(gmms)

    def image_descriptors(
        self,
        img: np.ndarray,
        px_per_um,
        n_crops: int = 1000,
        batch_size: int = 250,
        seed: int = 0,
        what: str = "image",
    ) -> tuple[float, np.ndarray, list[np.ndarray]]:
        """The random crops `predict` takes (same seed, same crops): (px/um, boxes, each member's
        (n_crops, dim) descriptors)."""
        m = check_px_per_um(px_per_um)
        check_size(img.shape, self.crop_min_px, what)
        rng = np.random.default_rng(seed)
        boxes = sample_boxes(rng, img.shape, n_crops, self.crop_min_px, self.crop_max_px)
        zs = [[] for _ in self.nets]
        for i in range(0, n_crops, batch_size):
            b = boxes[i : i + batch_size]
            inputs = self._inputs(extract(img, b, self.crop_px), crop_magnification(m, b, self.crop_px))
            for k, net in enumerate(self.nets):
                zs[k].append(self._descriptors(inputs, net))
        return m, boxes, [np.concatenate(z) for z in zs]

    def predict(
        self,
        img: np.ndarray,
        px_per_um,
        n_crops: int = 1000,
        batch_size: int = 250,
        seed: int = 0,
        what: str = "image",
    ) -> Prediction:
        """Average the class probabilities (with "none") of n random crops, batched."""
        m, boxes, zs = self.image_descriptors(img, px_per_um, n_crops, batch_size, seed, what)
        return self.prediction_from(m, boxes, zs)

    def prediction_from(
        self, px_per_um: float, boxes: np.ndarray, member_descriptors: list[np.ndarray], gmms=None
    ) -> Prediction:
        """An image's Prediction from its crops' descriptors (`image_descriptors`), through `gmms`
        (default the recognizer's own)."""
        probs, margins = self.open_set(member_descriptors, gmms)
        typicality = float(np.median(margins))
        labels = (self.gmms if gmms is None else gmms)[0].labels
        return Prediction(labels, probs.mean(axis=0), self.extrapolates(px_per_um), boxes, probs, typicality)


def saliency_map(shape, boxes: np.ndarray, crop_probabilities: np.ndarray) -> np.ndarray:
    """(H, W, labels): per pixel, the mean probabilities of the crops covering it (0 where none does)."""
    h, w = shape[:2]
    k = crop_probabilities.shape[1]
    acc = np.zeros((h + 1, w + 1, k + 1))
    values = np.concatenate([crop_probabilities, np.ones((len(boxes), 1))], axis=1)
    top, left, s = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    for ys, xs, sign in ((top, left, 1), (top, left + s, -1), (top + s, left, -1), (top + s, left + s, 1)):
        np.add.at(acc, (ys, xs), sign * values)
    acc = acc.cumsum(0).cumsum(1)[:h, :w]
    return acc[..., :k] / np.maximum(acc[..., k:], 1e-9)


def label_colours(n_labels: int) -> np.ndarray:
    """One RGB colour per label; "none" (the last) is grey."""
    import matplotlib

    colours = np.array(matplotlib.colormaps["tab10"].colors[: n_labels - 1])
    return np.vstack([colours, [0.5, 0.5, 0.5]])


def saliency_overlay(img: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB image: the grey micrograph tinted by the probability-weighted class colours."""
    colour = saliency @ label_colours(saliency.shape[-1])
    grey = np.repeat(img[..., None], 3, axis=2)
    return np.clip((1 - alpha) * grey + alpha * colour * (0.5 + 0.5 * grey), 0, 1)


def plot_saliency(ax_image, ax_overlay, img, prediction: Prediction, title: str = "") -> None:
    """Draw an image and its saliency overlay with a legend on two matplotlib axes."""
    from matplotlib.patches import Patch

    sal = saliency_map(img.shape, prediction.boxes, prediction.crop_probabilities)
    ax_image.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax_overlay.imshow(saliency_overlay(img, sal))
    ax_image.set_title(title, fontsize=8)
    ax_overlay.set_title(
        f"answer: {prediction.answer}" + (" (extrapolating)" if prediction.extrapolating else ""), fontsize=8
    )
    colours = label_colours(len(prediction.labels))
    handles = [
        Patch(color=c, label=f"{name} {p:.2f}")
        for c, name, p in zip(colours, prediction.labels, prediction.distribution, strict=True)
    ]
    ax_overlay.legend(handles=handles, fontsize=6, loc="lower right", framealpha=0.8)
    for ax in (ax_image, ax_overlay):
        ax.set_axis_off()


def write_saliency_figure(img: np.ndarray, prediction: Prediction, out_png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    plot_saliency(axes[0], axes[1], img, prediction, title)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_png
