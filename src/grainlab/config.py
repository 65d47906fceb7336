"""params.yaml -> frozen dataclasses.

This is the only module that imports the YAML library. Every setting has a typed default
(the embedded `demo` profile); params.yaml mirrors them. A profile is a set of dotted
overrides under `profiles:`; `--set key=value` overrides come last. An unknown key, a
wrong type or an out-of-range value is a ConfigError that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grainlab.errors import GrainlabError, clip, short

MAX_INT = 2**63 - 1  # every integer setting fits a 64-bit int (numpy and torch take no more)


class ConfigError(GrainlabError):
    pass


class _AnchorRefused(yaml.YAMLError):
    """An anchor (&name) or alias (*name) in a params document."""

    def __init__(self, kind: str, name: str, line: int):
        super().__init__(f"YAML {kind} {name!r} on line {line}")
        self.kind, self.name, self.line = kind, name, line


class ParamsLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases: an alias repeats a node without copying
    it, so a few hundred bytes of nested aliases expand to gigabytes (a "billion laughs").
    A params document spells every value out."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _AnchorRefused("alias", f"*{event.anchor}", event.start_mark.line + 1)
        if getattr(event, "anchor", None) is not None:
            raise _AnchorRefused("anchor", f"&{event.anchor}", event.start_mark.line + 1)
        return super().compose_node(parent, index)


def _parse_yaml(text: str):
    """A YAML document parsed with ParamsLoader; anything the parser raises is a yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 (ParamsLoader is a SafeLoader)
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise yaml.YAMLError("nested too deeply; expected a params document a few levels deep") from None
    except Exception as exc:  # e.g. an int of over 4300 digits, a date like 2020-13-45
        raise yaml.YAMLError(f"{type(exc).__name__}: {exc}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where, then what."""
    if isinstance(exc, _AnchorRefused):
        return (
            f"line {exc.line}: {exc.kind} {clip(exc.name, 40)!r}: YAML anchors and aliases are not "
            "allowed in params; expected every value written out"
        )
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return clip(where + str(problem) + (f" ({context})" if context else ""), 200)


def opt(default, lo=None, hi=None, choices=None, **kw):
    """A dataclass field with an allowed range [lo, hi] or a set of choices."""
    meta = {"lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def table(factory):
    """A dataclass field holding a dict of sub-sections (e.g. recipes by name)."""
    return field(default_factory=factory, metadata={})


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    root: str = "data"
    image_format: str = opt("png", choices=("png", "tiff16"))
    workers: int = opt(2, lo=1, hi=64)
    max_image_pixels: int = opt(100_000_000, lo=1)
    # pixels per request to a model server, all its images together: 2**22 (2048 x 2048) took
    # 10 to 16 s to trace on a 2-core CPU, well within the server's 60 s timeout (README, Reliability)
    serving_max_pixels: int = opt(4_194_304, lo=1)


@dataclass(frozen=True)
class TemConfig:
    """The thin-film BF TEM generator (grainlab.synth.tem). Lengths in nm unless named _px."""

    image_px: int = opt(256, lo=32, hi=8192)
    pixel_nm: float = opt(2.0, lo=0.01, hi=100.0)
    mean_grain_nm: float = opt(60.0, lo=1.0)  # mean equivalent-circle diameter (twins not counted)
    sigma_ln_d: float = opt(0.4, lo=0.1, hi=1.0)  # standard deviation of ln(diameter)
    twin_fraction: float = opt(0.15, lo=0.0, hi=1.0)  # fraction of grains holding annealing twins
    voltage_kv: float = opt(200.0, lo=20.0, hi=3000.0)
    lattice_nm: float = opt(0.405, lo=0.1, hi=2.0)  # FCC lattice parameter (Al)
    foil_thickness_nm: float = opt(80.0, lo=1.0)
    thickness_variation: float = opt(0.12, lo=0.0, hi=0.5)  # relative std of the smooth thickness field
    extinction_nm: float = opt(60.0, lo=1.0)  # extinction distance of {111}; higher orders scale from it
    bend_amplitude_deg: float = opt(1.5, lo=0.0, hi=20.0)  # largest local tilt from foil bending
    bend_scale_nm: float = opt(800.0, lo=1.0)  # correlation length of the foil bending
    boundary_waviness: float = opt(0.12, lo=0.0, hi=0.5)  # boundary wiggle, relative to the grain size
    mottle: float = opt(0.04, lo=0.0, hi=0.5)  # relative amplitude of the mottled texture in grains
    psf_sigma_px: float = opt(0.8, lo=0.0, hi=10.0)
    dose: float = opt(400.0, lo=1.0)  # electrons per pixel in the open beam
    read_noise: float = opt(0.01, lo=0.0, hi=1.0)
    dust_specks: float = opt(3.0, lo=0.0)  # mean number of contamination specks per image
    illumination_gradient: float = opt(0.15, lo=0.0, hi=1.0)
    visibility_contrast: float = opt(0.06, lo=0.0, hi=1.0)
    texture: str = opt("random", choices=("random", "fiber111"))  # grain orientations: random or <111> fibre
    texture_spread_deg: float = opt(4.0, lo=0.0, hi=45.0)  # std of the fibre axis about the film normal
    drift_px: float = opt(3.0, lo=0.0, hi=100.0)  # std of the image shift of each exposure, per axis
    rotation_deg: float = opt(0.3, lo=0.0, hi=10.0)  # std of the in-plane rotation of each exposure


@dataclass(frozen=True)
class TracerConfig:
    """A simulated human tracer."""

    line_width_px: float = opt(2.0, lo=1.0, hi=20.0)
    jitter_px: float = opt(0.6, lo=0.0, hi=20.0)  # std of the smooth line displacement, per axis
    jitter_scale_px: float = opt(15.0, lo=1.0)  # correlation length of that displacement
    miss_prob: float = opt(0.03, lo=0.0, hi=1.0)  # chance to skip a boundary segment between junctions
    spurious_strokes: float = opt(0.2, lo=0.0)  # mean number of false strokes per tracing


@dataclass(frozen=True)
class TiltConfig:
    """Stage tilts in degrees. `grid` recipes use the fixed grid; `unique` draw at random."""

    grid_alpha_deg: tuple[float, ...] = opt(
        (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    )  # a goniometer sweep in 1 degree steps: neighbouring exposures share part of their contrast
    grid_beta_deg: float = opt(0.0, lo=-60.0, hi=60.0)
    max_alpha_deg: float = opt(30.0, lo=0.0, hi=80.0)
    max_beta_deg: float = opt(15.0, lo=0.0, hi=80.0)


@dataclass(frozen=True)
class RecipeConfig:
    """How one training dataset is built from synthetic regions."""

    regions: int = opt(23, lo=1)
    pairs_per_region: int = opt(13, lo=1)
    tilt_mode: str = opt("grid", choices=("grid", "unique"))
    label_mode: str = opt("composite", choices=("composite", "per_image"))
    duplicate_fraction: float = opt(0.0, lo=0.0, hi=0.9)
    tracer: str = "careful"


@dataclass(frozen=True)
class TestSetConfig:
    regions: int = opt(4, lo=1)
    tilts_per_region: int = opt(5, lo=1)


def _default_tracers():
    return {
        "careful": TracerConfig(),
        "sloppy": TracerConfig(
            line_width_px=3.0, jitter_px=2.0, jitter_scale_px=8.0, miss_prob=0.15, spurious_strokes=1.5
        ),
    }


def _default_recipes():
    return {
        "lopez-toderas": RecipeConfig(23, 13, "grid", "composite", 0.15, "careful"),
        "grae": RecipeConfig(23, 13, "unique", "per_image", 0.0, "careful"),
        "gong": RecipeConfig(35, 14, "grid", "composite", 0.15, "sloppy"),
        "grae-large": RecipeConfig(35, 14, "unique", "per_image", 0.0, "careful"),
    }


@dataclass(frozen=True)
class UNetConfig:
    """The boundary U-Net (grainlab.boundaries.unet). depth counts levels: 5 = 4 downsamplings."""

    depth: int = opt(4, lo=2, hi=7)
    base_channels: int = opt(8, lo=1, hi=256)
    dropout: float = opt(0.1, lo=0.0, hi=0.9)
    norm: str = opt("batch", choices=("batch", "group", "none"))
    in_channels: int = opt(1, choices=(1, 3))


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities of the training augmentations (0 switches one off)."""

    flip: float = opt(0.5, lo=0.0, hi=1.0)
    rotate90: float = opt(0.5, lo=0.0, hi=1.0)
    brightness_contrast: float = opt(0.5, lo=0.0, hi=1.0)
    blur: float = opt(0.2, lo=0.0, hi=1.0)
    noise: float = opt(0.2, lo=0.0, hi=1.0)
    elastic: float = opt(0.1, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class PostprocessConfig:
    """Probability map -> one-pixel tracing -> grains (grainlab.boundaries.grains).

    method 'watershed' (smooth_px, marker_depth) closes every grain; 'skeleton' is the published
    pipeline (low/high hysteresis, dilate_px, min_hole_px, spur_px). min_grain_px and
    drop_edge_grains apply to both. border_px: a band along the image edges where the map is
    replaced by the values just inside it, so a bright scan edge never becomes a boundary.
    Training calibrates method, low, high, dilate_px, spur_px, marker_depth and min_grain_px
    on the validation split and stores them in the checkpoint (boundaries.postprocess_from).
    """

    method: str = opt("watershed", choices=("watershed", "skeleton"))
    smooth_px: float = opt(2.0, lo=0.0, hi=20.0)
    marker_depth: float = opt(0.005, lo=0.0, hi=1.0)
    low: float = opt(0.3, lo=0.0, hi=1.0)
    high: float = opt(0.6, lo=0.0, hi=1.0)
    dilate_px: int = opt(1, lo=0, hi=20)
    min_hole_px: int = opt(16, lo=0)
    spur_px: int = opt(10, lo=0)
    min_grain_px: int = opt(20, lo=0)
    drop_edge_grains: bool = False
    border_px: int = opt(0, lo=0, hi=64)  # ignore a band this wide along the image edges


@dataclass(frozen=True)
class BoundaryConfig:
    """Boundary tracing: model, training, inference and the poster study."""

    datasets_dir: str = "grain_boundaries"
    test_set: str = "test"
    test_image: int = opt(0, lo=0)
    test_max_images: int = opt(3, lo=0)
    unet: UNetConfig = field(default_factory=UNetConfig)
    dataset: str = "grae"  # the dataset of the pipeline's main model (`dvc exp run -S boundaries.loss=...`)
    loss: str = "bce"
    loss_args: dict[str, dict[str, Any]] = table(dict)
    epochs: int = opt(5, lo=1, hi=10_000)
    snapshot_epochs: tuple[int, ...] = opt((1, 3, 5))
    samples_per_epoch: int = opt(128, lo=0)
    crop_px: int = opt(80, lo=16, hi=4096)
    batch_size: int = opt(8, lo=1, hi=1024)
    lr: float = opt(5e-3, lo=1e-7, hi=1.0)
    val_fraction: float = opt(0.2, lo=0.0, hi=0.9)
    val_max_images: int = opt(3, lo=0)
    workers: int = opt(0, lo=0, hi=64)
    # validate and checkpoint every N epochs, and at the snapshot epochs and the last
    eval_every: int = opt(1, lo=1, hi=10_000)
    compile: bool = False  # torch.compile the training forward and backward
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # where trace / evaluate / serving take the post-processing from: the settings calibrated
    # on the validation split and stored in the checkpoint, or these params
    postprocess_from: str = opt("checkpoint", choices=("checkpoint", "params"))
    calibrate: bool = True  # search the post-processing settings at the end of training
    # what the search maximises: f1 (mean boundary F1) or f1_heyn (F1 minus |Heyn intercept error|)
    calibrate_objective: str = opt("f1", choices=("f1", "f1_heyn"))
    tta: bool = False  # dihedral test-time augmentation: mean logits of the 8 flips / rotations
    tile_px: int = opt(512, lo=16, hi=8192)
    tile_overlap: float = opt(0.125, lo=0.0, hi=0.75)
    tile_batch: int = opt(8, lo=1, hi=1024)
    tolerance_px: int = opt(2, lo=0, hi=20)
    study_datasets: tuple[str, ...] = opt(("lopez-toderas", "grae", "gong", "grae-large"))
    study_losses: tuple[str, ...] = opt(("bce", "mse", "focal"))
    # each study run is trained with seed + each of these offsets ([0]: the runs of `seed` alone)
    study_seeds: tuple[int, ...] = opt((0,))

    def __post_init__(self):
        if not self.study_seeds or len(set(self.study_seeds)) < len(self.study_seeds):
            raise ConfigError(
                f"boundaries.study_seeds = {list(self.study_seeds)}: expected distinct seed offsets, at least one"
            )
        for k in self.study_seeds:
            if not 0 <= k < 2**31:
                raise ConfigError(f"boundaries.study_seeds: offset {k} is outside 0..{2**31 - 1}")
        for e in self.snapshot_epochs:
            if not 1 <= e <= self.epochs:
                raise ConfigError(
                    f"boundaries.snapshot_epochs: epoch {e} is outside 1..{self.epochs} (boundaries.epochs)"
                )
        if self.postprocess.low > self.postprocess.high:
            raise ConfigError(
                f"boundaries.postprocess: low = {self.postprocess.low} is above high = {self.postprocess.high}"
            )


@dataclass(frozen=True)
class MicroConfig:
    """The steel micrograph library (grainlab.synth.micro): the quiz-1 and quiz-2 analogues."""

    image_px: int = opt(384, lo=64, hi=4096)
    optical_fraction: float = opt(0.5, lo=0.0, hi=1.0)
    quiz1_train: int = opt(134, lo=5)
    quiz1_quiz_known: int = opt(30, lo=0)
    quiz1_quiz_unknown: int = opt(6, lo=0)
    quiz1_px_per_um: tuple[float, float] = opt((1.0, 200.0))
    quiz1_quiz_px_per_um: tuple[float, float] = opt((1.1, 212.0))
    quiz2_train: int = opt(58, lo=6)
    quiz2_quiz: int = opt(21, lo=0)
    quiz2_px_per_um: tuple[float, ...] = opt((53.0, 106.0))

    def __post_init__(self):
        for key in ("quiz1_px_per_um", "quiz1_quiz_px_per_um", "quiz2_px_per_um"):
            values = getattr(self, key)
            if not values or min(values) <= 0 or list(values[:2]) != sorted(values[:2]):
                raise ConfigError(
                    f"microstructures.{key} = {short(list(values))}: expected positive px/um, low before high"
                )


@dataclass(frozen=True)
class CropAugmentConfig:
    """Training-crop augmentation (grainlab.recognition.augment); probabilities per crop."""

    rotate_prob: float = opt(0.5, lo=0.0, hi=1.0)
    flip_prob: float = opt(0.5, lo=0.0, hi=1.0)
    brightness_contrast: float = opt(0.25, lo=0.0, hi=1.0)
    dust_prob: float = opt(0.3, lo=0.0, hi=1.0)
    warp_prob: float = opt(0.2, lo=0.0, hi=1.0)
    noise_prob: float = opt(0.3, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class RecognitionConfig:
    """The magnification-aware triplet network, its open-set GMMs and crop-averaged prediction."""

    tasks: tuple[str, ...] = opt(("quiz1", "quiz2"))
    ablation: bool = True
    use_magnification: bool = True
    magnification_mode: str = opt("concat", choices=("concat", "film"))
    crop_px: int = opt(96, lo=16, hi=512)
    crop_min_px: int = opt(64, lo=8)
    crop_max_px: int = opt(256, lo=8)
    edge_channel: bool = True
    widths: tuple[int, ...] = opt((16, 32, 64, 128))
    descriptor_dim: int = opt(2, lo=1, hi=512)
    margin: float = opt(1.0, lo=0.0)
    mining: str = opt("semi-hard", choices=("batch-hard", "semi-hard"))
    members: int = opt(3, lo=1, hi=16)
    epochs: int = opt(30, lo=1)
    steps_per_epoch: int = opt(25, lo=1)
    crops_per_class: int = opt(12, lo=2)
    lr: float = opt(2e-3, lo=1e-6, hi=1.0)
    weight_decay: float = opt(1e-4, lo=0.0)
    augment: CropAugmentConfig = field(default_factory=CropAugmentConfig)
    gmm_components: int = opt(4, lo=1, hi=32)
    gmm_crops_per_image: int = opt(24, lo=1)
    none_percentile: float = opt(15.0, lo=0.0, hi=100.0)
    none_threshold: float | None = None
    # Held-out selection (recognition.select): these training images per class are held out from
    # the fit and pick gmm_components and none_percentile from the grids; 0: no selection, the
    # two values above are used as they are.
    holdout_fraction: float = opt(0.2, lo=0.0, hi=0.9)
    gmm_components_grid: tuple[int, ...] = opt((1, 2, 3, 4, 6))
    none_percentile_grid: tuple[float, ...] = opt((1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0))
    false_none_rate: float = opt(0.05, lo=0.0, hi=1.0)  # the most held-out known images answered "none"
    select_crops: int = opt(50, lo=1)  # crops averaged per held-out image
    predict_crops: int = opt(1000, lo=1)
    eval_crops: int = opt(300, lo=1)
    batch_size: int = opt(250, lo=1)
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    out_dir: str = "outputs/recognition"

    def __post_init__(self):
        if self.crop_min_px > self.crop_max_px:
            raise ConfigError(
                f"recognition.crop_min_px = {self.crop_min_px} > crop_max_px = {self.crop_max_px}; expected min <= max"
            )
        unknown = set(self.tasks) - {"quiz1", "quiz2"}
        if unknown:
            raise ConfigError(
                f"recognition.tasks: unknown task(s) {short(sorted(unknown))}; expected quiz1 and/or quiz2"
            )


@dataclass(frozen=True)
class BoundaryTuningConfig:
    """The boundary search: the loss (with each loss's own registered space), lr, optionally the recipe."""

    n_trials: int = opt(4, lo=1)
    dataset: str = "grae"
    datasets: tuple[str, ...] = opt(())  # non-empty: the recipe is searched over these too
    losses: tuple[str, ...] = opt(())  # empty: every registered loss
    lr: tuple[float, float] = opt((3e-4, 1e-2))
    epochs: int = opt(3, lo=1)
    samples_per_epoch: int = opt(48, lo=1)


@dataclass(frozen=True)
class RecognitionTuningConfig:
    """The recognition search: triplet margin, GMM threshold and components, lr, descriptor dimension."""

    n_trials: int = opt(3, lo=1)
    task: str = opt("quiz1", choices=("quiz1", "quiz2"))
    val_fraction: float = opt(0.25, lo=0.05, hi=0.5)
    margin: tuple[float, float] = opt((0.2, 2.0))
    none_percentile: tuple[float, float] = opt((0.5, 10.0))
    gmm_components: tuple[int, int] = opt((1, 6))
    lr: tuple[float, float] = opt((5e-4, 5e-3))
    descriptor_dims: tuple[int, ...] = opt((2, 3, 4))
    epochs: int = opt(10, lo=1)
    members: int = opt(1, lo=1, hi=16)  # the settings searched are each network's; 1 keeps trials cheap
    eval_crops: int = opt(100, lo=1)


@dataclass(frozen=True)
class TuningConfig:
    """Optuna studies. The storage URL comes from --storage or GRAINLAB_OPTUNA_STORAGE, never from here."""

    pruner: str = opt("median", choices=("median", "hyperband", "none"))
    heartbeat_s: int = opt(10, lo=1)
    grace_s: int = opt(30, lo=2)
    max_retry: int = opt(2, lo=0)
    out_dir: str = "outputs/tuning"
    boundaries: BoundaryTuningConfig = field(default_factory=BoundaryTuningConfig)
    recognition: RecognitionTuningConfig = field(default_factory=RecognitionTuningConfig)


@dataclass(frozen=True)
class Params:
    profile: str = "demo"
    seed: int = opt(0, lo=0, hi=2**31 - 1)  # numpy and sklearn take seeds below 2**32; seed + i stays below
    data: DataConfig = field(default_factory=DataConfig)
    tem: TemConfig = field(default_factory=TemConfig)
    tilts: TiltConfig = field(default_factory=TiltConfig)
    tracers: dict[str, TracerConfig] = table(_default_tracers)
    recipes: dict[str, RecipeConfig] = table(_default_recipes)
    test_set: TestSetConfig = field(default_factory=TestSetConfig)
    boundaries: BoundaryConfig = field(default_factory=BoundaryConfig)
    microstructures: MicroConfig = field(default_factory=MicroConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    profiles: dict[str, dict[str, Any]] = table(dict)

    def __post_init__(self):
        for name, recipe in self.recipes.items():
            if recipe.tracer not in self.tracers:
                raise ConfigError(
                    f"recipes.{clip(name)}.tracer: unknown tracer {short(recipe.tracer)}; "
                    f"expected one of {short(sorted(self.tracers))}"
                )
            unique = recipe.pairs_per_region - round(recipe.pairs_per_region * recipe.duplicate_fraction)
            if recipe.tilt_mode == "grid" and unique > len(self.tilts.grid_alpha_deg):
                raise ConfigError(
                    f"recipes.{clip(name)}: {unique} distinct grid tilts per region needed, but "
                    f"tilts.grid_alpha_deg has only {len(self.tilts.grid_alpha_deg)}"
                )


# --------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str, src: str, meta=None):
    """Check `value` against type `tp` and return it converted (lists to tuples, ints to floats);
    `meta` holds the allowed range of a setting (see `opt`)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected):
        raise ConfigError(f"{src}: {clip(key)} = {short(value)}: expected {expected}")

    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            bad(f"a mapping of {tp.__name__} settings")
        return _build(tp, value, key, src)
    if origin is dict:
        if not isinstance(value, dict):
            bad("a mapping")
        return {str(k): _convert(v, args[1], f"{key}.{k}", src) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", src) for i, v in enumerate(value))
        if len(value) != len(args):
            bad(f"a list of {len(args)} items")
        return tuple(
            _convert(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), key, src)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad("an integer")
        if not -MAX_INT - 1 <= value <= MAX_INT:
            _check_range(value, meta or {}, key, src)  # the setting's own range first, where it has one
            bad(f"an integer between {-MAX_INT - 1} and {MAX_INT}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad("a number")
        try:
            number = float(value)
        except OverflowError:
            bad("a finite number")
        if not math.isfinite(number):
            bad("a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            bad("a string")
        return value
    bad(_type_name(tp))


def _check_range(value, meta, key, src):
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{src}: {clip(key)} = {short(value)}: expected one of {list(choices)}")
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = (
            f"between {lo} and {hi}"
            if lo is not None and hi is not None
            else (f">= {lo}" if lo is not None else f"<= {hi}")
        )
        raise ConfigError(f"{src}: {clip(key)} = {short(value)}: expected a value {bounds}")


def _build(cls, raw: dict, prefix: str, src: str):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in known:
            where = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), known, n=3)
            names = ", ".join(sorted(known))
            if len(names) > 280:  # a long section: the names that fit, whole
                names = names[:280].rsplit(", ", 1)[0] + ", ..."
            expected = f"did you mean {' or '.join(close)}?" if close else f"expected one of {names}"
            raise ConfigError(f"{src}: unknown key {clip(where)!r}; {expected}")
    values = {}
    for name, f in known.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _convert(raw[name], hints[name], key, src, f.metadata)
        _check_range(value, f.metadata, key, src)
        values[name] = value
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{src}: {exc}") from None


def _set_dotted(raw: dict, dotted, value, src: str):
    dotted = str(dotted)
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{src}: cannot set {clip(dotted)!r}: {clip(p)!r} is not a section")
        node = child
    node[parts[-1]] = value


def _defaults_as_raw(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _defaults_as_raw(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _defaults_as_raw(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_defaults_as_raw(v) for v in obj]
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """'key.sub=value' -> ('key.sub', value), the value parsed as YAML (numbers, lists, ...);
    a value YAML cannot parse is taken as the text itself. Anchors and aliases are refused."""
    if "=" not in text:
        raise ConfigError(f"--set {short(text)}: expected KEY=VALUE, e.g. boundaries.epochs=3")
    key, _, value = text.partition("=")
    try:
        return key.strip(), _parse_yaml(value)
    except _AnchorRefused as exc:
        raise ConfigError(f"--set {short(text)}: {_yaml_problem(exc)}") from None
    except yaml.YAMLError:
        return key.strip(), value


def load_params(path: str | Path | None = "params.yaml", overrides=(), profile: str | None = None) -> Params:
    """Load params.yaml (or only the embedded defaults when path is None), apply the profile, then overrides."""
    src = str(path) if path is not None else "<defaults>"
    raw: dict = _defaults_as_raw(Params())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{src}: params file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{src}: not UTF-8 text (byte {exc.start}); expected a YAML params file"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{src}: cannot read the params file: {exc.strerror}") from None
        try:
            raw = _parse_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{src}: not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{src}: expected a mapping of sections at the top level")
    parsed = [parse_override(o) if isinstance(o, str) else o for o in overrides]
    chosen = f"{src}: profile"
    if profile is not None:
        chosen = "--profile"
    for key, value in parsed:
        if key == "profile":
            profile, chosen = value, "--set profile"
    if profile is None:
        profile, chosen = raw.get("profile", "demo"), f"{src}: profile"
    profiles = raw.get("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(
            f"{src}: profiles = {short(profiles)}: expected a mapping of profile names to overrides"
        )
    names = ["demo", *sorted(str(k) for k in profiles if k != "demo")]
    if not isinstance(profile, str):
        raise ConfigError(f"{chosen} = {short(profile)}: expected a profile name, one of {short(names)}")
    if profile != "demo" and profile not in profiles:
        raise ConfigError(f"{src}: profile {short(profile)} is not defined; expected one of {short(names)}")
    chosen_overrides = profiles.get(profile) or {}
    if not isinstance(chosen_overrides, dict):
        raise ConfigError(
            f"{src}: profiles.{clip(profile)} = {short(chosen_overrides)}: "
            "expected a mapping of dotted keys to values, e.g. {tem.image_px: 512}"
        )
    raw = dict(raw)
    raw["profile"] = profile
    for key, value in chosen_overrides.items():
        _set_dotted(raw, key, value, f"{src}: profiles.{clip(profile)}")
    for key, value in parsed:
        _set_dotted(raw, key, value, src)
    return _build(Params, raw, "", src)


def apply_overrides(params: Params, overrides: dict[str, Any], src: str = "<overrides>") -> Params:
    """A copy of params with dotted-key overrides applied and validated like params.yaml."""
    raw = _defaults_as_raw(params)
    for key, value in overrides.items():
        _set_dotted(raw, key, value, src)
    return _build(Params, raw, "", src)


def nest(overrides: dict[str, Any]) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}}: dotted overrides in params.yaml's shape."""
    out: dict = {}
    for key, value in overrides.items():
        _set_dotted(out, key, value, "<nest>")
    return out


def flatten(obj, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {'tem.image_px': 256, ...}, for MLflow params and `grainlab params`."""
    out: dict[str, Any] = {}
    raw = _defaults_as_raw(obj)

    def walk(node, pre):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{pre}.{k}" if pre else str(k))
        else:
            out[pre] = node

    walk(raw, prefix)
    return out


def to_dict(obj) -> dict:
    """A params dataclass (or section) as plain dicts and lists, e.g. to store in a checkpoint."""
    return _defaults_as_raw(obj)


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)
