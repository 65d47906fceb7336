"""MLflow pyfunc models for the REST server (`mlflow models serve --env-manager local`).

`BoundaryModel` serves the boundary U-Net. Its only artifact is a training checkpoint,
loaded with torch.load(weights_only=True). A request is a table with a column `image`
(base64 PNG / TIFF / JPEG bytes) and an optional `pixel_size_nm` (nm per pixel, between
0.001 and 1e6; leave the column out when it is unknown: NaN, null or infinity is refused);
each answer row holds the probability map and the one-pixel tracing as base64 PNGs plus
grain statistics.

`RecognitionModel` serves a recognizer (model.pt + gmm.json, plain values). A request has
`image` and `px_per_um`; each answer row holds the answer, the extrapolation flag and one
probability column per class and "none".

Images are decoded and checked like any image file. Bad input raises
MlflowException(INVALID_PARAMETER_VALUE), which the server answers with HTTP 400 and the
message.

Size limits, read from the environment when the server loads the model:

    GRAINLAB_SERVING_MAX_IMAGE_BYTES   base64 characters per image, checked before decoding
                                       (default 32 MiB)
    GRAINLAB_SERVING_MAX_PIXELS        pixels per request, all its images together, checked on
                                       the image headers before any pixel is decoded (default:
                                       the model's data.serving_max_pixels, 2**22 = 2048 x 2048)
    GRAINLAB_SERVING_MAX_ROWS          images per request (default 64)
    GRAINLAB_SERVING_MAX_INFLIGHT_PIXELS
                                       pixels decoded and traced at once in one server process,
                                       all requests together (default twice the request limit)

Time and memory grow with the pixels, mostly in the watershed post-processing: on a 2-core
CPU tracing 2**22 pixels took 10 s (16 s with the CPU shared by other work) and 450 MiB above
the idle server, 2**23 took 26 s (56 s shared) and 2**24 took 56 s (benchmarks/RESULTS.md,
issue 15). The default keeps a request well within the scoring server's request timeout
(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s by default), after which the server answers 504
but cannot stop the work. MLflow runs each request in a thread of its own; a request whose
pixels do not fit into the in-flight budget waits for its turn up to a third of that timeout
and is then refused with HTTP 503 (server busy), so a burst of large requests neither piles
up memory nor runs on after its clients have given up.

MLflow's server reads the whole request body before the model sees it; a hard cap on the
body itself belongs in front of it (a reverse proxy).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from grainlab.cli import PIXEL_SIZE_NM
from grainlab.config import DataConfig
from grainlab.errors import GrainlabError, short

BOUNDARY_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image"), ColSpec("double", "pixel_size_nm", required=False)]),
    outputs=Schema(
        [
            ColSpec("string", "probability_png"),
            ColSpec("string", "tracing_png"),
            ColSpec("long", "grain_count"),
            ColSpec("double", "mean_diameter_px"),
            ColSpec("double", "heyn_intercept_px"),
            ColSpec("double", "astm_g"),
        ]
    ),
)


SERVING_PACKAGES = [
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "pillow",
    "scipy",
    "scikit-image",
    "scikit-learn",
    "opencv-python-headless",
    "albumentations",
    "matplotlib",
    "pyyaml",
]
RECOGNIZER_ARTIFACT = "model_dir"

MAX_IMAGE_BYTES_ENV = "GRAINLAB_SERVING_MAX_IMAGE_BYTES"
MAX_PIXELS_ENV = "GRAINLAB_SERVING_MAX_PIXELS"
MAX_ROWS_ENV = "GRAINLAB_SERVING_MAX_ROWS"
MAX_INFLIGHT_PIXELS_ENV = "GRAINLAB_SERVING_MAX_INFLIGHT_PIXELS"
DEFAULT_MAX_PIXELS = DataConfig().serving_max_pixels
DEFAULT_MAX_IMAGE_BYTES = 32 * 2**20
DEFAULT_MAX_ROWS = 64
MAX_CROPS = 10_000  # ~25 s on a 2-core CPU; more would run into the scoring server's 60 s timeout (a 5xx)


@dataclass(frozen=True)
class Limits:
    """What one request may hold (images, base64 characters per image, pixels of all its images
    together), and the pixels one server process decodes and traces at once (0: twice max_pixels)."""

    max_pixels: int
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_rows: int = DEFAULT_MAX_ROWS
    max_inflight_pixels: int = 0

    @property
    def inflight_pixels(self) -> int:
        """The in-flight budget: never below one request's limit, which could otherwise never run."""
        return max(self.max_inflight_pixels or 2 * self.max_pixels, self.max_pixels)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return int(default)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise GrainlabError(f"{name}={text!r}: expected a positive whole number")
    return value


def serving_limits(default_pixels: int = DEFAULT_MAX_PIXELS) -> Limits:
    """The request limits: the environment's (see the module docstring), else the defaults."""
    max_pixels = _env_int(MAX_PIXELS_ENV, default_pixels)
    return Limits(
        max_pixels=max_pixels,
        max_image_bytes=_env_int(MAX_IMAGE_BYTES_ENV, DEFAULT_MAX_IMAGE_BYTES),
        max_rows=_env_int(MAX_ROWS_ENV, DEFAULT_MAX_ROWS),
        max_inflight_pixels=_env_int(MAX_INFLIGHT_PIXELS_ENV, 2 * max_pixels),
    )


def queue_seconds() -> float:
    """How long a request waits for its turn at the PixelGate: a third of the scoring server's
    request timeout, which leaves the rest of it for the work."""
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    try:
        timeout = float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    except (TypeError, ValueError):
        timeout = 60.0
    return max(timeout, 1.0) / 3


class PixelGate:
    """Admits requests while the pixels being decoded and traced in this process, all requests
    together, stay within `budget`; a request that does not fit within `wait_s` gets HTTP 503."""

    def __init__(self, budget: int, wait_s: float):
        self.budget, self.wait_s = int(budget), float(wait_s)
        self.in_flight = 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def admit(self, pixels: int):
        pixels = max(1, min(int(pixels), self.budget))
        with self._free:
            if not self._free.wait_for(lambda: self.in_flight + pixels <= self.budget, self.wait_s):
                raise MlflowException(
                    f"server busy: {self.in_flight} pixels are being traced, and this request's {pixels} "
                    f"would exceed the limit of {self.budget} at once ({MAX_INFLIGHT_PIXELS_ENV}); "
                    f"waited {self.wait_s:.0f} s; retry later",
                    error_code=TEMPORARILY_UNAVAILABLE,
                )
            self.in_flight += pixels
        try:
            yield
        finally:
            with self._free:
                self.in_flight -= pixels
                self._free.notify_all()


def check_rows(frame: pd.DataFrame, limits: Limits):
    if len(frame) > limits.max_rows:
        raise _bad_input(
            f"request holds {len(frame)} images, over the limit of {limits.max_rows} per request "
            f"({MAX_ROWS_ENV}); send them in several requests"
        )


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _png_base64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _probability_8bit(prob: np.ndarray) -> np.ndarray:
    """round(prob * 255) as uint8, a band of rows at a time: no full-size float temporaries."""
    out = np.empty(prob.shape, np.uint8)
    step = max(1, (1 << 20) // max(prob.shape[1], 1))
    for y in range(0, prob.shape[0], step):
        out[y : y + step] = np.round(prob[y : y + step] * 255)
    return out


def pixel_size(value, row: int) -> float:
    """A row's `pixel_size_nm`, checked: a finite number of nm in PIXEL_SIZE_NM, else HTTP 400."""
    lo, hi = PIXEL_SIZE_NM
    try:
        nm = float(value)
    except (TypeError, ValueError, OverflowError):
        nm = math.nan
    if not (math.isfinite(nm) and lo <= nm <= hi):
        what = " (NaN, null or missing in this row)" if nm != nm else ""
        raise _bad_input(
            f"row {row}: 'pixel_size_nm' = {short(value)}{what}: expected the pixel size in nanometres, "
            f"a finite number between {lo:g} and {hi:.0f}; leave the field out of every row when it is unknown"
        )
    return nm


def _image_bytes(text, row: int, limits: Limits) -> bytes:
    if not isinstance(text, str | bytes) or not text:
        raise _bad_input(f"row {row}: 'image' must be a non-empty base64 string of PNG/TIFF/JPEG bytes")
    if len(text) > limits.max_image_bytes:
        raise _bad_input(
            f"row {row}: 'image' is {len(text)} bytes of base64, over the limit of {limits.max_image_bytes} "
            f"({MAX_IMAGE_BYTES_ENV}); send a smaller image"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_input(f"row {row}: 'image' is not valid base64") from None


def _image_problem(exc: GrainlabError, row: int) -> MlflowException:
    return _bad_input(f"row {row}: {str(exc).replace('data.max_image_pixels', MAX_PIXELS_ENV)}")


def measure_images(texts, limits: Limits) -> tuple[list[bytes], int]:
    """The image bytes of every row and their pixels together, measured before any pixel is decoded.

    Each base64 text is measured before it is decoded, and each image header is read for its
    size; an image, or all of the request's images together, over limits.max_pixels is refused.
    """
    from grainlab.images import image_size

    raws, total = [], 0
    for row, text in enumerate(texts):
        raw = _image_bytes(text, row, limits)
        try:
            w, h = image_size("image", max_pixels=limits.max_pixels, data=raw)
        except GrainlabError as exc:
            raise _image_problem(exc, row) from None
        total += w * h
        if total > limits.max_pixels:
            raise _bad_input(
                f"row {row}: the request's images hold {total} pixels together (rows 0 to {row}), over the "
                f"limit of {limits.max_pixels} pixels per request ({MAX_PIXELS_ENV}); "
                "send them in several requests"
            )
        raws.append(raw)
    return raws, total


def decode_image(raw: bytes, row: int, channels: str, limits: Limits) -> np.ndarray:
    """Image bytes (measured by measure_images) -> float image, checked like any image file."""
    from grainlab.images import read_image

    try:
        return read_image("image", channels=channels, max_pixels=limits.max_pixels, data=raw)
    except GrainlabError as exc:
        raise _image_problem(exc, row) from None


class BoundaryModel(mlflow.pyfunc.PythonModel):
    """Grain-boundary tracing: image in; probability map, tracing and grain statistics out."""

    def load_context(self, context):
        from grainlab.boundaries.infer import load_model

        self.model = load_model(context.artifacts["checkpoint"])
        cfg = self.model.params.get("boundaries", {})
        self.tile = (cfg.get("tile_px", 256), cfg.get("tile_overlap", 0.25), cfg.get("tile_batch", 8))
        # the post-processing calibrated in training, unless the params say boundaries.postprocess_from: params
        from_checkpoint = cfg.get("postprocess_from", "checkpoint") == "checkpoint" and self.model.postprocess
        self.post = self.model.postprocess if from_checkpoint else cfg.get("postprocess", {})
        self.limits = serving_limits(
            self.model.params.get("data", {}).get("serving_max_pixels", DEFAULT_MAX_PIXELS)
        )
        self.gate = PixelGate(self.limits.inflight_pixels, queue_seconds())

    def predict(self, context, model_input, params=None):
        frame = pd.DataFrame(model_input) if isinstance(model_input, dict | list) else model_input
        if not isinstance(frame, pd.DataFrame) or "image" not in frame.columns:
            columns = list(getattr(frame, "columns", []))
            raise _bad_input(f"expected a column 'image' (base64 PNG/TIFF bytes); got columns {columns}")
        check_rows(frame, self.limits)
        if "pixel_size_nm" in frame.columns:
            sizes = [pixel_size(value, i) for i, value in enumerate(frame["pixel_size_nm"])]
        else:
            sizes = [None] * len(frame)
        raws, pixels = measure_images(frame["image"], self.limits)
        with self.gate.admit(pixels):
            return pd.DataFrame([self._trace(raws, i, nm) for i, nm in enumerate(sizes)])

    def _trace(self, raws: list, row: int, pixel_size_nm: float | None) -> dict:
        """One image traced; each full-size array is let go as soon as the next step no longer needs it."""
        from grainlab.boundaries.grains import Postprocess, grain_stats, label_grains, trace_boundaries
        from grainlab.boundaries.infer import predict_probability

        post = Postprocess(**self.post)
        image = decode_image(raws[row], row, "rgb" if self.model.in_channels == 3 else "grey", self.limits)
        raws[row] = None
        prob = predict_probability(self.model, image, *self.tile)
        del image
        tracing = trace_boundaries(prob, post)
        probability_png = _png_base64(_probability_8bit(prob))
        del prob
        stats = grain_stats(tracing, label_grains(tracing, post), pixel_size_nm)
        return {
            "probability_png": probability_png,
            "tracing_png": _png_base64(np.multiply(tracing, 255, dtype=np.uint8)),
            "grain_count": stats.count,
            "mean_diameter_px": stats.mean_diameter_px,
            "heyn_intercept_px": stats.heyn_intercept_px,
            "astm_g": stats.astm_g if stats.astm_g is not None else float("nan"),
        }


def log_boundary_model(checkpoint: str | Path, name: str = "model"):
    """Log a boundary checkpoint as a pyfunc model (with its signature) to the active run."""
    import grainlab
    from grainlab import tracking

    return tracking.log_pyfunc_model(
        name=name,
        python_model=BoundaryModel(),
        artifacts={"checkpoint": str(checkpoint)},
        signature=BOUNDARY_SIGNATURE,
        packages=SERVING_PACKAGES,
        code_paths=[str(Path(grainlab.__file__).parent)],
    )


class RecognitionModel(mlflow.pyfunc.PythonModel):
    """Crop-averaged microstructure recognition with "none of these" and the extrapolation flag."""

    def load_context(self, context):
        from grainlab.recognition.predict import Recognizer

        self.recognizer = Recognizer.load(context.artifacts[RECOGNIZER_ARTIFACT])
        self.default_crops = int(self.recognizer.meta["params"]["predict_crops"])
        self.limits = serving_limits()
        self.gate = PixelGate(self.limits.inflight_pixels, queue_seconds())

    def predict(self, context, model_input, params=None):
        frame = pd.DataFrame(model_input) if isinstance(model_input, dict | list) else model_input
        value = (params or {}).get("n_crops")
        n_crops = self.default_crops if value is None else int(value)  # n_crops=0 is refused, not defaulted
        if not 1 <= n_crops <= MAX_CROPS:
            raise _bad_input(f"n_crops = {n_crops}: expected 1..{MAX_CROPS}")
        missing = {"image", "px_per_um"} - set(getattr(frame, "columns", []))
        if missing:
            raise _bad_input(
                f"input: missing column(s) {sorted(missing)}; expected 'image' (base64) and 'px_per_um'"
            )
        check_rows(frame, self.limits)
        raws, pixels = measure_images(frame["image"], self.limits)
        rows = []
        with self.gate.admit(pixels):
            for i, m in enumerate(frame["px_per_um"]):
                img = decode_image(raws[i], i, "grey", self.limits)
                raws[i] = None
                try:
                    pred = self.recognizer.predict(img, m, n_crops=n_crops, what=f"row {i}: image")
                except GrainlabError as exc:
                    raise _bad_input(f"row {i}: {exc}") from None
                del img
                d = pred.as_dict()
                rows.append(
                    {
                        "answer": d["answer"],
                        "extrapolating": d["extrapolating"],
                        **{f"p_{k}": v for k, v in d["probabilities"].items()},
                    }
                )
        return pd.DataFrame(rows)


def recognizer_signature(labels: list[str]) -> ModelSignature:
    outputs = [ColSpec("string", "answer"), ColSpec("boolean", "extrapolating")]
    outputs += [ColSpec("double", f"p_{k}") for k in labels]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("double", "px_per_um")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("n_crops", "long", 1000)]),
    )


def log_recognizer_model(model_dir: str | Path, labels: list[str], name: str = "pyfunc"):
    """Log a saved recognizer as a pyfunc model (with its signature) to the active run."""
    import grainlab
    from grainlab import tracking

    return tracking.log_pyfunc_model(
        name=name,
        python_model=RecognitionModel(),
        artifacts={RECOGNIZER_ARTIFACT: str(model_dir)},
        signature=recognizer_signature(labels),
        packages=SERVING_PACKAGES,
        code_paths=[str(Path(grainlab.__file__).parent)],
    )
