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
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import tempfile
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


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _png_base64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text, row: int, channels: str, max_pixels: int) -> np.ndarray:
    """Base64 image bytes -> float image, checked like any image file."""
    from grainlab.images import read_image

    if not isinstance(text, str | bytes) or not text:
        raise _bad_input(f"row {row}: 'image' must be a non-empty base64 string of PNG/TIFF/JPEG bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_input(f"row {row}: 'image' is not valid base64") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"row-{row}"
        path.write_bytes(raw)
        try:
            return read_image(path, channels=channels, max_pixels=max_pixels)
        except GrainlabError as exc:
            raise _bad_input(f"row {row}: {str(exc).replace(str(path), 'image')}") from None


class BoundaryModel(mlflow.pyfunc.PythonModel):
    """Grain-boundary tracing: image in; probability map, tracing and grain statistics out."""

    def load_context(self, context):
        from grainlab.boundaries.infer import load_model

        self.model = load_model(context.artifacts["checkpoint"])
        cfg = self.model.params.get("boundaries", {})
        self.tile = (cfg.get("tile_px", 256), cfg.get("tile_overlap", 0.25), cfg.get("tile_batch", 8))
        self.post = cfg.get("postprocess", {})
        self.max_pixels = self.model.params.get("data", {}).get("max_image_pixels", 100_000_000)

    def predict(self, context, model_input, params=None):
        from grainlab.boundaries.grains import Postprocess, grain_stats, label_grains, trace_boundaries
        from grainlab.boundaries.infer import predict_probability

        frame = pd.DataFrame(model_input) if isinstance(model_input, dict | list) else model_input
        if not isinstance(frame, pd.DataFrame) or "image" not in frame.columns:
            columns = list(getattr(frame, "columns", []))
            raise _bad_input(f"expected a column 'image' (base64 PNG/TIFF bytes); got columns {columns}")
        post = Postprocess(**self.post)
        channels = "rgb" if self.model.in_channels == 3 else "grey"
        rows = []
        for i, record in enumerate(frame.to_dict("records")):
            image = decode_image(record["image"], i, channels, self.max_pixels)
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

    def predict(self, context, model_input, params=None):
        frame = pd.DataFrame(model_input) if isinstance(model_input, dict | list) else model_input
        n_crops = int((params or {}).get("n_crops") or self.default_crops)
        if not 1 <= n_crops <= 100_000:
            raise _bad_input(f"n_crops = {n_crops}: expected 1..100000")
        missing = {"image", "px_per_um"} - set(getattr(frame, "columns", []))
        if missing:
            raise _bad_input(
                f"input: missing column(s) {sorted(missing)}; expected 'image' (base64) and 'px_per_um'"
            )
        rows = []
        for i, (text, m) in enumerate(zip(frame["image"], frame["px_per_um"], strict=True)):
            img = decode_image(text, i, "grey", DEFAULT_MAX_PIXELS)
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
