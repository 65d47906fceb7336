"""Bad input gives one clear error line (issue 15): YAML alias bombs, wrong types and ranges in
the settings, nonsense pixel sizes and magnifications, crop counts, corrupt or malicious model
files. Each case: exit status 2, one line naming the file or key, the value and what was
expected, no traceback, no line over 500 characters, and nothing written."""

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from grainlab.cli import main
from grainlab.config import ConfigError, load_params
from test_reliability import _grey_picture, _save_untrained_checkpoint, sets

MAX_LINE = 500


def cli_error(capsys, argv) -> str:
    """Run the CLI; it must fail with exit status 2 and one short error line. Returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith("grainlab: error: ") and len(lines[0]) <= MAX_LINE, lines[0][:1000]
    return lines[0]


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def bomb(levels: int, indent: str = "", key: str = "a") -> str:
    """Nested YAML aliases: `levels` lines expand to 9**levels strings."""
    lines = [f'{indent}{key}0: &{key}0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"{indent}{key}{i}: &{key}{i} [" + ",".join([f"*{key}{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- YAML alias bombs


def test_alias_bomb_in_a_section_is_refused_at_once(tmp_path):
    # 9**6 strings at tem.image_px: before, the error line quoted all of them (megabytes); with
    # the nine levels of the 519-byte file, 57 s, 8.5 GB and a 2 GiB line
    path = write(tmp_path, "params.yaml", bomb(6) + "tem:\n  image_px: *a5\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert message.startswith(f"{path}: not valid YAML: line 1: anchor '&a0'")
    assert "anchors and aliases are not allowed" in message and len(message) < MAX_LINE


def test_alias_bomb_through_a_verb_that_loads_params(tmp_path, capsys):
    path = write(tmp_path, "params.yaml", bomb(6) + "tem:\n  image_px: *a5\n")
    out = tmp_path / "out"
    line = cli_error(capsys, ["data", "synth", "--params", str(path), "--out", str(out)])
    assert f"{path}: not valid YAML: line 1: anchor '&a0'" in line
    assert not out.exists()


def test_alias_bomb_in_an_unused_profile_is_refused(tmp_path):
    # before, the 849-byte version hit a MemoryError; an alias anywhere is refused now, used or not
    path = write(tmp_path, "params.yaml", "profiles:\n  unused:\n" + bomb(4, indent="    "))
    with pytest.raises(ConfigError, match=r"line 3: anchor '&a0': YAML anchors and aliases are not allowed"):
        load_params(path)


def test_a_lone_alias_names_its_line(tmp_path):
    path = write(tmp_path, "params.yaml", "seed: 3\ntem:\n  image_px: *nowhere\n")
    with pytest.raises(ConfigError, match=r"line 3: alias '\*nowhere'"):
        load_params(path)


def test_set_with_aliases_is_refused():
    with pytest.raises(ConfigError, match=r"--set 'tilts.grid_alpha_deg=\[&a 1, \*a\]': line 1: anchor '&a'"):
        load_params(None, ["tilts.grid_alpha_deg=[&a 1, *a]"])


# --------------------------------------------------------------------------- wrong types and ranges


@pytest.mark.parametrize(
    "text, overrides, fragment",
    [
        ("profile: demo\n", ["profile=[1]"], "--set profile = [1]: expected a profile name, one of ['demo']"),
        ("profile: [1]\n", [], "params.yaml: profile = [1]: expected a profile name, one of ['demo']"),
        (
            "profile: paper\nprofiles: {paper: [1, 2]}\n",
            [],
            "params.yaml: profiles.paper = [1, 2]: expected a mapping of dotted keys to values",
        ),
        ("profile: paper\nprofiles: {paper: {1: 2}}\n", [], "params.yaml: unknown key '1'"),
        (
            "profile: x\nprofiles: {1: {}, b: {}}\n",
            [],
            "params.yaml: profile 'x' is not defined; expected one of ['demo', '1', 'b']",
        ),
        (
            "seed: 0\n",
            ["seed=99999999999999999999999999"],
            "seed = 99999999999999999999999999: expected a value between 0 and 2147483647",
        ),
        ("seed: 4294967296\n", [], "seed = 4294967296: expected a value between 0 and 2147483647"),
        ("tem:\n  mottle: " + "9" * 400 + "\n", [], "tem.mottle = 99999"),
        (
            "recipes:\n  gong:\n    regions: 99999999999999999999999999\n",
            [],
            "recipes.gong.regions = 99999999999999999999999999: expected an integer between",
        ),
        ("seed: " + "9" * 5000 + "\n", [], "not valid YAML: ValueError: Exceeds the limit"),
        ("[" * 3000 + "\n", [], "not valid YAML: nested too deeply"),
        ("tem:\n  image_px: 2020-13-45\n", [], "not valid YAML: ValueError: month must be in 1..12"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, capsys, text, overrides, fragment):
    path = write(tmp_path, "params.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_params(path, overrides)
    assert fragment in str(err.value) and len(str(err.value)) < MAX_LINE, str(err.value)[:1000]
    line = cli_error(capsys, ["data", "synth", "--params", str(path), *sets(*overrides), "--out", "d"])
    assert fragment in line
    assert not (tmp_path / "d").exists()


def test_not_utf8_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 1\n\xff\xfe\n")
    with pytest.raises(
        ConfigError, match=r"params.yaml: not UTF-8 text \(byte 8\); expected a YAML params file"
    ):
        load_params(path)


def test_long_values_are_cut_in_error_messages(tmp_path, capsys):
    long = "x" * 100_000
    with pytest.raises(ConfigError) as err:
        load_params(None, [f"tem.image_px={long}"])
    assert "tem.image_px = 'xxxx" in str(err.value) and "..." in str(err.value)
    assert len(str(err.value)) < MAX_LINE
    with pytest.raises(ConfigError) as err:
        load_params(None, [f"{long}=1"])
    assert "unknown key 'xxx" in str(err.value) and len(str(err.value)) < MAX_LINE
    path = write(tmp_path, "params.yaml", f"profile: {long}\n")
    line = cli_error(capsys, ["data", "synth", "--params", str(path), "--out", "d"])
    assert "profile 'xxx" in line


def test_bad_loss_argument_names_the_key(project, capsys):
    line = cli_error(
        capsys,
        [
            "boundaries",
            "train",
            "--dataset",
            "toy",
            "--loss",
            "focal",
            "--out",
            "runs",
            *sets("boundaries.loss_args.focal.gamma=abc"),
        ],
    )
    assert "boundaries.loss_args.focal = {'gamma': 'abc'}: could not convert string to float: 'abc'" in line
    assert "expected the arguments of loss 'focal': (alpha: float = 0.25, gamma: float = 2.0)" in line
    assert not (project / "runs").exists()


# --------------------------------------------------------------------------- pixel sizes


@pytest.mark.parametrize("value", ["1e308", "nan", "inf", "-inf", "0", "-2", "1e-300"])
def test_trace_refuses_nonsense_pixel_sizes_before_writing(project, capsys, value):
    ckpt = _save_untrained_checkpoint(project / "m.pt")
    Image.fromarray(_grey_picture()).save(project / "p.png")
    argv = ["boundaries", "trace", "p.png", "--model", str(ckpt), "--out", "t", f"--pixel-size={value}"]
    line = cli_error(capsys, [*argv, *sets("boundaries.tile_px=64")])
    assert f"--pixel-size = {float(value)!r}: expected the pixel size in nanometres" in line
    assert "between 0.001 and 1000000 nm" in line
    assert not (project / "t").exists()  # before, 1e308 left four PNGs and no stats


def test_trace_takes_a_sensible_pixel_size(project, capsys):
    ckpt = _save_untrained_checkpoint(project / "m.pt")
    Image.fromarray(_grey_picture()).save(project / "p.png")
    argv = ["boundaries", "trace", "p.png", "--model", str(ckpt), "--out", "t", "--pixel-size", "2.5"]
    assert main([*argv, *sets("boundaries.tile_px=64")]) == 0
    assert (project / "t" / "stats.json").is_file()


@pytest.mark.parametrize("value", ["1e308", "nan", "0"])
def test_import_refuses_nonsense_pixel_sizes(tmp_path, capsys, value):
    from test_import import make_source

    src = make_source(tmp_path / "src")
    out = tmp_path / "project" / "data"
    argv = ["data", "import", str(src), "--name", "mine", "--out", str(out), "--pixel-size", value]
    line = cli_error(capsys, argv)
    assert f"--pixel-size = {float(value)!r}: expected the pixel size in nanometres" in line
    assert not out.exists()


# --------------------------------------------------------------------------- recognition classify


def _untrained_recognizer(folder):
    """A tiny untrained recognizer (two classes, one network): enough to run `recognition classify`."""
    from grainlab.recognition.model import TripletNet
    from grainlab.recognition.openset import OpenSetGMM
    from grainlab.recognition.predict import Recognizer

    torch.manual_seed(0)
    args = {"in_channels": 2, "widths": [4, 8], "descriptor_dim": 2}
    gmm = OpenSetGMM(["a", "b"], [[1.0], [1.0]], [[[0.0, 0.0]], [[1.0, 1.0]]], [np.eye(2)[None]] * 2, -50.0)
    meta = {
        "model_args": args,
        "classes": ["a", "b"],
        "px_per_um_range": [1.0, 100.0],
        "crop_px": 32,
        "crop_min_px": 32,
        "crop_max_px": 48,
        "edge_channel": True,
        "params": {},
    }
    return Recognizer([TripletNet(**args)], [gmm], meta, torch.device("cpu")).save(folder)


@pytest.fixture
def classify(tmp_path, monkeypatch):
    """argv for `recognition classify` of a picture with a tiny untrained model (cwd: tmp_path)."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "params.yaml", "profile: demo\n")
    Image.fromarray(_grey_picture(64, 80)).save(tmp_path / "p.png")
    model = _untrained_recognizer(tmp_path / "model")
    return ["recognition", "classify", "p.png", "--model", str(model), "--out", "sal.png"]


def test_classify_works_with_the_tiny_model(classify, capsys, tmp_path):
    assert main([*classify, "--px-per-um", "20", "--crops", "5"]) == 0
    assert "answer:" in capsys.readouterr().out and (tmp_path / "sal.png").is_file()


@pytest.mark.parametrize("crops", ["-1", "0", "1000001"])
def test_classify_refuses_crop_counts_below_one(classify, capsys, tmp_path, crops):
    # before: -1 was a traceback and 0 silently meant recognition.predict_crops
    line = cli_error(capsys, [*classify, "--px-per-um", "20", "--crops", crops])
    assert f"--crops = {crops}: expected a number of crops between 1 and 1000000" in line
    assert not (tmp_path / "sal.png").exists()


@pytest.mark.parametrize("value", ["1e300", "1e-300", "0.001", "20000"])
def test_classify_refuses_magnifications_outside_a_sensible_range(classify, capsys, tmp_path, value):
    line = cli_error(capsys, [*classify, "--px-per-um", value, "--crops", "5"])
    assert f"--px-per-um = '{value}': expected the magnification in pixels per micrometre" in line
    assert "between 0.01 and 10000" in line
    assert not (tmp_path / "sal.png").exists()


def test_classify_error_line_is_cut_for_a_huge_argument(classify, capsys):
    line = cli_error(capsys, [*classify, "--px-per-um", "x" * 20_000])
    assert "--px-per-um = 'xxx" in line


class _Payload:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_model_files(folder):
    """model.pt files of every bad kind: {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "PWNED"
    files = {
        "random": os.urandom(4096),
        "empty": b"",
        "text": b"this is not a checkpoint\n",
    }
    out = {}
    for kind, data in files.items():
        out[kind] = folder / kind / "model.pt"
        out[kind].parent.mkdir()
        out[kind].write_bytes(data)
    out["pickle"] = folder / "pickle" / "model.pt"
    out["pickle"].parent.mkdir()
    out["pickle"].write_bytes(pickle.dumps({"state_dicts": _Payload(marker)}, protocol=4))
    out["torch-save"] = folder / "torch-save" / "model.pt"
    out["torch-save"].parent.mkdir()
    torch.save({"state_dicts": [_Payload(marker)], "model_args": {}}, out["torch-save"])
    out["foreign-dict"] = folder / "foreign-dict" / "model.pt"
    out["foreign-dict"].parent.mkdir()
    torch.save({"state_dicts": [{"w": torch.zeros(2)}], "model_args": {"nonsense": 1}}, out["foreign-dict"])
    return out, marker


def test_classify_with_corrupt_or_malicious_model_files(classify, capsys, tmp_path):
    files, marker = _bad_model_files(tmp_path / "bad")
    for kind, path in files.items():
        argv = [*classify[:3], "--model", str(path.parent), "--px-per-um", "20", "--crops", "5"]
        line = cli_error(capsys, argv)
        assert f"{path}: not a" in line and "recognition checkpoint" in line, (kind, line)
        assert "expected a model.pt written by `grainlab recognition train`" in line, (kind, line)
        assert "weights_only" not in line and "arbitrary code" not in line, (kind, line)
    assert not marker.exists()  # no pickled code ran
    assert not (tmp_path / "sal.png").exists()


def test_trace_with_corrupt_or_malicious_checkpoints(project, capsys):
    files, marker = _bad_model_files(project / "bad")
    Image.fromarray(_grey_picture()).save(project / "p.png")
    for kind, path in files.items():
        line = cli_error(capsys, ["boundaries", "trace", "p.png", "--model", str(path), "--out", "t"])
        assert f"{path}: not a" in line and "checkpoint" in line, (kind, line)
        assert "weights_only" not in line and "arbitrary code" not in line, (kind, line)
    assert not marker.exists()
    assert not (project / "t").exists()
