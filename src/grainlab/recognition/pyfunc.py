"""The recognizer as an MLflow pyfunc model for the REST server.

Input rows: `image` (base64-encoded PNG/TIFF/JPEG bytes) and `px_per_um`. Output rows: the
answer, the extrapolation flag and one probability column per class and "none". A bad
payload raises MlflowException(INVALID_PARAMETER_VALUE), which the server answers with 400.
"""

from __future__ import annotations

import base64
import binascii
import io

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, UnidentifiedImageError

from grainlab.errors import GrainlabError
from grainlab.images import DEFAULT_MAX_PIXELS

ARTIFACT = "model_dir"
SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "opencv-python-headless",
    "albumentations",
    "pillow",
    "pandas",
    "pyyaml",
    "matplotlib",
)


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(text, row: int) -> np.ndarray:
    """Base64 image bytes -> grey float32 in [0, 1]."""
    if not isinstance(text, str) or not text:
        raise _bad(f"row {row}: image: expected base64-encoded image bytes, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > DEFAULT_MAX_PIXELS:
            raise _bad(
                f"row {row}: image of {im.width}x{im.height} pixels is over the limit of {DEFAULT_MAX_PIXELS}"
            )
        arr = np.asarray(im.convert("I;16") if im.mode.startswith("I") else im.convert("L"))
    except (binascii.Error, ValueError):
        raise _bad(f"row {row}: image: not valid base64") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise _bad(f"row {row}: image: not a readable PNG, TIFF or JPEG image") from None
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return arr.astype(np.float32) / scale


class RecognitionModel(mlflow.pyfunc.PythonModel):
    """Crop-averaged microstructure recognition with "none of these" and the extrapolation flag."""

    def load_context(self, context):
        from grainlab.recognition.predict import Recognizer

        self.recognizer = Recognizer.load(context.artifacts[ARTIFACT])
        self.default_crops = int(self.recognizer.meta["params"]["predict_crops"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        n_crops = int((params or {}).get("n_crops") or self.default_crops)
        if not 1 <= n_crops <= 100_000:
            raise _bad(f"n_crops = {n_crops}: expected 1..100000")
        missing = {"image", "px_per_um"} - set(model_input.columns)
        if missing:
            raise _bad(
                f"input: missing column(s) {sorted(missing)}; expected 'image' (base64) and 'px_per_um'"
            )
        rows = []
        for i, (text, m) in enumerate(zip(model_input["image"], model_input["px_per_um"], strict=True)):
            img = decode_image(text, i)
            try:
                pred = self.recognizer.predict(img, m, n_crops=n_crops, what=f"row {i}: image")
            except GrainlabError as exc:
                raise _bad(f"row {i}: {exc}") from None
            d = pred.as_dict()
            rows.append(
                {
                    "answer": d["answer"],
                    "extrapolating": d["extrapolating"],
                    **{f"p_{k}": v for k, v in d["probabilities"].items()},
                }
            )
        return pd.DataFrame(rows)


def signature(labels: list[str]) -> ModelSignature:
    outputs = [ColSpec("string", "answer"), ColSpec("boolean", "extrapolating")]
    outputs += [ColSpec("double", f"p_{k}") for k in labels]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("double", "px_per_um")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("n_crops", "long", 1000)]),
    )
