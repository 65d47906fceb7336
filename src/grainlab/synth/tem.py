"""Synthetic bright-field TEM tilt series of a columnar FCC metal thin film, with exact ground truth.

make_region   one imaged area of the film: a plan-view grain map (a Laguerre tessellation of packed
              seeds, relaxed by threshold dynamics so boundaries curve and triple junctions approach
              120 degrees; optional annealing-twin lamellae), random crystal orientations and the
              specimen's fixed fields (foil bending, thickness, mottle, contamination).
render        one BF image at a stage tilt: two-beam dynamical intensities of the low-index FCC
              reflections per grain and pixel (so grains darken near Bragg conditions and bend contours
              and thickness fringes move with tilt), fringes at inclined boundaries, uneven illumination,
              PSF blur, shot and read noise; plus the boundaries visible at that tilt.
trace         a simulated human tracing of visible boundaries: jittered, with missed segments and
              spurious strokes.

All randomness comes from the numpy Generator passed in; output is a pure function of its seed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import label as label_components
from skimage.morphology import thin

from grainlab.config import TemConfig, TracerConfig

# FCC reflections (h k l all odd or all even) up to {422}. Extinction distances grow about as |g|^1.45
# relative to {111}, which matches the Al values of Williams & Carter (200: 1.22, 220: 2.03 xi_111).
REFLECTION_FAMILIES = (
    (1, 1, 1),
    (2, 0, 0),
    (2, 2, 0),
    (3, 1, 1),
    (2, 2, 2),
    (4, 0, 0),
    (3, 3, 1),
    (4, 2, 0),
    (4, 2, 2),
)
EXTINCTION_EXPONENT = 1.45
ABSORPTION_LENGTH_NM = 600.0  # mean absorption length: thicker foil, darker background
BRIGHTNESS = 0.72  # display level of the undiffracted beam through the nominal foil
MAX_DIFFRACTED = 0.95  # bright field never goes fully black
# Diffuse (thermal and inelastic) scattering out of the aperture grows near Bragg conditions over a
# range several rocking-curve widths wide (channelling): a broad Lorentzian in s * xi per reflection.
DIFFUSE_STRENGTH = 0.06
DIFFUSE_WIDTH = 5.0
MOTTLE_SCALES_NM = (1.6, 5.0)  # blob sizes of the mottled texture (surface oxide, strain, defects)
FRINGE_REACH = 0.3  # widest boundary fringe band, in foil thicknesses
FRINGE_DEPTH = 0.25  # fringe depth, relative to the open-beam level, of a grain at its Bragg condition
PIXEL_REFLECTIONS = 3  # reflections per grain evaluated pixel by pixel; the rest per grain
TWIN_ANGLE_RAD = np.pi / 3  # annealing twin: 60 degrees about <111>
MIN_LAMELLA_PX = 4.0

# Seed packing and relaxation, calibrated so the final grains have the requested size statistics.
SEED_EXCLUSION = 0.7  # seed disk diameter / target grain diameter
RELAX_SIGMA = 0.10  # threshold-dynamics kernel width / mean grain diameter
RELAX_STEPS = 3
BALANCE_STEPS = 4
RELAX_SPREAD = (0.9, 0.07)  # measured: sigma of ln d after relaxation ~ 0.9 * seed sigma + 0.07


@dataclass
class Region:
    """One imaged area of the film. Arrays are (H, W) unless noted; grain ids run 1..n."""

    grains: np.ndarray  # int32 grain instance map (twin lamellae are grains of their own)
    boundaries: np.ndarray  # bool exact boundary network, 1 px wide 8-connected lines
    orientations: np.ndarray  # float (n+1, 3, 3) crystal-to-specimen rotations; row 0 unused
    parents: np.ndarray  # int (n+1,) grain id before twinning; lamellae of one grain share it
    segments: np.ndarray  # int32 boundary segment id (between junctions), 0 off the network
    n_segments: int
    pairs: np.ndarray  # int (P, 2) the grain ids on either side of each boundary
    pair_normals: np.ndarray  # float (P, 3) boundary-plane unit normals, specimen frame
    boundary_index: np.ndarray  # flat indices of the boundary pixels
    boundary_pair: np.ndarray  # pair index of each boundary pixel
    fringe_index: np.ndarray  # flat indices of the pixels close to a boundary
    fringe_dist: np.ndarray  # their distance to the nearest boundary pixel (px)
    fringe_pair: np.ndarray  # and the pair index of that boundary pixel
    bend: np.ndarray  # float32 (2, H, W) local tilt from foil bending about x and y (rad)
    thickness: np.ndarray  # float32 foil thickness (nm)
    mottle: np.ndarray  # float32 zero-mean fine texture
    dust: np.ndarray  # float32 transmission of contamination specks, 1 where clean
    grain_area: np.ndarray  # (n+1,) pixels per grain
    grain_bend: np.ndarray  # (n+1, 2) mean local tilt per grain
    grain_bend_range: np.ndarray  # (n+1, 2) largest deviation from that mean in the grain
    grain_thickness: np.ndarray  # (n+1,) mean thickness per grain
    frame: tuple[int, int] = (0, 0)  # (row, column) of the reference view's top-left corner in the arrays
    view_shape: tuple[int, int] = (0, 0)  # the reference view: the untilted, undrifted image_px field
    _contrast: dict = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )  # recent tilts' contrast

    @property
    def n_grains(self) -> int:
        return len(self.orientations) - 1

    def reference(self, array: np.ndarray) -> np.ndarray:
        """The reference view (what the untilted stage shows, the frame of composite tracings and of the
        truth files) cut out of a region-sized array. The region is wider by a margin that tilted and
        drifted exposures bring into view."""
        (y0, x0), (h, w) = self.frame, self.view_shape
        return array[y0 : y0 + h, x0 : x0 + w]


# --------------------------------------------------------------------------- random fields


def smooth_field(shape, scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth Gaussian random field of about unit std and correlation length `scale_px`.

    White noise on a coarse grid (spacing scale/2), blurred and bicubically upsampled: cheap at any scale.
    """
    h, w = shape
    step = max(scale_px / 2.0, 1.0)
    gh, gw = int(np.ceil(h / step)) + 4, int(np.ceil(w / step)) + 4
    coarse = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), 1.0, mode="wrap")
    coarse /= 0.282  # std of unit white noise blurred with sigma 1
    size = (int(np.ceil(gw * step)), int(np.ceil(gh * step)))
    fine = cv2.resize(coarse.astype(np.float32), size, interpolation=cv2.INTER_CUBIC)
    off = int(step)
    return np.ascontiguousarray(fine[off : off + h, off : off + w])


def texture(shape, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """Random texture of about unit std: white noise blurred with `sigma_px` (a smooth field when wide)."""
    if sigma_px > 3:
        return smooth_field(shape, 2 * sigma_px, rng)
    noise = rng.standard_normal(shape).astype(np.float32)
    return ndimage.gaussian_filter(noise, sigma_px) * np.float32(2 * np.sqrt(np.pi) * sigma_px)


# --------------------------------------------------------------------------- grain structure


def _seed_sizes(cfg: TemConfig) -> tuple[float, float]:
    """Log-normal (mean diameter px, sigma of ln d) of the seed targets that yield cfg's grain statistics:
    curvature-driven relaxation (small grains shrink, large ones grow) widens ln d, see RELAX_SPREAD."""
    slope, offset = RELAX_SPREAD
    return cfg.mean_grain_nm / cfg.pixel_nm, max((cfg.sigma_ln_d - offset) / slope, 0.02)


def _pack_seeds(cfg: TemConfig, shape, rng: np.random.Generator):
    """Seeds for grains of log-normal target diameters over a padded field.

    Disks of SEED_EXCLUSION times the target diameters are placed by random sequential addition, largest
    first, so seeds are spaced by size. Returns (centres (N, 2) as x, y in px, target diameters (N,), pad).
    """
    h, w = shape
    mean_px, sigma = _seed_sizes(cfg)
    pad = max(mean_px, 4.0)
    area = (h + 2 * pad) * (w + 2 * pad)
    mu = np.log(mean_px) - sigma**2 / 2
    expected = int(area / (np.pi / 4 * mean_px**2 * np.exp(sigma**2))) + 8
    diam = rng.lognormal(mu, sigma, size=2 * expected)
    n = min(int(np.searchsorted(np.cumsum(np.pi / 4 * diam**2), area)) + 1, len(diam))
    diam = np.sort(diam[:n])[::-1]
    radii = diam * (SEED_EXCLUSION / 2)
    centres = np.empty((n, 2))
    lo, hi = np.array([-pad, -pad]), np.array([w + pad, h + pad])
    tries = 12
    for i in range(n):
        r = radii[i]
        while True:
            cand = rng.uniform(lo, hi, size=(tries, 2))
            dx = cand[:, None, 0] - centres[None, :i, 0]
            dy = cand[:, None, 1] - centres[None, :i, 1]
            ok = np.all(dx * dx + dy * dy >= (r + radii[None, :i]) ** 2, axis=1)
            if ok.any():
                centres[i] = cand[np.argmax(ok)]
                radii[i] = r
                break
            r *= 0.9
    return centres, diam, pad


def _power_cells(centres, weights, xs, ys) -> np.ndarray:
    """Index of the Laguerre cell of each point: argmin |x - c|^2 - w, found as the nearest neighbour of
    (x, y, 0) among the lifted seeds (c, sqrt(max w - w))."""
    lift = np.sqrt(weights.max() - weights)
    tree = cKDTree(np.column_stack([centres, lift]))
    query = np.column_stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)])
    return tree.query(query, workers=1)[1].reshape(xs.shape)


@dataclass
class _CoarseCells:
    """Laguerre cells on a coarse grid over the padded field: grid point (i, j) is at
    (origin + j * spacing, origin + i * spacing)."""

    cells: np.ndarray
    origin: float
    spacing: float


def _balance_weights(centres, diam, shape, pad, spacing) -> tuple[np.ndarray, _CoarseCells]:
    """Power weights whose Laguerre cells have areas proportional to the target diameters squared.

    A few damped Newton steps on a coarse grid of the padded field: raising w_i by dw moves cell i's
    boundaries out by about dw / 2|c_i - c_j|, which grows its area by about (pi/2) dw.
    """
    h, w = shape
    xs, ys = np.meshgrid(np.arange(-pad, w + pad, spacing), np.arange(-pad, h + pad, spacing))
    target = diam**2 * (xs.size / (diam**2).sum())  # in grid cells
    weights = (diam / 2) ** 2
    for _ in range(BALANCE_STEPS):
        cells = _power_cells(centres, weights, xs, ys)
        got = np.bincount(cells.ravel(), minlength=len(diam))
        weights = weights + 0.8 * (2 / np.pi) * (target - got) * spacing**2
    return weights, _CoarseCells(_power_cells(centres, weights, xs, ys), -pad, spacing)


def _laguerre_labels(centres, weights, coarse: _CoarseCells, warp) -> np.ndarray:
    """Power (Laguerre) diagram on the pixel grid, labels 1..N, at domain-warped coordinates (so cell
    edges come out wavy instead of straight). Each pixel compares only the seeds of the 3 x 3 nearest
    coarse grid points: exact except for cells smaller than the coarse grid, which are cleaned away."""
    _, h, w = warp.shape
    px = np.arange(w, dtype=np.float32)[None, :] + warp[0]
    py = np.arange(h, dtype=np.float32)[:, None] + warp[1]
    gh, gw = coarse.cells.shape
    cells = np.pad(coarse.cells, 1, mode="edge")
    ci = np.clip(np.rint((py - coarse.origin) / coarse.spacing).astype(np.int64), 0, gh - 1) + 1
    cj = np.clip(np.rint((px - coarse.origin) / coarse.spacing).astype(np.int64), 0, gw - 1) + 1
    cx, cy = centres[:, 0].astype(np.float32), centres[:, 1].astype(np.float32)
    power = weights.astype(np.float32)
    best = np.full((h, w), np.inf, np.float32)
    labels = np.zeros((h, w), np.int64)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            seed = cells[ci + di, cj + dj]
            dist = (px - cx[seed]) ** 2 + (py - cy[seed]) ** 2 - power[seed]
            closer = dist < best
            best[closer] = dist[closer]
            labels[closer] = seed[closer]
    return (labels + 1).astype(np.int32)


def relax(labels: np.ndarray, sigma: float, steps: int) -> np.ndarray:
    """Threshold dynamics (Merriman-Bence-Osher): each step blurs every grain's indicator with a Gaussian
    and gives each pixel to the grain with the largest value. Boundaries move by mean curvature and triple
    junctions relax toward 120 degrees (equal boundary energies)."""
    h, w = labels.shape
    reach = int(np.ceil(3 * sigma)) + 1
    for _ in range(steps):
        best = np.zeros((h, w), np.float32)
        relaxed = labels.copy()
        for gid, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            ys = slice(max(box[0].start - reach, 0), min(box[0].stop + reach, h))
            xs = slice(max(box[1].start - reach, 0), min(box[1].stop + reach, w))
            inside = (labels[ys, xs] == gid).astype(np.float32)
            blurred = cv2.GaussianBlur(inside, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
            best_box, relaxed_box = best[ys, xs], relaxed[ys, xs]
            wins = blurred > best_box
            best_box[wins] = blurred[wins]
            relaxed_box[wins] = gid
        labels = relaxed
    return labels


def _clean_labels(values: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Grain ids 1..n (raster order) for the 4-connected regions of equal `values`, after regions below
    `min_area` pixels take the values of their neighbours (merging into them).

    Returns (grain ids, the value of each grain (n + 1,), entry 0 unused)."""
    comp = label_components(values, background=-1, connectivity=1)
    small = np.bincount(comp.ravel())[comp] < min_area
    if small.any() and not small.all():
        values = _fill_from_neighbours(values, small)
        comp = label_components(values, background=-1, connectivity=1)
    _, first = np.unique(comp.ravel(), return_index=True)
    return comp.astype(np.int32), np.concatenate([[0], values.ravel()[first]])


def _fill_from_neighbours(values: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Grow the values around `holes` into them, one pixel layer per pass (right, left, down, up first)."""
    values, holes = values.copy(), holes.copy()
    while holes.any():
        for axis, step in ((1, 1), (1, -1), (0, 1), (0, -1)):
            src = [slice(None), slice(None)]
            dst = [slice(None), slice(None)]
            src[axis] = slice(step, None) if step > 0 else slice(None, step)
            dst[axis] = slice(None, -step) if step > 0 else slice(-step, None)
            take = holes[tuple(dst)] & ~holes[tuple(src)]
            values[tuple(dst)][take] = values[tuple(src)][take]
            holes[tuple(dst)][take] = False
    return values


def _random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation matrices (n, 3, 3) from normalised Gaussian quaternions."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def _fibre_rotations(n: int, spread_rad: float, rng: np.random.Generator) -> np.ndarray:
    """<111> fibre texture (n, 3, 3): each crystal's [111] lies along the film normal z, tilted off it by a
    small random rotation (std `spread_rad` about each in-plane axis), at a uniformly random angle about z."""
    # Rodrigues rotation taking [111]/sqrt(3) onto z: about [1, -1, 0]/sqrt(2) by arccos(1/sqrt(3)).
    align = _axis_rotation(np.array([1.0, -1.0, 0.0]) / np.sqrt(2), np.arccos(1 / np.sqrt(3)))
    spin = rng.uniform(0, 2 * np.pi, n)
    wobble = rng.normal(0, spread_rad, size=(n, 2))
    out = np.empty((n, 3, 3))
    for i in range(n):
        c, s = np.cos(spin[i]), np.sin(spin[i])
        about_z = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        angle = float(np.hypot(*wobble[i]))
        tilt = np.eye(3) if angle == 0 else _axis_rotation(np.array([*wobble[i], 0.0]) / angle, angle)
        out[i] = tilt @ about_z @ align
    return out


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by `angle` about unit `axis` (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


TWIN_AXES = np.array([[1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]]) / np.sqrt(3)


def _add_twins(labels, rotations, fraction, rng):
    """Cut a fraction of grains into lamellae by parallel coherent {111} twin planes.

    The twin plane is the grain's most upright {111}, so its trace on the film is a straight line.
    Returns (variant map: 0 parent / 1 twin orientation, twin axis per grain in the crystal frame,
    twin-plane normal per grain in the specimen frame).
    """
    n = len(rotations) - 1
    variant = np.zeros(labels.shape, np.int32)
    twin_axis = np.zeros((n + 1, 3))
    twin_normal = np.zeros((n + 1, 3))
    chosen = rng.random(n + 1) < fraction
    area = np.bincount(labels.ravel(), minlength=n + 1)
    chosen &= area >= 0.3 * area[1:].mean()
    for gid, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or not chosen[gid]:
            continue
        normals = TWIN_AXES @ rotations[gid].T  # specimen frame
        pick = int(np.argmin(np.abs(normals[:, 2])))
        normal = normals[pick]
        inplane = normal[:2] / np.linalg.norm(normal[:2])
        yy, xx = np.nonzero(labels[box] == gid)
        proj = xx * inplane[0] + yy * inplane[1]
        lo, hi = proj.min(), proj.max()
        cuts = np.sort(rng.uniform(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), size=rng.integers(1, 4)))
        cuts = cuts[np.concatenate([[True], np.diff(cuts) >= max(MIN_LAMELLA_PX, 0.12 * (hi - lo))])]
        lamella = np.searchsorted(cuts, proj) + rng.integers(0, 2)
        variant[box][yy, xx] = lamella % 2
        twin_axis[gid] = TWIN_AXES[pick]
        twin_normal[gid] = normal
    return variant, twin_axis, twin_normal


def _boundary_network(labels: np.ndarray) -> np.ndarray:
    """1-px 8-connected boundary lines: pixels whose right or lower neighbour differs, thinned."""
    step = np.zeros(labels.shape, bool)
    step[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    step[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return thin(step)


def _segments(boundaries: np.ndarray) -> tuple[np.ndarray, int]:
    """Label boundary segments between triple junctions (ids 1..n on every boundary pixel, 0 elsewhere).

    Junction pixels (three or more neighbours) join an adjacent segment; clusters made only of junction
    pixels (around grains a pixel or two wide) become segments of their own.
    """
    eight = np.ones((3, 3))
    neighbours = ndimage.convolve(boundaries.astype(np.uint8), eight.astype(np.uint8), mode="constant")
    junction = boundaries & (neighbours >= 4)
    seg, n = ndimage.label(boundaries & ~junction, structure=eight)
    padded = np.pad(seg, 1)
    for _ in range(4):  # junction clusters are a few pixels across
        y, x = np.nonzero(boundaries & (padded[1:-1, 1:-1] == 0))
        if not y.size:
            break
        around = [padded[y + 1 + dy, x + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        padded[y + 1, x + 1] = np.max(around, axis=0)
    seg = padded[1:-1, 1:-1]
    orphans, extra = ndimage.label(boundaries & (seg == 0), structure=eight)
    seg[orphans > 0] = orphans[orphans > 0] + n
    return seg.astype(np.int32), int(n + extra)


def _pair_across(grains: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For boundary pixels (flat `index`): their own grain and the grain across the boundary, taken from
    the first differing neighbour in the order right, down, left, up, then the diagonals."""
    h, w = grains.shape
    y, x = np.divmod(index, w)
    own = grains.ravel()[index].astype(np.int64)
    other = own.copy()
    offsets = ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))
    for dy, dx in offsets[::-1]:  # the first in order is written last and wins
        nb = grains[np.clip(y + dy, 0, h - 1), np.clip(x + dx, 0, w - 1)]
        other = np.where(nb != own, nb, other)
    return own, other


def _grain_stats(labels: np.ndarray, fields) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-grain (mean, largest absolute deviation from the mean) of each field; ids 1..n all present."""
    flat = labels.ravel()
    area = np.bincount(flat)
    order = np.argsort(flat, kind="stable")
    starts = np.cumsum(area)[: len(area) - 1]
    stats = []
    for field in fields:
        values = field.ravel()
        mean = np.bincount(flat, weights=values, minlength=len(area)) / np.maximum(area, 1)
        ranked = values[order]
        hi = np.concatenate([[0], np.maximum.reduceat(ranked, starts)])
        lo = np.concatenate([[0], np.minimum.reduceat(ranked, starts)])
        stats.append((mean, np.maximum(hi - mean, mean - lo)))
    return stats


def _dust(shape, cfg: TemConfig, rng: np.random.Generator) -> np.ndarray:
    """Transmission map of Poisson(dust_specks) dark, roundish contamination specks (~15 nm across)
    with slightly lumpy outlines (radius modulated by 2- and 3-fold harmonics)."""
    h, w = shape
    trans = np.ones(shape, np.float32)
    for _ in range(rng.poisson(cfg.dust_specks)):
        radius = max(rng.lognormal(np.log(7.0), 0.4) / cfg.pixel_nm, 1.2)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        darkness = rng.uniform(0.45, 0.85)
        lumps = rng.normal(0, 0.07, size=2)
        phases = rng.uniform(0, 2 * np.pi, size=2)
        r = int(np.ceil(2 * radius)) + 2
        ys = slice(max(int(cy) - r, 0), min(int(cy) + r + 1, h))
        xs = slice(max(int(cx) - r, 0), min(int(cx) + r + 1, w))
        yy, xx = np.mgrid[ys, xs]
        theta = np.arctan2(yy - cy, xx - cx)
        outline = radius * (
            1 + lumps[0] * np.cos(2 * theta + phases[0]) + lumps[1] * np.cos(3 * theta + phases[1])
        )
        rho = np.hypot(yy - cy, xx - cx) / outline
        trans[ys, xs] *= (1 - darkness * np.exp(-(rho**4))).astype(np.float32)
    return trans


def _grow_grains(cfg: TemConfig, shape, rng: np.random.Generator) -> np.ndarray:
    """Plan-view grain map (ids 1..n) with log-normal sizes, curved boundaries and ~120 degree junctions:
    size-balanced Laguerre cells of packed seeds on wavy coordinates, relaxed by threshold dynamics."""
    mean_px = cfg.mean_grain_nm / cfg.pixel_nm
    centres, diam, pad = _pack_seeds(cfg, shape, rng)
    weights, coarse = _balance_weights(centres, diam, shape, pad, spacing=float(np.clip(mean_px / 8, 1, 4)))
    warp = cfg.boundary_waviness * mean_px * np.stack([smooth_field(shape, mean_px, rng) for _ in range(2)])
    labels, _ = _clean_labels(_laguerre_labels(centres, weights, coarse, warp), 1)
    labels = relax(labels, max(RELAX_SIGMA * mean_px, 0.8), RELAX_STEPS)
    return _clean_labels(labels, _min_grain_area(cfg))[0]


def _min_grain_area(cfg: TemConfig) -> int:
    """Fragments below this many pixels are merged into a neighbour."""
    return max(3, int(0.02 * np.pi / 4 * (cfg.mean_grain_nm / cfg.pixel_nm) ** 2))


def _orient(labels: np.ndarray, cfg: TemConfig, rng: np.random.Generator):
    """Orientations (random, or a <111> fibre texture), then twin lamellae as grains of their own.

    Returns (grains, orientations (n+1, 3, 3), parents (n+1,), twin-plane normal per parent (specimen frame)).
    """
    n = int(labels.max()) + 1
    if cfg.texture == "fiber111":
        rotations = _fibre_rotations(n, np.deg2rad(cfg.texture_spread_deg), rng)
    else:
        rotations = _random_rotations(n, rng)
    variant, twin_axis, twin_normal = _add_twins(labels, rotations, cfg.twin_fraction, rng)
    grains, code = _clean_labels(labels * 2 + variant, _min_grain_area(cfg))
    parents = code // 2
    orientations = np.zeros((len(code), 3, 3))
    orientations[0] = np.eye(3)
    for gid in range(1, len(code)):
        p = parents[gid]
        twin = _axis_rotation(twin_axis[p], TWIN_ANGLE_RAD) if code[gid] % 2 else np.eye(3)
        orientations[gid] = rotations[p] @ twin
    return grains, orientations, parents, twin_normal


def frame_margin(cfg: TemConfig, max_tilt_deg: tuple[float, float]) -> tuple[int, int]:
    """(rows, columns) of specimen needed on each side of the reference view so that every exposure up to
    these stage tilts, with drift and rotation up to 3 std, shows only generated specimen."""
    half = np.array([cfg.image_px, cfg.image_px]) / 2.0  # x, y
    corners = np.array(list(itertools.product((-1, 1), repeat=2))) * half
    worst = half.copy()
    rot, drift = 3 * np.deg2rad(cfg.rotation_deg), 3 * cfg.drift_px
    for sa, sb, sr, dx, dy in itertools.product((-1, 1), repeat=5):
        m = _projection(np.deg2rad(sa * max_tilt_deg[0]), np.deg2rad(sb * max_tilt_deg[1]), sr * rot)
        back = (corners - drift * np.array([dx, dy])) @ np.linalg.inv(m).T
        worst = np.maximum(worst, np.abs(back).max(axis=0))
    mx, my = np.ceil(worst - half).astype(int) + 2
    return int(my), int(mx)


def make_region(
    cfg: TemConfig, rng: np.random.Generator, max_tilt_deg: tuple[float, float] = (30.0, 15.0)
) -> Region:
    """Generate one imaged area: grain map, boundaries, orientations and the specimen's fixed fields.

    The arrays cover the reference view (image_px square) plus a margin on each side for exposures tilted
    up to max_tilt_deg (alpha, beta): foreshortening and drift bring specimen beyond the view into an image.
    """
    my, mx = frame_margin(cfg, max_tilt_deg)
    shape = (cfg.image_px + 2 * my, cfg.image_px + 2 * mx)
    grains, orientations, parents, twin_normal = _orient(_grow_grains(cfg, shape, rng), cfg, rng)
    n = len(orientations) - 1
    boundaries = _boundary_network(grains)
    segments, n_segments = _segments(boundaries)

    # Grain pair across each boundary pixel, and the boundary plane of each pair.
    boundary_index = np.flatnonzero(boundaries)
    own, other = _pair_across(grains, boundary_index)
    pair_code = np.minimum(own, other) * (n + 1) + np.maximum(own, other)
    pair_codes, boundary_pair = np.unique(pair_code, return_inverse=True)
    pairs = np.column_stack([pair_codes // (n + 1), pair_codes % (n + 1)])
    pair_normals = _pair_normals(grains, n, pairs, parents, twin_normal, rng)

    # Nearest boundary pixel of every pixel within fringe reach.
    reach = FRINGE_REACH * cfg.foil_thickness_nm / cfg.pixel_nm
    dist, (iy, ix) = ndimage.distance_transform_edt(~boundaries, return_indices=True)
    pair_map = np.full(grains.size, -1, np.int64)
    pair_map[boundary_index] = boundary_pair
    fringe_index = np.flatnonzero(dist <= reach) if boundary_index.size else np.zeros(0, np.int64)
    nearest = (iy.ravel() * shape[1] + ix.ravel())[fringe_index]

    # Specimen fields: bending of the foil (local tilt = gradient of a smooth height), thickness, texture.
    height = smooth_field(shape, cfg.bend_scale_nm / cfg.pixel_nm, rng)
    tilt_y, tilt_x = np.gradient(height)
    peak = max(float(np.abs(tilt_x).max()), float(np.abs(tilt_y).max()), 1e-12)
    bend = (np.stack([tilt_y, tilt_x]) * (np.deg2rad(cfg.bend_amplitude_deg) / peak)).astype(np.float32)
    variation = np.clip(smooth_field(shape, 2.5 * cfg.mean_grain_nm / cfg.pixel_nm, rng), -3, 3)
    thickness = np.maximum(1 + cfg.thickness_variation * variation, 0.2) * cfg.foil_thickness_nm
    mottle = sum(0.7 * texture(shape, nm / cfg.pixel_nm, rng) for nm in MOTTLE_SCALES_NM)
    dust = _dust(shape, cfg, rng)

    (bend_a, range_a), (bend_b, range_b), (grain_thickness, _) = _grain_stats(grains, [*bend, thickness])
    return Region(
        grains=grains,
        boundaries=boundaries,
        orientations=orientations,
        parents=parents,
        segments=segments,
        n_segments=n_segments,
        pairs=pairs,
        pair_normals=pair_normals,
        boundary_index=boundary_index,
        boundary_pair=boundary_pair,
        fringe_index=fringe_index,
        fringe_dist=dist.ravel()[fringe_index].astype(np.float32),
        fringe_pair=pair_map[nearest],
        bend=bend,
        thickness=thickness.astype(np.float32),
        mottle=mottle.astype(np.float32),
        dust=dust,
        grain_area=np.bincount(grains.ravel(), minlength=n + 1),
        grain_bend=np.column_stack([bend_a, bend_b]),
        grain_bend_range=np.column_stack([range_a, range_b]),
        grain_thickness=grain_thickness,
        frame=(my, mx),
        view_shape=(cfg.image_px, cfg.image_px),
    )


def _pair_normals(grains, n, pairs, parents, twin_normal, rng):
    """Boundary-plane normals: twin boundaries lie on their {111} plane; other boundaries face from one
    grain's centroid to the other's and lean out of the vertical by a random ~10 degrees."""
    area = np.maximum(np.bincount(grains.ravel(), minlength=n + 1), 1)
    ys, xs = np.indices(grains.shape)
    cy = np.bincount(grains.ravel(), weights=ys.ravel(), minlength=n + 1) / area
    cx = np.bincount(grains.ravel(), weights=xs.ravel(), minlength=n + 1) / area
    a, b = pairs[:, 0], pairs[:, 1]
    inplane = np.column_stack([cx[b] - cx[a], cy[b] - cy[a]])
    inplane /= np.maximum(np.linalg.norm(inplane, axis=1, keepdims=True), 1e-9)
    lean = rng.normal(0, np.deg2rad(10), size=len(pairs))
    normals = np.column_stack([inplane * np.cos(lean)[:, None], np.sin(lean)])
    twin = parents[a] == parents[b]
    normals[twin] = twin_normal[parents[a][twin]]
    return normals


# --------------------------------------------------------------------------- diffraction contrast


def _fcc_reflections(cfg: TemConfig) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal vectors g (m, 3) in nm^-1 (crystal frame) and extinction distances xi_g (m,) in nm."""
    return _reflections(cfg.lattice_nm, cfg.extinction_nm)


@functools.lru_cache(maxsize=8)
def _reflections(lattice_nm: float, extinction_nm: float) -> tuple[np.ndarray, np.ndarray]:
    vectors, xi = [], []
    for family in REFLECTION_FAMILIES:
        ratio = (np.linalg.norm(family) / np.sqrt(3)) ** EXTINCTION_EXPONENT
        members = {
            tuple(s * p for s, p in zip(signs, perm, strict=True))
            for perm in itertools.permutations(family)
            for signs in itertools.product((1, -1), repeat=3)
        }
        for hkl in sorted(members):
            vectors.append(hkl)
            xi.append(ratio * extinction_nm)
    g, xi = np.array(vectors, float) / lattice_nm, np.array(xi)
    g.flags.writeable = xi.flags.writeable = False  # shared by the cache
    return g, xi


def electron_wavelength_nm(voltage_kv: float) -> float:
    """Relativistic electron wavelength: 0.00251 nm at 200 kV."""
    volts = voltage_kv * 1e3
    return 1.226426 / np.sqrt(volts * (1 + 0.978476e-6 * volts))


def _tilt_matrix(alpha: float, beta: float) -> np.ndarray:
    """Specimen rotation of a double-tilt holder: alpha about x, then beta about the (tilted) y axis."""
    ca, sa, cb, sb = np.cos(alpha), np.sin(alpha), np.cos(beta), np.sin(beta)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    return rx @ ry


def _projection(alpha: float, beta: float, rotation: float = 0.0) -> np.ndarray:
    """2 x 2 map from the film plane (x, y) to the image at a stage tilt: the film is rotated by the holder
    and projected along the beam (cos alpha, cos beta foreshortening), then the image turns by `rotation`."""
    c, s = np.cos(rotation), np.sin(rotation)
    return np.array([[c, -s], [s, c]]) @ _tilt_matrix(alpha, beta)[:2, :2]


def exposure_affine(
    cfg: TemConfig, alpha_deg: float, beta_deg: float, rng: np.random.Generator
) -> np.ndarray:
    """The true 2 x 3 affine of one exposure, reference-view pixels (x, y) -> image pixels: foreshortening
    by the stage tilt about the field centre, a random in-plane rotation (std cfg.rotation_deg) and a random
    drift (std cfg.drift_px per axis)."""
    rotation = rng.normal(0, np.deg2rad(cfg.rotation_deg)) if cfg.rotation_deg > 0 else 0.0
    drift = rng.normal(0, cfg.drift_px, size=2) if cfg.drift_px > 0 else np.zeros(2)
    m = _projection(np.deg2rad(alpha_deg), np.deg2rad(beta_deg), rotation)
    centre = np.array([cfg.image_px - 1, cfg.image_px - 1]) / 2.0
    return np.column_stack([m, centre - m @ centre + drift])


def warp_to_image(region: Region, affine: np.ndarray, array: np.ndarray, kind: str = "float") -> np.ndarray:
    """A region-sized array seen in an exposure's image frame (image_px square). kind: `float` (bilinear),
    `labels` (nearest) or `mask` (a bool or 0/255 line mask: bilinear, then thresholded)."""
    h, w = region.view_shape
    y0, x0 = region.frame
    to_ref = cv2.invertAffineTransform(affine.astype(np.float64))
    to_ref[:, 2] += (x0, y0)  # image -> region pixels
    if kind == "labels":
        return cv2.warpAffine(
            array.astype(np.float32),
            to_ref,
            (w, h),
            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        ).astype(array.dtype)
    if kind == "mask":
        src = (array > 0).astype(np.float32)
        out = cv2.warpAffine(
            src, to_ref, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT
        )
        return out > 0.35 if array.dtype == bool else (out > 0.35).astype(array.dtype) * array.max()
    return cv2.warpAffine(
        array.astype(np.float32),
        to_ref,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def sequential_grains(labels: np.ndarray) -> np.ndarray:
    """Grain ids 1..n (raster order) for the 4-connected regions of equal label: a cut-out or warped grain
    map whose grains may have been split by the frame edge or lost."""
    return label_components(labels, background=0, connectivity=1).astype(np.int32)


def image_truth(region: Region, affine: np.ndarray, visible: np.ndarray | None = None):
    """Exact truth in an exposure's image frame: (grain map, boundary network, boundaries visible at that
    tilt). The network is drawn afresh from the warped grain map (1 px lines); a pixel of it is visible when
    it lies within a pixel of a visible boundary pixel of the region mapped into the image."""
    grains = sequential_grains(warp_to_image(region, affine, region.grains, "labels"))
    boundaries = _boundary_network(grains)
    if visible is None:
        return grains, boundaries, None
    near = warp_to_image(
        region, affine, cv2.dilate(visible.astype(np.uint8), np.ones((3, 3), np.uint8)), "mask"
    )
    return grains, boundaries, boundaries & (near > 0)


def _beam_in_crystal(orientations: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Beam direction (n, 3) in each grain's crystal frame: R^T T^T z."""
    beam = _tilt_matrix(alpha, beta).T[:, 2]
    return (orientations * beam[None, :, None]).sum(axis=1)


def _excitation_errors(region: Region, cfg: TemConfig, alpha: float, beta: float):
    """Excitation errors s_g (n+1, m) in nm^-1 at the stage tilt, and their derivatives with respect to
    small extra tilts about x and y (per rad), used for the local tilt of the bent foil.

    s_g = (k^2 - |k0 + g|^2) / 2k ~ -u.g - g^2 / 2k with u the beam direction and k = 1/lambda.
    """
    g, _ = _fcc_reflections(cfg)
    k = 1.0 / electron_wavelength_nm(cfg.voltage_kv)
    g2 = (g**2).sum(axis=1)

    def s_at(a, b):
        u = _beam_in_crystal(region.orientations, a, b)
        return -(
            u[:, None, 0] * g[None, :, 0] + u[:, None, 1] * g[None, :, 1] + u[:, None, 2] * g[None, :, 2]
        ) - g2 / (2 * k)

    eps = 1e-4
    s0 = s_at(alpha, beta)
    ds_da = (s_at(alpha + eps, beta) - s_at(alpha - eps, beta)) / (2 * eps)
    ds_db = (s_at(alpha, beta + eps) - s_at(alpha, beta - eps)) / (2 * eps)
    return s0, ds_da, ds_db


def two_beam_intensity(s, thickness, xi):
    """Howie-Whelan two-beam diffracted intensity (pi t / xi)^2 sinc^2(t s_eff), s_eff = sqrt(s^2 + 1/xi^2)."""
    s_eff = np.sqrt(s * s + 1.0 / (xi * xi))
    return np.sin(np.pi * thickness * s_eff) ** 2 / (xi * s_eff) ** 2


@dataclass
class _Contrast:
    """Diffraction contrast at one tilt: BF brightness (H, W), the pixel-resolved part of the diffracted
    intensity (H, W), and per grain the effective excitation error of its strongest reflection (n+1,) and
    that reflection's extinction distance (n+1,)."""

    brightness: np.ndarray
    local_diffracted: np.ndarray
    grain_s_eff: np.ndarray
    grain_xi: np.ndarray


CONTRAST_CACHE = 32  # tilts whose contrast a region keeps (a series is rendered, then traced with guides)


def _diffraction(region: Region, cfg: TemConfig, alpha_deg: float, beta_deg: float) -> _Contrast:
    """The diffraction contrast at a tilt, kept for the last few tilts (it is deterministic)."""
    key = (cfg, float(alpha_deg), float(beta_deg))
    cache = region._contrast
    if key not in cache:
        if len(cache) >= CONTRAST_CACHE:
            del cache[next(iter(cache))]
        cache[key] = _compute_diffraction(region, cfg, alpha_deg, beta_deg)
    return cache[key]


def _compute_diffraction(region: Region, cfg: TemConfig, alpha_deg: float, beta_deg: float) -> _Contrast:
    """Bright field = absorption * (1 - sum over reflections of two-beam diffracted intensities).

    Per grain, the PIXEL_REFLECTIONS reflections that come nearest to a Bragg condition anywhere in the
    grain are evaluated per pixel (local bend tilt and thickness: bend contours, thickness fringes); the
    others are summed once per grain at its mean tilt and thickness.
    """
    s0, ds_da, ds_db = _excitation_errors(region, cfg, np.deg2rad(alpha_deg), np.deg2rad(beta_deg))
    _, xi = _fcc_reflections(cfg)
    s_mean = s0 + ds_da * region.grain_bend[:, :1] + ds_db * region.grain_bend[:, 1:]
    reach = np.abs(ds_da) * region.grain_bend_range[:, :1] + np.abs(ds_db) * region.grain_bend_range[:, 1:]
    closeness = np.maximum(np.abs(s_mean) - reach, 0) * xi  # in units of the rocking-curve width
    k = min(PIXEL_REFLECTIONS, xi.size)
    nearest = np.argsort(closeness, axis=1, kind="stable")[:, :k]
    intensity = two_beam_intensity(s_mean, region.grain_thickness[:, None], xi[None, :])
    diffuse = (DIFFUSE_STRENGTH * xi.min() / xi) / (1 + (s_mean * xi / DIFFUSE_WIDTH) ** 2)
    rows = np.arange(len(s0))[:, None]
    grain_rest = intensity.sum(axis=1) - intensity[rows, nearest].sum(axis=1) + diffuse.sum(axis=1)
    grain_s_eff = np.sqrt(s_mean[rows, nearest[:, :1]] ** 2 + xi[nearest[:, 0]][:, None] ** -2)[:, 0]

    labels = region.grains
    bend_a, bend_b = region.bend
    local = np.zeros(labels.shape, np.float32)
    for j in range(k):
        pick = nearest[:, j]
        s = s0[rows[:, 0], pick].astype(np.float32)[labels]
        s += ds_da[rows[:, 0], pick].astype(np.float32)[labels] * bend_a
        s += ds_db[rows[:, 0], pick].astype(np.float32)[labels] * bend_b
        local += two_beam_intensity(s, region.thickness, xi[pick].astype(np.float32)[labels])
    diffracted = np.minimum(local + grain_rest.astype(np.float32)[labels], MAX_DIFFRACTED)
    absorption = np.exp(-(region.thickness - cfg.foil_thickness_nm) / ABSORPTION_LENGTH_NM)
    return _Contrast((1 - diffracted) * absorption, local, grain_s_eff, xi[nearest[:, 0]])


def bend_contour_map(region: Region, cfg: TemConfig, alpha_deg: float, beta_deg: float) -> np.ndarray:
    """Float (H, W) in [0, 1]: high where bend contours darken a grain below its own mean at this tilt."""
    local = _diffraction(region, cfg, alpha_deg, beta_deg).local_diffracted
    excess = np.maximum(local - _grain_mean(region, local)[region.grains], 0)
    peak = float(excess.max())
    return excess / peak if peak > 0 else excess


def _grain_mean(region: Region, image: np.ndarray) -> np.ndarray:
    return np.bincount(
        region.grains.ravel(), weights=image.ravel(), minlength=region.n_grains + 1
    ) / np.maximum(region.grain_area, 1)


class FringeModel(NamedTuple):
    """Thickness fringes of every boundary (pair) at one tilt."""

    width: np.ndarray  # (P,) projected width of the inclined boundary plane (px)
    count: np.ndarray  # (P,) fringes across it: t * s_eff of the diffracting grain
    amplitude: np.ndarray  # (P,) depth of the fringes, set by how strongly that grain diffracts
    diffracting: np.ndarray  # (P,) grain id of the diffracting grain (the one nearer its Bragg condition)


def boundary_fringe_model(region: Region, cfg: TemConfig, alpha_deg, beta_deg, contrast=None) -> FringeModel:
    """Fringes at inclined boundaries. A boundary plane inclined to the beam projects to a band of width
    t * tan(inclination); across it the wedge of the grain that diffracts thins from t to 0 and gives
    t * s_eff fringes (Howie-Whelan: one per extinction depth 1 / s_eff). The diffracting grain is the one
    with the smaller effective excitation error; the fringe depth follows its two-beam diffracted intensity
    1 / (xi s_eff)^2, not the brightness difference of the two grains, so fringes also mark boundaries between
    grains of equal brightness whenever either diffracts."""
    if contrast is None:
        contrast = _diffraction(region, cfg, alpha_deg, beta_deg)
    normal = region.pair_normals @ _tilt_matrix(np.deg2rad(alpha_deg), np.deg2rad(beta_deg)).T
    nz = np.minimum(np.abs(normal[:, 2]), 0.999)
    cap = FRINGE_REACH * cfg.foil_thickness_nm / cfg.pixel_nm
    width = np.minimum(cfg.foil_thickness_nm * nz / np.sqrt(1 - nz * nz) / cfg.pixel_nm, cap)
    a, b = region.pairs[:, 0], region.pairs[:, 1]
    s_eff = contrast.grain_s_eff
    diffracting = np.where(s_eff[a] <= s_eff[b], a, b)
    count = np.maximum(region.grain_thickness[diffracting] * s_eff[diffracting], 1.0)
    strength = 1.0 / (contrast.grain_xi[diffracting] * s_eff[diffracting]) ** 2  # 1 at the Bragg condition
    return FringeModel(width, count, FRINGE_DEPTH * BRIGHTNESS * strength, diffracting)


def _boundary_fringes(region: Region, cfg: TemConfig, alpha_deg, beta_deg, contrast):
    """The fringe pattern on the pixels near boundaries (values to subtract)."""
    width, count, amplitude, _ = boundary_fringe_model(region, cfg, alpha_deg, beta_deg, contrast)
    p = region.fringe_pair
    w = np.maximum(width[p], 1e-3).astype(np.float32)
    rel = region.fringe_dist / w  # 0 at the boundary, 0.5 at the band edge
    profile = np.cos(2 * np.pi * count[p].astype(np.float32) * rel) * np.maximum(1 - (2 * rel) ** 2, 0)
    return amplitude[p].astype(np.float32) * profile * (width[p] >= 1.0)


class Shot(NamedTuple):
    """One exposure: image float32 (image_px, image_px) in [0, 1], in its own frame; visible bool, region
    sized (region.boundaries shape), the boundaries visible at its tilt; affine (2, 3), its true transform
    from reference-view pixels (x, y) to image pixels."""

    image: np.ndarray
    visible: np.ndarray
    affine: np.ndarray


def render(
    region: Region, cfg: TemConfig, alpha_deg: float, beta_deg: float, rng: np.random.Generator
) -> Shot:
    """One BF exposure at stage tilt (alpha about x, beta about y, degrees).

    The specimen is imaged in the region frame, then projected into the image by the exposure's affine
    (cos alpha / cos beta foreshortening, drift, rotation; see exposure_affine); illumination, PSF and
    noise belong to the detector frame. A boundary pixel is visible when the grains on either side differ
    in mean noise-free intensity by more than cfg.visibility_contrast.
    """
    contrast = _diffraction(region, cfg, alpha_deg, beta_deg)
    clean = BRIGHTNESS * contrast.brightness * (1 + cfg.mottle * region.mottle)
    level = _grain_mean(region, clean)
    a, b = region.pairs[:, 0], region.pairs[:, 1]
    pair_visible = np.abs(level[a] - level[b]) > cfg.visibility_contrast
    visible = np.zeros(clean.size, bool)
    visible[region.boundary_index] = pair_visible[region.boundary_pair]
    visible = visible.reshape(clean.shape)

    image = clean.ravel()
    image[region.fringe_index] -= _boundary_fringes(region, cfg, alpha_deg, beta_deg, contrast)
    affine = exposure_affine(cfg, alpha_deg, beta_deg, rng)
    image = warp_to_image(region, affine, image.reshape(clean.shape) * region.dust)

    # Uneven illumination: a linear ramp in a random direction and a small exposure change.
    h, w = image.shape
    angle = rng.uniform(0, 2 * np.pi)
    ramp_x = (np.arange(w, dtype=np.float32) / w - 0.5) * np.float32(np.cos(angle))
    ramp_y = (np.arange(h, dtype=np.float32) / h - 0.5) * np.float32(np.sin(angle))
    exposure = np.float32(1 + rng.normal(0, 0.03))
    image *= exposure * (1 + cfg.illumination_gradient * (ramp_y[:, None] + ramp_x[None, :]))

    if cfg.psf_sigma_px > 0:
        image = cv2.GaussianBlur(image, (0, 0), cfg.psf_sigma_px, borderType=cv2.BORDER_REFLECT)
    counts = rng.poisson(np.maximum(image, 0) * cfg.dose)
    image = counts.astype(np.float32) / np.float32(cfg.dose)
    image += rng.normal(0, cfg.read_noise, size=image.shape).astype(np.float32)
    return Shot(np.clip(image, 0, 1).astype(np.float32), visible, affine)


# --------------------------------------------------------------------------- simulated tracer


def trace(
    region: Region,
    visible: np.ndarray,
    tracer: TracerConfig,
    rng: np.random.Generator,
    spurious_guide: np.ndarray | None = None,
) -> np.ndarray:
    """A simulated human tracing of `visible` (a subset of region.boundaries): uint8 (H, W) in {0, 255}.

    Each boundary segment between junctions is skipped with probability miss_prob; the kept lines are
    inked like a pen, line_width_px wide on average with the width swelling and thinning smoothly along the
    stroke (PEN_VARIATION, over PEN_SCALE_PX), and displaced by a smooth random field (std jitter_px per axis,
    correlation length jitter_scale_px); the ink coverage is resampled bilinearly, so the lines stay
    smooth. Poisson(spurious_strokes) short smooth false strokes are added, following ridges of
    `spurious_guide` (e.g. bend contours) when given.
    """
    h, w = visible.shape
    keep = rng.random(region.n_segments + 1) >= tracer.miss_prob
    keep[0] = False  # off the network
    lines = visible & keep[region.segments]
    width = max(int(tracer.line_width_px + 0.5), 1)
    pen = (
        0.5
        * tracer.line_width_px
        * (1 + PEN_VARIATION * np.clip(smooth_field((h, w), PEN_SCALE_PX, rng), -2, 2))
    )
    big = np.float32(4 * (h + w))
    if lines.any():
        dist = cv2.distanceTransform((~lines).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    else:
        dist = np.full((h, w), big)

    # Jitter moves the lines, not the ink: the distance to the line is warped and rescaled by the local
    # stretch of the warp (sqrt of its Jacobian), so stretched stretches of line do not swell into blobs.
    shift = tracer.jitter_px * np.stack([smooth_field((h, w), tracer.jitter_scale_px, rng) for _ in range(2)])
    xs = np.arange(w, dtype=np.float32)[None, :] - shift[0]
    ys = np.arange(h, dtype=np.float32)[:, None] - shift[1]
    dist = cv2.remap(dist, xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=float(big))
    dxs_dy, dxs_dx = np.gradient(xs * np.ones((h, 1), np.float32))
    dys_dy, dys_dx = np.gradient(ys * np.ones((1, w), np.float32))
    stretch = np.sqrt(np.clip(np.abs(dxs_dx * dys_dy - dxs_dy * dys_dx), 0.25, 4.0))
    ink = np.clip(pen + 0.5 - dist / stretch, 0, 1)  # coverage of each pixel by the pen
    traced = (ink >= 0.5).astype(np.uint8)

    strokes = rng.poisson(tracer.spurious_strokes)
    guide = _StrokeGuide.from_map(spurious_guide) if strokes and spurious_guide is not None else None
    grain_px = float(np.sqrt(region.grain_area[1:].mean()))
    for _ in range(strokes):
        points = _stroke(guide, (h, w), rng.uniform(0.5, 1.5) * grain_px, rng)
        cv2.polylines(traced, [points], False, 1, thickness=width, lineType=cv2.LINE_8)
    return traced * np.uint8(255)


MAX_TURN_RAD = 0.1  # per step of a false stroke
PEN_VARIATION = 0.25  # relative std of a tracer's line width along a stroke
PEN_SCALE_PX = 20.0  # ... and the length over which it changes


@dataclass
class _StrokeGuide:
    """Where false strokes start (cumulative guide^2) and which way they run (guide gradient)."""

    cumulative: np.ndarray
    grad_x: np.ndarray
    grad_y: np.ndarray

    @classmethod
    def from_map(cls, guide: np.ndarray) -> _StrokeGuide | None:
        if not float(guide.max()) > 0:
            return None
        smooth = ndimage.gaussian_filter(guide.astype(np.float32), 3.0)
        grad_y, grad_x = np.gradient(smooth)
        return cls(np.cumsum(guide.astype(np.float64).ravel() ** 2), grad_x, grad_y)


def _stroke(guide: _StrokeGuide | None, shape, length: float, rng) -> np.ndarray:
    """A short smooth false stroke (int32 (N, 1, 2) x, y points) about `length` px long. With a guide it
    starts at a point drawn in proportion to guide^2 and runs along the guide's level lines (along a bend
    contour); otherwise it is a random gently curving line."""
    h, w = shape
    heading = rng.uniform(0, 2 * np.pi)
    if guide is not None:
        start = int(np.searchsorted(guide.cumulative, rng.uniform(0, guide.cumulative[-1])))
        y, x = divmod(min(start, h * w - 1), w)
    else:
        y, x = rng.uniform(0, h), rng.uniform(0, w)
    step = 1.5  # px per point
    points = [(x, y)]
    for _ in range(int(length / step)):
        heading += rng.normal(0, 0.08)
        if guide is not None:
            iy, ix = int(np.clip(y, 0, h - 1)), int(np.clip(x, 0, w - 1))
            gx, gy = guide.grad_x[iy, ix], guide.grad_y[iy, ix]
            if np.hypot(gx, gy) > 1e-6:
                along = np.arctan2(gx, -gy)  # perpendicular to the gradient
                if np.cos(along - heading) < 0:
                    along += np.pi
                turn = np.angle(np.exp(1j * (along - heading)))
                heading += float(np.clip(turn, -MAX_TURN_RAD, MAX_TURN_RAD))  # a hand turns smoothly
        x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        points.append((x, y))
    return np.round(np.array(points)).astype(np.int32).reshape(-1, 1, 2)
