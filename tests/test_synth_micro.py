"""The steel micrograph generator: determinism, physical scale and band-limiting."""

import numpy as np
import pytest

from grainlab.synth import micro


@pytest.mark.parametrize("cls", micro.CLASSES)
def test_every_class_renders_grey_float_image(cls):
    img = micro.render(cls, (48, 64), 20.0, "sem", np.random.default_rng(0))
    assert img.shape == (48, 64) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0


def test_render_is_deterministic_per_generator_seed():
    a = micro.render("pearlite", (64, 64), 30.0, "optical", np.random.default_rng(5))
    b = micro.render("pearlite", (64, 64), 30.0, "optical", np.random.default_rng(5))
    c = micro.render("pearlite", (64, 64), 30.0, "optical", np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_lamellae_below_the_pixel_fade_to_their_mean():
    u = np.linspace(0, 40, 4000, dtype=np.float32)
    resolved = micro._lamellae(u, 0.3, 0.2, px_per_um=100.0)
    blurred = micro._lamellae(u, 0.3, 0.2, px_per_um=1.0)
    assert resolved.max() - resolved.min() > 0.9
    assert blurred.max() - blurred.min() < 1e-3 and abs(blurred.mean() - 0.2) < 1e-3


def test_fine_carbides_blur_into_grey_at_low_magnification():
    def canvas(m):
        xs = (np.arange(128, dtype=np.float32) + 0.5) / m
        x, y = np.meshgrid(xs, xs)
        return micro.Canvas(x, y, m, np.random.default_rng(1), 7)

    coarse = micro._particles(canvas(1.0), 0.3, 0.1)
    fine = micro._particles(canvas(100.0), 0.3, 0.1)
    assert coarse.std() < 0.1 < fine.std()
    assert abs(coarse.mean() - fine.mean()) < 0.05


def test_physical_scale_grain_count_follows_magnification():
    # The same grain size gives ~4x more boundary pixels per pixel at half the magnification.
    lo = micro.render("ferrite", (128, 128), 2.0, "optical", np.random.default_rng(3))
    hi = micro.render("ferrite", (128, 128), 50.0, "optical", np.random.default_rng(3))
    assert np.abs(np.diff(lo, axis=1)).mean() > np.abs(np.diff(hi, axis=1)).mean()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="class"):
        micro.render("cheese", (8, 8), 1.0, "sem", np.random.default_rng(0))
    with pytest.raises(ValueError, match="px_per_um"):
        micro.render("ferrite", (8, 8), 0.0, "sem", np.random.default_rng(0))
    with pytest.raises(ValueError, match="style"):
        micro.render("ferrite", (8, 8), 1.0, "xray", np.random.default_rng(0))


def test_ferrite_pearlite_is_a_mixture_of_bright_ferrite_and_dark_pearlite():
    xs = (np.arange(256, dtype=np.float32) + 0.5) / 4.0
    x, y = np.meshgrid(xs, xs)
    for seed in range(3):  # phase 1 = bright ferrite; pearlite islands are darker on average
        phase = micro.ferrite_pearlite(micro.Canvas(x, y, 4.0, np.random.default_rng(seed), seed))
        assert np.mean(phase > 0.78) > 0.2 and np.mean(phase < 0.7) > 0.1
