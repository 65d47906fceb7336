"""MLflow pyfunc models for the REST server (`mlflow models serve --env-manager local`).

`BoundaryModel` serves the boundary U-Net. Its only artifact is a training checkpoint,
loaded with torch.load(weights_only=True). A request is a table with a column `image`
(base64 PNG / TIFF / JPEG bytes) and an optional `pixel_size_nm`; each answer row holds
the probability map and the one-pixel tracing as base64 PNGs plus grain statistics.

`RecognitionModel` serves a recognizer (model.pt + gmm.json, plain values). A request has
`image` and `px_per_um`; each answer row holds the answer, the extrapolation flag and one
probability column per class and "none".

Images are decoded and checked like any image file. Bad input raises
MlflowException(INVALID_PARAMETER_VALUE), which the server answers with HTTP 400 and the
message.

Size limits, read from the environment when the server loads the model:

    GRAINLAB_SERVING_MAX_IMAGE_BYTES   base64 characters per image, checked before decoding
                                       (default 32 MiB)
    GRAINLAB_SERVING_MAX_PIXELS        pixels per image, checked on the image header before
                                       decoding (default: the model's data.max_image_pixels)
    GRAINLAB_SERVING_MAX_ROWS          images per request (default 64)

MLflow's server reads the whole request body before the model sees it; a hard cap on the
body itself belongs in front of it (a reverse proxy), and MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
(60 s by default) bounds a request's time.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from grainlab.errors import GrainlabError
from grainlab.images import DEFAULT_MAX_PIXELS

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
DEFAULT_MAX_IMAGE_BYTES = 32 * 2**20
DEFAULT_MAX_ROWS = 64
MAX_CROPS = 10_000  # ~25 s on a 2-core CPU; more would run into the scoring server's 60 s timeout (a 5xx)


@dataclass(frozen=True)
class Limits:
    """What one request may hold: images per request, base64 characters and pixels per image."""

    max_pixels: int
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_rows: int = DEFAULT_MAX_ROWS


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
    return Limits(
        max_pixels=_env_int(MAX_PIXELS_ENV, default_pixels),
        max_image_bytes=_env_int(MAX_IMAGE_BYTES_ENV, DEFAULT_MAX_IMAGE_BYTES),
        max_rows=_env_int(MAX_ROWS_ENV, DEFAULT_MAX_ROWS),
    )


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


def decode_image(text, row: int, channels: str, limits: Limits) -> np.ndarray:
    """Base64 image bytes -> float image, checked like any image file.

    The base64 text is measured before it is decoded, and the image header before the pixels.
    """
    from grainlab.images import read_image

    if not isinstance(text, str | bytes) or not text:
        raise _bad_input(f"row {row}: 'image' must be a non-empty base64 string of PNG/TIFF/JPEG bytes")
    if len(text) > limits.max_image_bytes:
        raise _bad_input(
            f"row {row}: 'image' is {len(text)} bytes of base64, over the limit of {limits.max_image_bytes} "
            f"({MAX_IMAGE_BYTES_ENV}); send a smaller image"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_input(f"row {row}: 'image' is not valid base64") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"row-{row}"
        path.write_bytes(raw)
        try:
            return read_image(path, channels=channels, max_pixels=limits.max_pixels)
        except GrainlabError as exc:
            message = str(exc).replace(str(path), "image").replace("data.max_image_pixels", MAX_PIXELS_ENV)
            raise _bad_input(f"row {row}: {message}") from None


class BoundaryModel(mlflow.pyfunc.PythonModel):
    """Grain-boundary tracing: image in; probability map, tracing and grain statistics out."""

    def load_context(self, context):
        from grainlab.boundaries.infer import load_model

        self.model = load_model(context.artifacts["checkpoint"])
        cfg = self.model.params.get("boundaries", {})
        self.tile = (cfg.get("tile_px", 256), cfg.get("tile_overlap", 0.25), cfg.get("tile_batch", 8))
        self.post = cfg.get("postprocess", {})
        self.limits = serving_limits(
            self.model.params.get("data", {}).get("max_image_pixels", DEFAULT_MAX_PIXELS)
        )

    def predict(self, context, model_input, params=None):
        from grainlab.boundaries.grains import Postprocess, grain_stats, label_grains, trace_boundaries
        from grainlab.boundaries.infer import predict_probability

        frame = pd.DataFrame(model_input) if isinstance(model_input, dict | list) else model_input
        if not isinstance(frame, pd.DataFrame) or "image" not in frame.columns:
            columns = list(getattr(frame, "columns", []))
            raise _bad_input(f"expected a column 'image' (base64 PNG/TIFF bytes); got columns {columns}")
        check_rows(frame, self.limits)
        post = Postprocess(**self.post)
        channels = "rgb" if self.model.in_channels == 3 else "grey"
        rows = []
        for i, record in enumerate(frame.to_dict("records")):
            image = decode_image(record["image"], i, channels, self.limits)
            pixel = record.get("pixel_size_nm")
            pixel = float(pixel) if pixel is not None and math.isfinite(float(pixel)) and pixel > 0 else None
            prob = predict_probability(self.model, image, *self.tile)
            tracing = trace_boundaries(prob, post)
            stats = grain_stats(tracing, label_grains(tracing, post), pixel)
            rows.append(
                {
                    "probability_png": _png_base64(np.round(prob * 255).astype(np.uint8)),
                    "tracing_png": _png_base64(np.where(tracing, 255, 0).astype(np.uint8)),
                    "grain_count": stats.count,
                    "mean_diameter_px": stats.mean_diameter_px,
                    "heyn_intercept_px": stats.heyn_intercept_px,
                    "astm_g": stats.astm_g if stats.astm_g is not None else float("nan"),
                }
            )
        return pd.DataFrame(rows)


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
        rows = []
        for i, (text, m) in enumerate(zip(frame["image"], frame["px_per_um"], strict=True)):
            img = decode_image(text, i, "grey", self.limits)
            try:
                pred = self.recognizer.predict(img, m, n_crops=n_crops, what=f"row {i}: image")
            except GrainlabError as exc:
                raise _bad_input(f"row {i}: {exc}") from None
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
