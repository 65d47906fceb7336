"""Steel-like micrographs rendered at physical scale, deterministic from a numpy Generator.

Every class is a recipe of physical feature sizes in micrometres (grain size, lamella
spacing, lath width, carbide radius, ...). Features are evaluated at the pixel centres as
functions of physical coordinates, so the same recipe can be drawn at any magnification
(px/um). Detail finer than a pixel is band-limited analytically: periodic and random
textures are multiplied by the transfer function of a Gaussian point-spread function,
lines are widened by it and carbides are splatted and convolved with the transform of a
disc. At low magnification fine features therefore fade into grey instead of aliasing.

Cells (grains, colonies, packets) come from a hashed jittered grid (Worley noise) on
domain-warped coordinates, so their boundaries are curved and no seed list depends on the
field of view; where cells span enough pixels they are then relaxed by curvature flow
(tem.relax), which turns triple junctions toward 120 degrees. The Generator draws the
image's recipe, a hash salt and the imaging artefacts.

Imaging follows the magnification: optical micrographs only up to OPTICAL_MAX_PX_PER_UM,
blurred by the optical point-spread function (its sigma in pixels grows with px/um), SEM
above that and wherever a plan asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from scipy.signal import lfilter
from scipy.special import j1

from grainlab.synth.tem import relax

KNOWN = ("ferrite", "pearlite", "ferrite-pearlite", "martensite", "spheroidite")
UNKNOWN = ("bainite", "cast-dendrites", "twinned-austenite")
STYLES = ("optical", "sem")
AA_SIGMA_PX = 0.8  # Gaussian PSF (pixels) used to band-limit sub-pixel detail
OPTICAL_MAX_PX_PER_UM = 10.0  # beyond this an optical image only magnifies blur: SEM takes over
OPTICAL_RESOLUTION_UM = 0.25  # Rayleigh resolution of a good dry objective (0.61 lambda / NA)
CELL_WARP = 0.1  # domain warp of cell seeds' coordinates, in cell sizes (curved boundaries)
CELL_RELAX_MIN_PX = 16.0  # cells smaller than this (px) keep their warped Worley edges
CELL_RELAX_PX = 24.0  # larger cells relax on a coarser grid where they span about this many pixels
CELL_RELAX = (0.1, 2)  # curvature relaxation of cells: kernel sigma / cell size, steps
BLOCK_TILT = np.radians(8.0)  # spread of the lath trace between blocks of one martensite packet
VARIANT_SPREAD = 0.2  # quiz-2: log-normal spread of a variant's sizes from image to image

# The magnifications (px/um) at which each class is imaged: a metallographer frames a
# structure so that its features are resolved and a few of them fit in the field (384 px).
# Coarse structures (ferrite grains, dendrites) are never shot at 200 px/um, where one
# grain interior fills the field and is a featureless grey.
MAG_RANGE = {
    "ferrite": (1.0, 12.0),
    "pearlite": (1.0, 250.0),
    "ferrite-pearlite": (1.0, 25.0),
    "martensite": (3.0, 250.0),
    "spheroidite": (2.0, 50.0),
    "bainite": (3.0, 250.0),
    "cast-dendrites": (1.0, 8.0),
    "twinned-austenite": (1.0, 15.0),
}

# Quiz-2: martensitic variants (lath width um, packet um, lath contrast, carbide radius um,
# carbide volume fraction, carbide site: 'lath' (inside laths) or 'boundary'): the median
# recipe; each image draws its own around it (variant_recipe), so neighbours overlap.
VARIANTS = {
    "aq-fine": (0.15, 3.0, 0.55, 0.0, 0.0, "lath"),
    "aq-coarse": (0.45, 8.0, 0.55, 0.0, 0.0, "lath"),
    "temper-200": (0.2, 4.0, 0.4, 0.025, 0.04, "lath"),
    "temper-400": (0.25, 5.0, 0.3, 0.05, 0.05, "boundary"),
    "temper-600": (0.35, 6.0, 0.15, 0.09, 0.07, "boundary"),
    "temper-700": (0.5, 6.0, 0.05, 0.18, 0.10, "lath"),
}


@dataclass(frozen=True)
class Canvas:
    """The pixel centres of one image in micrometres, its magnification and its randomness."""

    x: np.ndarray
    y: np.ndarray
    px_per_um: float
    rng: np.random.Generator
    salt: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape


@dataclass(frozen=True)
class Cells:
    """A Voronoi tessellation sampled at the pixels: cell id and distance to the cell edge (um)."""

    id: np.ndarray
    edge_um: np.ndarray


# --------------------------------------------------------------------------- primitives


def _hash(*keys) -> np.ndarray:
    """A uint32 hash of integer arrays (broadcast together)."""
    arrays = np.broadcast_arrays(*[np.asarray(k) for k in keys])
    h = np.full(arrays[0].shape, 0x9E3779B9, dtype=np.uint32)
    for k in arrays:
        h = (h ^ k.astype(np.int64).astype(np.uint32)) * np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def _unit(*keys) -> np.ndarray:
    """Uniform floats in [0, 1) hashed from integer keys."""
    return (_hash(*keys) >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _mtf(period_um, px_per_um: float):
    """Contrast left of a sinusoid of this period after the anti-aliasing PSF."""
    f = 1.0 / (np.asarray(period_um, dtype=np.float32) * px_per_um)
    return np.exp(-2.0 * np.pi**2 * AA_SIGMA_PX**2 * f**2)


def _line(dist_um: np.ndarray, sigma_um: float, px_per_um: float) -> np.ndarray:
    """A dark line of Gaussian profile widened by the PSF, keeping its integrated darkness."""
    eff = np.sqrt(sigma_um**2 + (AA_SIGMA_PX / px_per_um) ** 2)
    return (sigma_um / eff) * np.exp(-0.5 * (dist_um / eff) ** 2)


def _cells(c: Canvas, size_um: float, key: int, relaxed: bool = True) -> Cells:
    """Worley cells of mean size `size_um` with curved edges (_worley), relaxed by curvature flow where
    they are resolved. Large cells relax on every k-th pixel (cells of about CELL_RELAX_PX there, the
    cost of a step grows with the cell size in pixels), then one fine step smooths the upsampled edges."""
    size_px = size_um * c.px_per_um
    if not relaxed or size_px < CELL_RELAX_MIN_PX:
        return _worley(c, size_um, key)
    k = max(1, int(size_px // CELL_RELAX_PX))
    coarse = Canvas(c.x[::k, ::k], c.y[::k, ::k], c.px_per_um / k, c.rng, c.salt)
    ids, labels = np.unique(_worley(coarse, size_um, key).id, return_inverse=True)
    sigma, steps = CELL_RELAX
    labels = relax(labels.reshape(coarse.shape).astype(np.int32) + 1, sigma * size_px / k, steps)
    if k > 1:
        labels = np.repeat(np.repeat(labels, k, axis=0), k, axis=1)[: c.shape[0], : c.shape[1]]
        labels = relax(np.ascontiguousarray(labels), k / 2, 1)
    return Cells(id=ids[labels - 1], edge_um=_edge_distance_px(labels) / c.px_per_um)


def _worley(c: Canvas, size_um: float, key: int, jitter: float = 0.85) -> Cells:
    """Worley cells: the nearest of the jittered seeds in the 3x3 neighbourhood, at domain-warped
    coordinates (curved edges); the edge distance is that of the warped plane."""
    warp = CELL_WARP * size_um
    gx = (c.x + warp * _noise(c, size_um, key + 1000)) / size_um
    gy = (c.y + warp * _noise(c, size_um, key + 2000)) / size_um
    cx, cy = np.floor(gx).astype(np.int32), np.floor(gy).astype(np.int32)
    d1 = np.full(c.shape, np.inf, np.float32)
    d2 = d1.copy()
    s1x, s1y, s2x, s2y = (np.zeros(c.shape, np.float32) for _ in range(4))
    id1 = np.zeros(c.shape, np.uint32)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            nx, ny = cx + dx, cy + dy
            h = _hash(nx, ny, c.salt, key)
            sx = nx + 0.5 + jitter * ((h & np.uint32(0xFFFF)).astype(np.float32) / 65536 - 0.5)
            sy = ny + 0.5 + jitter * ((h >> np.uint32(16)).astype(np.float32) / 65536 - 0.5)
            d = (gx - sx) ** 2 + (gy - sy) ** 2
            first = d < d1
            second = ~first & (d < d2)
            d2 = np.where(first, d1, np.where(second, d, d2))
            s2x = np.where(first, s1x, np.where(second, sx, s2x))
            s2y = np.where(first, s1y, np.where(second, sy, s2y))
            d1 = np.where(first, d, d1)
            s1x, s1y = np.where(first, sx, s1x), np.where(first, sy, s1y)
            id1 = np.where(first, h, id1)
    sep = np.sqrt((s2x - s1x) ** 2 + (s2y - s1y) ** 2) + 1e-6
    return Cells(id=id1, edge_um=(d2 - d1) / (2 * sep) * size_um)


def _edge_distance_px(labels: np.ndarray) -> np.ndarray:
    """Distance (px) from each pixel centre to the nearest edge between labels (edges lie between pixels)."""
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        step = np.diff(labels, axis=axis) != 0
        lead = [slice(None), slice(None)]
        lead[axis] = slice(1, None)
        edge[tuple(lead)] |= step
        lead[axis] = slice(None, -1)
        edge[tuple(lead)] |= step
    return (ndimage.distance_transform_edt(~edge) + 0.5).astype(np.float32)


def _noise(c: Canvas, scale_um: float, key: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] with features of about `scale_um`."""
    gx, gy = c.x / scale_um, c.y / scale_um
    ix, iy = np.floor(gx).astype(np.int32), np.floor(gy).astype(np.int32)
    fx, fy = gx - ix, gy - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    v = [_unit(ix + a, iy + b, c.salt, key) for a in (0, 1) for b in (0, 1)]
    top = v[0] * (1 - fy) + v[1] * fy
    bottom = v[2] * (1 - fy) + v[3] * fy
    return 2 * (top * (1 - fx) + bottom * fx) - 1


def _lamellae(u: np.ndarray, spacing_um, plate_frac: float, px_per_um: float) -> np.ndarray:
    """Fraction of dark plate at phase u (in periods), as a band-limited 4-harmonic series."""
    out = np.full(u.shape, plate_frac, np.float32)
    for k in range(1, 5):
        a = 2 * np.sin(np.pi * k * plate_frac) / (np.pi * k)
        out += a * _mtf(spacing_um / k, px_per_um) * np.cos(2 * np.pi * k * u)
    return np.clip(out, 0.0, 1.0)


def _project(c: Canvas, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (um) across and along a direction given per pixel."""
    cos, sin = np.cos(angle), np.sin(angle)
    return c.x * cos + c.y * sin, -c.x * sin + c.y * cos


def _particles(c: Canvas, radius_um: float, vol_frac: float, keep: np.ndarray | None = None) -> np.ndarray:
    """Area coverage (0..1) of randomly placed discs (volume fraction `vol_frac`), see _discs.

    `keep` optionally gives, per pixel, a particle's probability to stay there (preferred sites)."""
    h, w = c.shape
    m = c.px_per_um
    pad_um = min(radius_um + 4 / m, max(h, w) / (2 * m))
    x0, y0 = c.x[0, 0] - 0.5 / m - pad_um, c.y[0, 0] - 0.5 / m - pad_um
    wu, hu = w / m + 2 * pad_um, h / m + 2 * pad_um
    n = c.rng.poisson(vol_frac / (np.pi * radius_um**2) * wu * hu)
    xs, ys = x0 + c.rng.uniform(0, wu, n), y0 + c.rng.uniform(0, hu, n)
    if keep is not None and n:
        col = np.clip(((xs - c.x[0, 0]) * m + 0.5).astype(np.int64), 0, w - 1)
        row = np.clip(((ys - c.y[0, 0]) * m + 0.5).astype(np.int64), 0, h - 1)
        stay = c.rng.uniform(size=n) < keep[row, col]
        xs, ys = xs[stay], ys[stay]
    return _discs(c, xs, ys, radius_um)


def _discs(c: Canvas, xs_um: np.ndarray, ys_um: np.ndarray, radius_um: float) -> np.ndarray:
    """Area coverage (0..1) of discs centred at (xs_um, ys_um): splatted and convolved in Fourier space
    with the transform of a disc and the anti-aliasing PSF. A resolved disc is fully covered (1);
    overlapping discs saturate at 1."""
    h, w = c.shape
    m = c.px_per_um
    r_px = radius_um * m
    pad = int(min(r_px + 4, max(h, w) / 2))
    hp, wp = h + 2 * pad, w + 2 * pad
    px = (np.asarray(xs_um) - c.x[0, 0]) * m + pad  # pixel centres at integer positions
    py = (np.asarray(ys_um) - c.y[0, 0]) * m + pad
    ix, iy = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - ix, py - iy
    density = np.zeros(hp * wp)
    for dx, dy, wt in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        idx = ((iy + dy) % hp) * wp + (ix + dx) % wp
        density += np.bincount(idx, weights=wt, minlength=density.size)
    density = density.reshape(hp, wp)
    fyy = np.fft.fftfreq(hp)[:, None]
    fxx = np.fft.rfftfreq(wp)[None, :]
    f = np.sqrt(fxx**2 + fyy**2)
    arg = 2 * np.pi * f * r_px
    disc = np.pi * r_px**2 * np.where(arg > 1e-6, 2 * j1(arg) / np.maximum(arg, 1e-6), 1.0)
    kernel = disc * np.exp(-2 * np.pi**2 * AA_SIGMA_PX**2 * f**2)
    cover = np.fft.irfft2(np.fft.rfft2(density) * kernel, s=(hp, wp))[pad : pad + h, pad : pad + w]
    return np.clip(cover, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- classes
# Each returns a 'phase' image in [0, 1]: 1 is bright ferrite matrix in optical contrast,
# 0 is the darkest etched constituent (carbide, boundary).


def _ferrite_phase(c: Canvas, cells: Cells, boundary_um: float) -> np.ndarray:
    shade = 0.93 - 0.14 * _unit(cells.id, 1)
    return shade - 0.75 * _line(cells.edge_um, boundary_um, c.px_per_um)


def _pearlite_phase(c: Canvas, cells: Cells, colony_um: float, spacing_um: float, plate: float) -> np.ndarray:
    """Colonies of lamellae that bend (a smooth phase warp turning them by tens of degrees across a
    colony) and are faulted (half-period shifts across curved lines, where lamellae terminate)."""
    angle = 2 * np.pi * _unit(cells.id, 2)
    stretch = 1 + 1.5 * _unit(cells.id, 3)  # lamellae cut obliquely look wider apart
    amp = 0.55 + 0.45 * _unit(cells.id, 4)
    across, _ = _project(c, angle)
    local = spacing_um * stretch
    bend = c.rng.uniform(0.15, 0.4) * colony_um / local  # phase warp (periods) over a colony
    fault = np.where(_noise(c, colony_um / 3, 17) > 0.4, 0.5, 0.0)
    u = across / local + bend * _noise(c, colony_um, 5) + fault
    dark = _lamellae(u, local, plate, c.px_per_um)
    return 0.8 - 0.15 * _unit(cells.id, 6) - 0.85 * amp * dark


def ferrite(c: Canvas) -> np.ndarray:
    """Annealed low-carbon ferrite: coarse equiaxed grains with curved, relaxed boundaries."""
    cells = _cells(c, c.rng.uniform(15, 40), 10)
    return _ferrite_phase(c, cells, c.rng.uniform(0.15, 0.35))


def pearlite(c: Canvas) -> np.ndarray:
    colony_um = c.rng.uniform(8, 20)
    cells = _cells(c, colony_um, 11)
    phase = _pearlite_phase(c, cells, colony_um, c.rng.uniform(0.2, 0.5), c.rng.uniform(0.15, 0.3))
    return phase - 0.3 * _line(cells.edge_um, 0.3, c.px_per_um)


def ferrite_pearlite(c: Canvas) -> np.ndarray:
    """Hypoeutectoid steel: finer ferrite grains with pearlite islands (a second, finer tessellation)."""
    grain_um = c.rng.uniform(6, 15)
    grains = _cells(c, grain_um, 12)
    island_um = grain_um * c.rng.uniform(0.5, 0.8)
    islands = _cells(c, island_um, 18)
    is_pearlite = _unit(islands.id, 7) < c.rng.uniform(0.25, 0.6)
    pearl = _pearlite_phase(c, islands, island_um, c.rng.uniform(0.2, 0.5), c.rng.uniform(0.15, 0.3))
    ferr = _ferrite_phase(c, grains, c.rng.uniform(0.15, 0.35))
    return np.where(is_pearlite, pearl - 0.3 * _line(islands.edge_um, 0.3, c.px_per_um), ferr)


@dataclass(frozen=True)
class Laths:
    """Lath martensite's hierarchy at the pixels: prior-austenite grains > packets (one habit plane,
    parallel lath traces) > blocks (bands of one variant along the laths) > laths."""

    pag: Cells
    packets: Cells
    packet: np.ndarray  # packet id (a packet cell cut by the prior-austenite grains)
    block: np.ndarray  # block index within the packet
    block_edge_um: np.ndarray
    angle: np.ndarray  # lath trace direction (rad)
    u: np.ndarray  # coordinate across the laths, in lath widths
    along: np.ndarray  # coordinate along the laths (um)


def _laths(c: Canvas, lath_um: float, block_um: float, packet_um: float) -> Laths:
    """Each prior-austenite grain holds packets of 4 habit-plane traces 45 degrees apart; the blocks of a
    packet are bands along its laths whose traces differ by a few degrees (BLOCK_TILT)."""
    pag = _cells(c, packet_um * 3.5, 13)
    packets = _cells(c, packet_um, 14)
    packet = _hash(packets.id, pag.id)
    habit = np.pi * _unit(pag.id, 8) + np.pi / 4 * np.floor(4 * _unit(packet, 9))
    fb = _project(c, habit)[0] / block_um + _unit(packet, 10)
    block = np.floor(fb).astype(np.int32)
    angle = habit + BLOCK_TILT * (_unit(packet, block, 11) - 0.5)
    across, along = _project(c, angle)
    u = across / lath_um + 0.6 * _noise(c, 2 * packet_um, 9)
    block_edge_um = (0.5 - np.abs(fb - block - 0.5)) * block_um
    return Laths(pag, packets, packet, block, block_edge_um, angle, u, along)


def martensite_variant(
    c: Canvas, lath_um, block_um, packet_um, contrast, carbide_um, carbide_frac, site
) -> np.ndarray:
    """Laths cut into needles inside blocks, packets and prior-austenite grains, optional carbides."""
    m = c.px_per_um
    t = _laths(c, lath_um, block_um, packet_um)
    lath = np.floor(t.u).astype(np.int32)
    needle = np.floor(t.along / (lath_um * c.rng.uniform(8, 25)) + _unit(lath, t.packet, 10)).astype(np.int32)
    edge_um = (0.5 - np.abs(t.u - lath - 0.5)) * lath_um
    phase = (
        0.62
        + 0.2 * (_unit(t.packet, 11) - 0.5)
        + 0.6 * contrast * _mtf(block_um, m) * (_unit(t.packet, t.block, 12) - 0.5)
        + contrast * _mtf(lath_um, m) * (_unit(t.packet, lath, needle) - 0.5)
        - 0.25 * contrast * _line(edge_um, 0.03, m)
        - 0.15 * _line(t.block_edge_um, 0.05, m)
        - 0.25 * _line(t.packets.edge_um, 0.08, m)
        - 0.45 * _line(t.pag.edge_um, 0.25, m)
    )
    if carbide_um > 0:
        keep = np.exp(-((edge_um / lath_um / 0.12) ** 2)) if site == "boundary" else None
        cover = _particles(c, carbide_um, carbide_frac, keep)
        phase = phase * (1 - cover) + 0.1 * cover
    return phase


def martensite(c: Canvas) -> np.ndarray:
    packet_um = c.rng.uniform(4, 12)
    block_um = packet_um * c.rng.uniform(0.15, 0.3)
    return martensite_variant(c, c.rng.uniform(0.2, 0.5), block_um, packet_um, 0.5, 0.0, 0.0, "lath")


def spheroidite(c: Canvas) -> np.ndarray:
    cells = _cells(c, c.rng.uniform(10, 25), 15)
    matrix = _ferrite_phase(c, cells, 0.25)
    cover = _particles(c, c.rng.uniform(0.25, 0.7), c.rng.uniform(0.08, 0.18))
    return matrix * (1 - cover) + 0.12 * cover


def bainite(c: Canvas) -> np.ndarray:
    """Sheaves (bundles of parallel laths, elongated along them) inside prior-austenite grains, with
    carbides: upper bainite has dashed films and particles between the laths, lower bainite fine
    particles inside them."""
    m = c.px_per_um
    pag = _cells(c, c.rng.uniform(20, 50), 16)
    axis = np.pi * _unit(pag.id, 12)
    across, along = _project(c, axis)
    sheaf_um = c.rng.uniform(3, 8)
    sheaves = _cells(Canvas(along / 3, across, m, c.rng, c.salt), sheaf_um, 19, relaxed=False)
    sheaf = _hash(sheaves.id, pag.id)
    lath_um = c.rng.uniform(0.5, 1.0)
    across, along = _project(c, axis + np.radians(10) * (_unit(sheaf, 13) - 0.5))
    u = across / lath_um + 0.3 * _noise(c, 10.0, 13)
    lath = np.floor(u).astype(np.int32)
    edge_um = (0.5 - np.abs(u - lath - 0.5)) * lath_um
    upper = c.rng.uniform() < 0.5
    shade = 0.75 + 0.15 * (_unit(sheaf, 14) - 0.5)
    phase = shade - 0.3 * _line(sheaves.edge_um, 0.15, m) - 0.45 * _line(pag.edge_um, 0.25, m)
    if upper:
        dash = _unit(lath, np.floor(along / c.rng.uniform(0.8, 2.0)).astype(np.int32), sheaf) < 0.6
        phase = phase - 0.8 * np.where(dash, 1.0, 0.2 * _mtf(lath_um, m)) * _line(edge_um, 0.06, m)
        keep = np.exp(-((edge_um / lath_um / 0.1) ** 2))
    else:
        phase = phase - 0.15 * _line(edge_um, 0.04, m)
        keep = 1 - np.exp(-((edge_um / lath_um / 0.15) ** 2))
    cover = _particles(c, c.rng.uniform(0.02, 0.05), c.rng.uniform(0.02, 0.05), keep)
    return phase * (1 - cover) + 0.1 * cover


def cast_dendrites(c: Canvas) -> np.ndarray:
    """Dendrite trunks with tapering side arms; dark interdendritic regions."""
    m = c.px_per_um
    grains = _cells(c, c.rng.uniform(150, 400), 17)
    primary, secondary = c.rng.uniform(30, 80), c.rng.uniform(8, 20)
    across, along = _project(c, 2 * np.pi * _unit(grains.id, 15))
    u = across / primary + 0.15 * _noise(c, 60.0, 16)
    trunk_um = np.abs(u - np.floor(u) - 0.5) * primary
    v = along / secondary + _unit(np.floor(u).astype(np.int32), grains.id)
    arm_um = np.abs(v - np.floor(v) - 0.5) * secondary
    arm_half = 0.22 * secondary * np.clip(1 - trunk_um / (0.48 * primary), 0, 1)
    signed = np.minimum(trunk_um - 0.1 * primary, arm_um - arm_half)
    soft = np.sqrt(0.5**2 + (AA_SIGMA_PX / m) ** 2)
    dendrite = 0.5 * (1 - np.tanh(signed / soft))
    texture = 0.05 * _noise(c, 3.0, 18) * _mtf(3.0, m)
    return 0.3 + 0.55 * dendrite + texture


def twinned_austenite(c: Canvas) -> np.ndarray:
    """Large equiaxed grains crossed by straight parallel annealing-twin bands."""
    m = c.px_per_um
    grains = _cells(c, c.rng.uniform(30, 80), 19)
    period = c.rng.uniform(10, 40)
    across, _ = _project(c, np.pi * _unit(grains.id, 20))
    u = across / period + _unit(grains.id, 21)
    f = u - np.floor(u)
    duty = 0.15 + 0.3 * _unit(grains.id, 22)
    has_twins = _unit(grains.id, 23) < 0.75
    edge_um = np.minimum(np.minimum(f, 1 - f), np.abs(f - duty)) * period
    inside = f < duty
    twin_shade = 0.55 + 0.4 * _unit(grains.id, 24)
    shade = 0.55 + 0.4 * _unit(grains.id, 25)
    shade = np.where(has_twins & inside, twin_shade, shade)
    return shade - 0.6 * _line(grains.edge_um, 0.3, m) - np.where(has_twins, 0.3 * _line(edge_um, 0.1, m), 0)


RENDERERS = {
    "ferrite": ferrite,
    "pearlite": pearlite,
    "ferrite-pearlite": ferrite_pearlite,
    "martensite": martensite,
    "spheroidite": spheroidite,
    "bainite": bainite,
    "cast-dendrites": cast_dendrites,
    "twinned-austenite": twinned_austenite,
}


def variant_recipe(name: str, rng: np.random.Generator) -> dict:
    """One image's martensitic recipe for quiz-2 variant `name`: sizes log-normal around the variant's
    median (VARIANT_SPREAD), contrast with an absolute spread, so neighbouring variants overlap."""
    lath, packet, contrast, carbide, frac, site = VARIANTS[name]
    s = rng.lognormal(0.0, VARIANT_SPREAD, 4)
    return {
        "lath_um": lath * s[0],
        "block_um": packet * s[1] * rng.uniform(0.15, 0.3),
        "packet_um": packet * s[1],
        "contrast": float(np.clip(contrast + rng.normal(0, 0.08), 0.02, 0.8)),
        "carbide_um": carbide * s[2],
        "carbide_frac": frac * s[3],
        "site": site,
    }


def _variant_renderer(name: str):
    def draw(c: Canvas) -> np.ndarray:
        return martensite_variant(c, **variant_recipe(name, c.rng))

    return draw


RENDERERS.update({name: _variant_renderer(name) for name in VARIANTS})
CLASSES = tuple(RENDERERS)


# --------------------------------------------------------------------------- imaging


def optical_psf_sigma_px(px_per_um: float) -> float:
    """Sigma (px) of the Gaussian that approximates the optical Airy PSF: 0.21 lambda / NA = 0.344 times
    the Rayleigh resolution, so it grows in proportion to the magnification."""
    return 0.344 * OPTICAL_RESOLUTION_UM * px_per_um


def _specimen(c: Canvas, phase: np.ndarray) -> np.ndarray:
    """Preparation artefacts on the phase image: uneven etching (contrast varying over tens of um),
    polishing scratches (a few per 100 um, on some specimens) and sparse inclusions (MnS, oxides)."""
    rng, m = c.rng, c.px_per_um
    phase = 1 - (1 - phase) * (1 + rng.uniform(0.0, 0.4) * _noise(c, 40.0, 90))
    if rng.uniform() < 0.5:
        h, w = c.shape
        for angle in rng.uniform(0, np.pi, rng.poisson(np.hypot(h, w) / m / rng.uniform(50, 400))):
            across, _ = _project(c, np.float32(angle))
            offset = rng.uniform(across.min(), across.max())
            phase = phase - rng.uniform(0.1, 0.35) * _line(across - offset, rng.uniform(0.1, 0.6), m)
    radius_um = rng.uniform(0.5, 2.5)
    if rng.uniform() < 0.5 and radius_um * m < 0.1 * max(c.shape):  # a resolved inclusion fills no field
        cover = _particles(c, radius_um, rng.uniform(0.0005, 0.003))
        phase = phase * (1 - cover) + 0.05 * cover
    return phase


def _style(phase: np.ndarray, style: str, px_per_um: float, rng: np.random.Generator) -> np.ndarray:
    """Optical: bright matrix, dark carbides, uneven illumination, the optical PSF. SEM: inverted,
    edge glow, charging (a bright bloom and streaks trailing along the scan), shot noise."""
    h, w = phase.shape
    phase = np.clip(phase, 0, 1)
    gamma = rng.uniform(0.8, 1.25)
    if style == "optical":
        lo, hi = rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.97)
        img = lo + (hi - lo) * phase**gamma
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        tilt = rng.normal(0, 0.08, 2)
        r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.5 * (h**2 + w**2))
        img = img * (1 + tilt[0] * (xx / w - 0.5) + tilt[1] * (yy / h - 0.5) - rng.uniform(0, 0.2) * r2)
        img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), optical_psf_sigma_px(px_per_um))
        img = img + rng.normal(0, rng.uniform(0.005, 0.025), img.shape)
    elif style == "sem":
        lo, hi = rng.uniform(0.05, 0.2), rng.uniform(0.75, 0.95)
        img = (lo + (hi - lo) * (1 - phase) ** gamma).astype(np.float32)
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 0.8))
        gx, gy = cv2.Sobel(img, cv2.CV_32F, 1, 0), cv2.Sobel(img, cv2.CV_32F, 0, 1)
        img = img + rng.uniform(0.0, 0.15) * np.sqrt(gx**2 + gy**2)
        if rng.uniform() < 0.4:  # charging
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.2, 0.6) * max(h, w)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            img = img + rng.uniform(0.03, 0.15) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
            decay = rng.uniform(0.02, 0.2)
            trail = lfilter([decay], [1, decay - 1], img, axis=1).astype(np.float32)
            img = img + rng.uniform(0.05, 0.3) * np.clip(trail - img.mean(), 0, None)
        img = img + rng.normal(0, rng.uniform(0.02, 0.06), img.shape) * np.sqrt(np.clip(img, 0.05, 1))
        img = img + rng.normal(0, 0.01, (h, 1))  # scan-line jitter
    else:
        raise ValueError(f"style {style!r}: expected one of {STYLES}")
    return np.clip(img, 0, 1).astype(np.float32)


def render(
    cls: str, shape: tuple[int, int], px_per_um: float, style: str, rng: np.random.Generator
) -> np.ndarray:
    """One micrograph of class `cls` as float32 (H, W) in [0, 1], drawn at `px_per_um`."""
    if cls not in RENDERERS:
        raise ValueError(f"class {cls!r}: expected one of {CLASSES}")
    if not px_per_um > 0:
        raise ValueError(f"px_per_um = {px_per_um!r}: expected a positive number")
    if style == "optical" and px_per_um > OPTICAL_MAX_PX_PER_UM:
        raise ValueError(
            f"optical style at px_per_um = {px_per_um!r}: expected at most {OPTICAL_MAX_PX_PER_UM} "
            "(beyond optical resolution; use sem)"
        )
    h, w = shape
    origin = rng.uniform(0, 1000, 2)
    xs = (np.arange(w, dtype=np.float32) + 0.5) / np.float32(px_per_um) + np.float32(origin[0])
    ys = (np.arange(h, dtype=np.float32) + 0.5) / np.float32(px_per_um) + np.float32(origin[1])
    x, y = np.meshgrid(xs, ys)
    canvas = Canvas(x, y, float(px_per_um), rng, int(rng.integers(0, 2**31)))
    return _style(_specimen(canvas, RENDERERS[cls](canvas)), style, float(px_per_um), rng)
