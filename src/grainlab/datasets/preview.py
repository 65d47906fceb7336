"""Contact sheet of one synthetic region: its tilt series, the tracings and the exact truth."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from grainlab.config import Params  # noqa: E402
from grainlab.datasets.recipes import max_tilts, region_rng  # noqa: E402
from grainlab.images import atomic_path  # noqa: E402
from grainlab.synth import tem  # noqa: E402


def _visible_fraction_by_tilt(params: Params, alphas) -> dict[str, list[float]]:
    """Share of the boundary network visible at each alpha, for a random and a <111> fibre-textured film."""
    out = {}
    for texture in ("random", "fiber111"):
        cfg = replace(params.tem, texture=texture)
        rng = region_rng(params.seed, f"preview-{texture}", 0)
        region = tem.make_region(cfg, rng, max_tilts(params))
        out[texture] = [
            float(tem.render(region, cfg, a, 0.0, rng).visible[region.boundaries].mean()) for a in alphas
        ]
    return out


def write_tem_preview(params: Params, out_png: Path, n_tilts: int = 6) -> Path:
    """Row 1: the region at n_tilts stage tilts over the full range (foreshortening, drift, rotation), the
    reference-view composite tracing in red over each. Row 2: each image's own (per-image) tracing.
    Row 3: the exact boundary network, the grain map, what the first tilt cannot show, a close-up of
    thickness fringes, and the visible share of boundaries against tilt for random and fibre texture."""
    rng = region_rng(params.seed, "preview", 0)
    cfg = params.tem
    region = tem.make_region(cfg, rng, max_tilts(params))
    top = params.tilts.max_alpha_deg
    alphas = [float(a) for a in np.linspace(-top, top, n_tilts)]
    beta = params.tilts.grid_beta_deg
    shots = [tem.render(region, cfg, a, beta, rng) for a in alphas]
    careful = (
        params.tracers["careful"] if "careful" in params.tracers else next(iter(params.tracers.values()))
    )
    per_image = [
        tem.warp_to_image(
            region,
            shot.affine,
            tem.trace(region, shot.visible, careful, rng, tem.bend_contour_map(region, cfg, a, beta)),
            "mask",
        )
        for a, shot in zip(alphas, shots, strict=True)
    ]
    composite = region.reference(
        tem.trace(region, np.logical_or.reduce([s.visible for s in shots]), careful, rng)
    )

    fov = cfg.image_px * cfg.pixel_nm
    fig, axes = plt.subplots(3, n_tilts, figsize=(2.6 * n_tilts, 8.6))
    for j, (a, shot) in enumerate(zip(alphas, shots, strict=True)):
        overlay = np.dstack([shot.image] * 3)
        overlay[composite > 0] = (1.0, 0.15, 0.1)
        axes[0, j].imshow(overlay, vmin=0, vmax=1)
        m = shot.affine
        centre = np.full(2, (cfg.image_px - 1) / 2)
        drift = m[:, 2] - (centre - m[:, :2] @ centre)
        turn = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
        axes[0, j].set_title(
            f"alpha {a:+.0f}: y x {m[1, 1]:.3f}, turn {turn:+.2f} deg\ndrift ({drift[0]:+.1f}, {drift[1]:+.1f}) px",
            fontsize=8,
        )
        _, boundaries, visible = tem.image_truth(region, m, shot.visible)
        axes[1, j].imshow(per_image[j], cmap="gray")
        axes[1, j].set_title(
            f"per-image tracing ({visible.sum() / max(boundaries.sum(), 1):.0%} visible)", fontsize=8
        )
    # Close-up of the fringes: the noise-free image near the boundary with the strongest fringes.
    contrast = tem._diffraction(region, cfg, 0.0, 0.0)
    model = tem.boundary_fringe_model(region, cfg, 0.0, 0.0, contrast)
    best = int(np.argmax(model.amplitude * (model.width >= 8) * (model.count >= 2)))
    ys, xs = np.divmod(region.boundary_index[region.boundary_pair == best], region.grains.shape[1])
    cy, cx = int(np.median(ys)), int(np.median(xs))
    half = 12
    clean = (tem.BRIGHTNESS * contrast.brightness).ravel()
    clean[region.fringe_index] -= tem._boundary_fringes(region, cfg, 0.0, 0.0, contrast)
    clean = clean.reshape(region.grains.shape)
    y0, x0 = max(cy - half, 0), max(cx - half, 0)
    fringe_crop = clean[y0 : y0 + 2 * half, x0 : x0 + 2 * half]

    grid = [-top + k for k in range(0, int(2 * top) + 1, 2)]
    fractions = _visible_fraction_by_tilt(params, grid)
    row3 = [
        (region.reference(region.boundaries), "gray", "exact network (reference view)"),
        (region.reference(region.grains) % 20, "tab20", f"grain map ({region.n_grains} grains)"),
        (
            tem.image_truth(region, shots[0].affine)[1]
            & ~tem.image_truth(region, shots[0].affine, shots[0].visible)[2],
            "gray",
            f"invisible at alpha {alphas[0]:+.0f} deg",
        ),
        (
            fringe_crop,
            "gray",
            f"{model.count[best]:.1f} thickness fringes (no noise)",
        ),
    ]
    for j in range(n_tilts):
        ax = axes[2, j]
        if j < len(row3):
            data, cmap, title = row3[j]
            ax.imshow(data, cmap=cmap, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        elif j == len(row3):
            for texture, values in fractions.items():
                ax.plot(grid, values, label=texture)
            ax.set_xlabel("alpha (deg)", fontsize=7)
            ax.set_title("visible share vs tilt (one region)", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6)
        else:  # close-up of the last exposure: the composite tracing (red) against the image's truth (green)
            _, truth, _ = tem.image_truth(region, shots[-1].affine)
            zoom = np.dstack([shots[-1].image] * 3)
            zoom[truth] = (0.1, 0.9, 0.2)
            zoom[composite > 0] = (1.0, 0.15, 0.1)
            ax.imshow(zoom[-80:, -80:], interpolation="nearest")
            ax.set_title(f"alpha {alphas[-1]:+.0f}: composite (red) vs truth (green)", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in axes[:2].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Synthetic BF TEM tilt series: field of view {fov:.0f} nm, {cfg.pixel_nm:g} nm/px, "
        f"mean grain {cfg.mean_grain_nm:g} nm, {cfg.texture} texture; red: composite tracing (reference view)",
        fontsize=10,
    )
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_png
