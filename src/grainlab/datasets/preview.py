"""Contact sheet of one synthetic region: its tilt series, the tracings and the exact truth."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from grainlab.config import Params  # noqa: E402
from grainlab.datasets.recipes import region_rng  # noqa: E402
from grainlab.images import atomic_path  # noqa: E402
from grainlab.synth import tem  # noqa: E402


def write_tem_preview(params: Params, out_png: Path, n_tilts: int = 6) -> Path:
    """Row 1: the region at n_tilts stage tilts. Row 2: each image's own (per-image) tracing.
    Row 3: the composite tracing, the exact boundary network, the grain map and an overlay."""
    rng = region_rng(params.seed, "preview", 0)
    cfg = params.tem
    region = tem.make_region(cfg, rng)
    grid = params.tilts.grid_alpha_deg
    alphas = [grid[i] for i in np.round(np.linspace(0, len(grid) - 1, n_tilts)).astype(int)]
    shots = [tem.render(region, cfg, a, params.tilts.grid_beta_deg, rng) for a in alphas]
    careful = (
        params.tracers["careful"] if "careful" in params.tracers else next(iter(params.tracers.values()))
    )
    per_image = [
        tem.trace(region, vis, careful, rng, tem.bend_contour_map(region, cfg, a, params.tilts.grid_beta_deg))
        for a, (_, vis) in zip(alphas, shots, strict=True)
    ]
    composite = tem.trace(region, np.logical_or.reduce([vis for _, vis in shots]), careful, rng)

    fov = cfg.image_px * cfg.pixel_nm
    fig, axes = plt.subplots(3, n_tilts, figsize=(2.6 * n_tilts, 8.2))
    for j, (a, (img, vis)) in enumerate(zip(alphas, shots, strict=True)):
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"alpha {a:+.0f} deg", fontsize=9)
        axes[1, j].imshow(per_image[j], cmap="gray")
        axes[1, j].set_title(
            f"per-image tracing ({vis.mean() / max(region.boundaries.mean(), 1e-9):.0%} visible)", fontsize=8
        )
    row3 = [
        (composite, "gray", "composite tracing"),
        (region.boundaries, "gray", "exact boundary network"),
        (region.grains % 20, "tab20", f"grain map ({region.grains.max()} grains)"),
        (region.boundaries & ~shots[0][1], "gray", f"invisible at alpha {alphas[0]:+.0f} deg"),
    ]
    overlay = np.dstack([shots[0][0]] * 3)
    overlay[region.boundaries] = (1.0, 0.2, 0.1)
    row3.append((overlay, None, "truth over image"))
    for j in range(n_tilts):
        ax = axes[2, j]
        if j < len(row3):
            data, cmap, title = row3[j]
            ax.imshow(data, cmap=cmap, interpolation="nearest")
            ax.set_title(title, fontsize=9)
        else:
            ax.axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Synthetic BF TEM tilt series: field of view {fov:.0f} nm, {cfg.pixel_nm:g} nm/px, "
        f"mean grain {cfg.mean_grain_nm:g} nm",
        fontsize=11,
    )
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_png
