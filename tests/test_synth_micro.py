"""The steel micrograph generator: determinism, physical scale, band-limiting, geometry and imaging."""

import cv2
import numpy as np
import pytest

from grainlab.config import MicroConfig
from grainlab.datasets.microstructures import plan_library
from grainlab.synth import micro


def canvas(m: float, n: int = 128, seed: int = 1, salt: int = 7) -> micro.Canvas:
    xs = (np.arange(n, dtype=np.float32) + 0.5) / m
    x, y = np.meshgrid(xs, xs)
    return micro.Canvas(x, y, m, np.random.default_rng(seed), salt)


def orientation(img: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """The structure tensor of img as a complex number of the doubled stripe angle (its argument is twice
    the orientation of the local gradient): raw, or smoothed over `sigma` px and normalised."""
    gx = cv2.Sobel(img.astype(np.float32), cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(img.astype(np.float32), cv2.CV_32F, 0, 1)
    if not sigma:
        return (gx * gx - gy * gy) + 2j * gx * gy
    z = cv2.GaussianBlur(gx * gx - gy * gy, (0, 0), sigma) + 2j * cv2.GaussianBlur(gx * gy, (0, 0), sigma)
    return z / (np.abs(z) + 1e-12)


def degrees_apart(a: complex, b: complex) -> float:
    """The angle between two stripe orientations given as doubled-angle complex numbers."""
    return abs(np.degrees(np.angle(a / b))) / 2


@pytest.mark.parametrize("cls", micro.CLASSES)
def test_every_class_renders_grey_float_image_deterministically(cls):
    img = micro.render(cls, (48, 64), 20.0, "sem", np.random.default_rng(0))
    assert img.shape == (48, 64) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0
    again = micro.render(cls, (48, 64), 20.0, "sem", np.random.default_rng(0))
    assert again.tobytes() == img.tobytes()


def test_render_is_deterministic_per_generator_seed():
    for style, m in (("optical", 8.0), ("sem", 30.0)):
        a = micro.render("pearlite", (64, 64), m, style, np.random.default_rng(5))
        b = micro.render("pearlite", (64, 64), m, style, np.random.default_rng(5))
        c = micro.render("pearlite", (64, 64), m, style, np.random.default_rng(6))
        assert a.tobytes() == b.tobytes() and not np.array_equal(a, c)


def test_lamellae_below_the_pixel_fade_to_their_mean():
    u = np.linspace(0, 40, 4000, dtype=np.float32)
    resolved = micro._lamellae(u, 0.3, 0.2, px_per_um=100.0)
    blurred = micro._lamellae(u, 0.3, 0.2, px_per_um=1.0)
    assert resolved.max() - resolved.min() > 0.9
    assert blurred.max() - blurred.min() < 1e-3 and abs(blurred.mean() - 0.2) < 1e-3


def test_fine_carbides_blur_into_grey_at_low_magnification():
    coarse = micro._particles(canvas(1.0), 0.3, 0.1)
    fine = micro._particles(canvas(100.0), 0.3, 0.1)
    assert coarse.std() < 0.1 < fine.std()
    assert abs(coarse.mean() - fine.mean()) < 0.05


def test_physical_scale_grain_count_follows_magnification():
    # The same grain size gives ~4x more boundary pixels per pixel at half the magnification.
    lo = micro.render("ferrite", (128, 128), 2.0, "sem", np.random.default_rng(3))
    hi = micro.render("ferrite", (128, 128), 50.0, "sem", np.random.default_rng(3))
    assert np.abs(np.diff(lo, axis=1)).mean() > np.abs(np.diff(hi, axis=1)).mean()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="class"):
        micro.render("cheese", (8, 8), 1.0, "sem", np.random.default_rng(0))
    with pytest.raises(ValueError, match="px_per_um"):
        micro.render("ferrite", (8, 8), 0.0, "sem", np.random.default_rng(0))
    with pytest.raises(ValueError, match="style"):
        micro.render("ferrite", (8, 8), 1.0, "xray", np.random.default_rng(0))
    with pytest.raises(ValueError, match="optical.*at most 10"):
        micro.render("ferrite", (8, 8), 30.0, "optical", np.random.default_rng(0))


def test_ferrite_pearlite_is_a_mixture_of_bright_ferrite_and_dark_pearlite():
    xs = (np.arange(256, dtype=np.float32) + 0.5) / 4.0
    x, y = np.meshgrid(xs, xs)
    for seed in range(3):  # phase 1 = bright ferrite; pearlite islands are darker on average
        phase = micro.ferrite_pearlite(micro.Canvas(x, y, 4.0, np.random.default_rng(seed), seed))
        assert np.mean(phase > 0.78) > 0.2 and np.mean(phase < 0.7) > 0.1


def test_an_isolated_carbide_reaches_full_contrast():
    c = canvas(20.0, 64)
    cover = micro._discs(c, np.array([1.6]), np.array([1.6]), 0.4)  # 8 px radius at the centre
    assert cover.max() > 0.99 and cover[0, 0] < 0.01
    pair = micro._discs(c, np.array([1.3, 1.9]), np.array([1.6, 1.6]), 0.4)  # overlapping: saturates
    assert pair.max() <= 1.0 and pair[32, 32] > 0.99
    phase = micro.spheroidite(canvas(20.0, 128, seed=2))  # carbides of 0.25-0.7 um: resolved
    assert phase.min() < 0.13  # the carbide shade 0.12 is reached


def test_no_optical_image_beyond_the_optical_limit_in_a_planned_library():
    for seed in (0, 1):
        entries = plan_library(MicroConfig(), seed)
        optical = [e["px_per_um"] for e in entries if e["style"] == "optical"]
        assert optical and max(optical) <= micro.OPTICAL_MAX_PX_PER_UM
        assert any(e["px_per_um"] > micro.OPTICAL_MAX_PX_PER_UM for e in entries if e["style"] == "sem")


def test_optical_blur_grows_in_proportion_to_the_magnification():
    # sigma = 0.344 x 0.25 um resolution, in pixels: proportional to px/um
    assert micro.optical_psf_sigma_px(10.0) == pytest.approx(0.86, abs=0.01)
    step = np.zeros((64, 32), np.float32)
    step[:, 16:] = 1.0  # a sharp phase edge between columns 15 and 16

    def optical(phase, m):  # the same illumination and noise draws for every phase
        return micro._style(phase, "optical", m, np.random.default_rng(0))

    widths = {}
    for m in (5.0, 10.0):
        dark, bright = optical(0 * step, m), optical(1 + 0 * step, m)
        edge = (optical(step, m) - dark) / (bright - dark)  # the blurred step, illumination divided out
        g = np.diff(edge.mean(axis=0))[11:20]  # centred on the edge
        x = np.arange(g.size) - 4
        widths[m] = np.sqrt((g * x**2).sum() / g.sum())
        assert widths[m] == pytest.approx(micro.optical_psf_sigma_px(m), abs=0.1)
    assert widths[10.0] > 1.8 * widths[5.0]


def test_grain_boundaries_are_curved():
    cells = micro._cells(canvas(2.0, 192), 40.0, 10)  # 80 px grains, relaxed
    ids = cells.id
    edges: dict[tuple, list] = {}
    for a, b, (yy, xx) in (
        (ids[:, :-1], ids[:, 1:], np.nonzero(ids[:, :-1] != ids[:, 1:])),
        (ids[:-1], ids[1:], np.nonzero(ids[:-1] != ids[1:])),
    ):
        for y, x in zip(yy, xx, strict=True):
            edges.setdefault(tuple(sorted((a[y, x], b[y, x]))), []).append((x, y))
    deviations = []
    for pts in edges.values():
        if len(pts) >= 40:  # distance from the chord's best-fit line (px)
            p = np.array(pts, float) - np.mean(pts, axis=0)
            deviations.append(np.abs(p @ np.linalg.svd(p, full_matrices=False)[2][1]).max())
    assert len(deviations) >= 5
    assert np.median(deviations) > 1.2  # straight Voronoi edges: 0.55 px


def test_pearlite_lamellae_bend_within_a_colony():
    c = canvas(12.0, 256, seed=4)  # a 21 um field over 12 um colonies
    cells = micro._cells(c, 12.0, 11)
    z = orientation(micro._pearlite_phase(c, cells, 12.0, 0.4, 0.25), sigma=6.0)
    spreads = []
    for cid in np.unique(cells.id):
        inside = (cells.id == cid) & (cells.edge_um > 1.0)
        if inside.sum() > 3000:  # degrees between the colony's mean orientation and its lamellae
            mean = z[inside].mean()
            spreads.append(np.percentile([degrees_apart(v, mean) for v in z[inside][::7]], 90))
    assert len(spreads) >= 2 and max(spreads) > 6.0  # straight lamellae: 1.5 degrees


def test_martensite_has_a_block_and_packet_hierarchy():
    c = canvas(30.0, 256, seed=4)
    laths = micro._laths(c, 0.25, 1.0, 4.0)
    z = orientation(micro.martensite_variant(c, 0.25, 1.0, 4.0, 0.5, 0.0, 0.0, "lath"))
    interior = (laths.block_edge_um > 0.15) & (laths.packets.edge_um > 0.3) & (laths.pag.edge_um > 0.5)
    blocks: dict[int, dict[int, complex]] = {}  # the lath orientation of each block, per packet
    for packet in np.unique(laths.packet):
        for block in np.unique(laths.block[laths.packet == packet]):
            inside = (laths.packet == packet) & (laths.block == block) & interior
            if inside.sum() > 300:
                blocks.setdefault(int(packet), {})[int(block)] = z[inside].sum()
    within = [
        degrees_apart(a, b) for bs in blocks.values() for a in bs.values() for b in bs.values() if a != b
    ]
    packets = [sum(bs.values()) for bs in blocks.values()]
    between = [degrees_apart(a, b) for i, a in enumerate(packets) for b in packets[i + 1 :]]
    assert len(within) >= 10 and len(between) >= 6
    assert 1.5 < np.median(within) < 8.0  # blocks of a packet: a few degrees apart (0.5 if all parallel)
    assert np.median(between) > 20.0  # packets: habit-plane traces 45 or 90 degrees apart


def test_quiz2_variants_overlap_yet_differ_in_distribution():
    rng = np.random.default_rng(0)
    recipes = {name: [micro.variant_recipe(name, rng) for _ in range(400)] for name in micro.VARIANTS}
    for lower, higher, key in (
        ("aq-fine", "temper-200", "lath_um"),
        ("temper-400", "temper-600", "lath_um"),
        ("temper-600", "temper-700", "lath_um"),
        ("temper-200", "temper-400", "contrast"),
        ("temper-400", "temper-600", "contrast"),
    ):
        a = np.array([r[key] for r in recipes[lower]])
        b = np.array([r[key] for r in recipes[higher]])
        if key == "contrast":  # contrast falls with tempering
            a, b = b, a
        swapped = np.mean(a[:, None] > b[None, :])  # P(the variant with the smaller median draws larger)
        assert 0.02 < swapped < 0.4, (lower, higher, key, swapped)
