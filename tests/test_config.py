from pathlib import Path

import pytest

from grainlab.cli import main
from grainlab.config import ConfigError, Params, flatten, load_params, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_equal_embedded_demo_defaults():
    # params.yaml mirrors the embedded defaults, so `make run` and the library agree.
    assert to_dict(load_params(ROOT / "params.yaml")) | {"profiles": {}} == to_dict(Params())


def test_paper_profile_keeps_pair_counts_and_grows_images():
    demo = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "params.yaml", profile="paper")
    assert paper.profile == "paper"
    assert paper.tem.image_px > demo.tem.image_px
    for name, recipe in demo.recipes.items():
        other = paper.recipes[name]
        assert recipe.regions * recipe.pairs_per_region == other.regions * other.pairs_per_region


def test_recipe_pair_counts_are_the_posters():
    p = load_params(None)
    counts = {name: r.regions * r.pairs_per_region for name, r in p.recipes.items()}
    assert counts == {"lopez-toderas": 299, "grae": 299, "gong": 490, "grae-large": 490}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("tem:\n  image_pxx: 3\n", "unknown key 'tem.image_pxx'"),
        ("temm:\n  image_px: 3\n", "unknown key 'temm'"),
        ("tem:\n  image_px: big\n", "tem.image_px = 'big': expected an integer"),
        ("tem:\n  image_px: 2.5\n", "expected an integer"),
        ("tem:\n  sigma_ln_d: 5\n", "tem.sigma_ln_d = 5.0: expected a value between 0.1 and 1.0"),
        ("tem:\n  twin_fraction: -0.1\n", "tem.twin_fraction"),
        ("data:\n  image_format: jpg\n", "expected one of ['png', 'tiff16']"),
        ("recipes:\n  x:\n    tracer: nobody\n", "unknown tracer 'nobody'"),
        ("recipes:\n  x:\n    tilt_mode: spiral\n", "recipes.x.tilt_mode = 'spiral'"),
        ("profile: huge\n", "profile 'huge' is not defined"),
        ("- a\n- b\n", "expected a mapping"),
        ("tem: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_params_name_the_key_and_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_overrides_profile_then_set(tmp_path):
    path = write(tmp_path, "profiles:\n  big:\n    tem.image_px: 512\n    seed: 3\n")
    p = load_params(path, ["seed=7"], profile="big")
    assert (p.tem.image_px, p.seed) == (512, 7)
    assert load_params(path, ["profile=big"]).tem.image_px == 512
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(path, ["seed"])


def test_flatten_gives_dotted_keys():
    flat = flatten(load_params(None))
    assert flat["tem.image_px"] == 256
    assert flat["recipes.gong.tracer"] == "sloppy"


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = write(tmp_path, "tem:\n  image_px: -4\n")
    code = main(["data", "synth", "--params", str(path), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("grainlab: error: ") and "tem.image_px = -4" in err
    assert "Traceback" not in err
    assert not (tmp_path / "d").exists()
