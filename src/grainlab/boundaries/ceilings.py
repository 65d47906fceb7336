"""What a perfect tracer could score on the test set against the full truth (the whole boundary
network), when it traces only what the data shows:

- visible-only: each image's boundaries visible at its tilt, exactly (the best per-image tracing);
- composite: every boundary seen in the region's tilt series, drawn in the reference view as a
  composite tracing is, and used as is in each image's frame (so it misaligns with tilted and
  drifted exposures, as a real composite tracing does).

The grains of both come from the tracing by the normal post-processing (`label_grains`).
"""

from __future__ import annotations

import numpy as np

from grainlab.boundaries.evaluate import Tracing, postprocess_settings, score_result, summarise
from grainlab.boundaries.grains import label_grains
from grainlab.config import BoundaryConfig
from grainlab.datasets.folder import TestItem
from grainlab.images import parallel_map, read_mask

CEILINGS = {  # name: (the TestItem field holding its tracing, what it is)
    "visible-only": ("visible", "perfect visible-only tracer"),
    "composite": ("composite", "perfect composite tracer"),
}


def ceilings(items: list[TestItem], cfg: BoundaryConfig) -> dict[str, dict[str, float]]:
    """Mean scores (`score_result` rows) of each ceiling over the test items that have its tracing;
    a ceiling no item has one for is left out."""
    post = postprocess_settings(cfg)

    def score(item: TestItem, field: str) -> dict:
        tracing = read_mask(getattr(item, field))
        result = Tracing(tracing.astype(np.float32), tracing, label_grains(tracing, post))
        return score_result(item, result, cfg.tolerance_px)

    out = {}
    for name, (field, _) in CEILINGS.items():
        have = [item for item in items if getattr(item, field) is not None]
        if have:
            out[name] = summarise(parallel_map(lambda item, f=field: score(item, f), have))
    return out
