"""Faults survived end to end (issue 6): a training process killed with SIGKILL and resumed,
full and read-only output folders, bad input through the CLI, and the security defaults.

The SIGKILL test runs the real `grainlab boundaries train` process. The file-system tests
mount a tiny or a read-only tmpfs in a private mount namespace (`unshare`), so no real disk
fills up and they work as root, where chmod 0o555 would not stop anything; where unshare is
not allowed they skip, and in-process tests that make the writer fail with ENOSPC still run.
"""

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grainlab.boundaries.infer import read_checkpoint
from grainlab.boundaries.train import read_run_id, train_boundaries
from grainlab.cli import main
from grainlab.config import load_params
from test_boundaries_fixtures import write_data_root
from test_boundaries_train import TINY
from test_recognition_cli import FAST

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GRAINLAB = BIN / "grainlab"


def sets(*overrides):
    return [x for kv in overrides for x in ("--set", kv)]


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory):
    """A tiny steel micrograph library (for the recognition commands), built once per module."""
    from grainlab.datasets.microstructures import build_library
    from test_recognition_cli import TINY as MICRO

    root = tmp_path_factory.mktemp("library")
    build_library(MICRO, root, seed=0, workers=1)
    return root


# --------------------------------------------------------------------------- SIGKILL, then --resume

# Three short epochs of a tiny U-Net; the test-set snapshot at the last epoch only.
KILL_RUN = [
    *TINY,
    "boundaries.unet.depth=2",
    "boundaries.epochs=3",
    "boundaries.snapshot_epochs=[3]",
    "boundaries.val_max_images=1",
    "boundaries.test_max_images=1",
]


def _train_cmd(out: str):
    return [str(GRAINLAB), "boundaries", "train", "--dataset", "toy", "--loss", "bce", "--out", out]


def _metric_history(client, run_id: str) -> dict:
    """{metric: {step: value}} of a run's model metrics (no timings, no system metrics)."""
    out = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith(("time/", "system/")):
            continue
        by_step: dict[int, set] = {}
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, set()).add(m.value)
        # an epoch logged again after the kill must have logged the same value
        assert all(len(v) == 1 for v in by_step.values()), (key, by_step)
        out[key] = {step: v.pop() for step, v in by_step.items()}
    return out


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(project, tracking_uri, capsys):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)  # the store the subprocesses write to

    def runs_so_far():
        exp = client.get_experiment_by_name("grain-boundaries")
        return 0 if exp is None else len(client.search_runs([exp.experiment_id]))

    runs_before = runs_so_far()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ckpt = project / "killed" / "toy-bce" / "checkpoints" / "last.pt"
    victim = subprocess.Popen(
        [*_train_cmd("killed"), *sets(*KILL_RUN)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while not ckpt.exists():  # the first epoch's checkpoint: the process is now in epoch 2
        if victim.poll() is not None or time.monotonic() > deadline:
            victim.kill()
            pytest.fail(f"training ended before its first checkpoint:\n{victim.communicate()[0].decode()}")
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL

    # The kill left a whole checkpoint of an unfinished run, and no finished outputs.
    state = read_checkpoint(ckpt)  # weights_only=True; a torn file would not load
    assert 1 <= state["epoch"] < 3 and len(state["history"]) == state["epoch"]
    assert not (ckpt.parent.parent / "metrics.json").exists()
    run_id = read_run_id(ckpt.parent.parent)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody ended it: the process died

    # --resume through the CLI's entry point (in this process: one interpreter start less).
    capsys.readouterr()
    assert main([*_train_cmd("killed")[1:], "--resume", *sets(*KILL_RUN)]) == 0
    out = capsys.readouterr().out
    assert "epoch 3, val/loss" in out and run_id in out
    assert client.get_run(run_id).info.status == "FINISHED"
    assert runs_so_far() == runs_before + 1  # resumed in the same run, no second one

    # The same run uninterrupted, with the same params.yaml and overrides as the CLI's.
    train_boundaries(
        load_params("params.yaml", KILL_RUN), "toy", "bce", out_root=Path("full"), log_model=False
    )
    full = read_checkpoint(project / "full" / "toy-bce" / "checkpoints" / "last.pt")
    done = read_checkpoint(ckpt)
    assert done["epoch"] == full["epoch"] == 3
    assert done["model"].keys() == full["model"].keys()
    assert all(torch.equal(done["model"][k], full["model"][k]) for k in full["model"])
    opt_a, opt_b = done["optimizer"]["state"], full["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_b for k in opt_b[i])
    # exactly equal, NaN (an undefined metric of an empty tracing) matching NaN
    np.testing.assert_equal(done["history"], full["history"])
    np.testing.assert_equal(
        _metric_history(client, run_id), _metric_history(client, read_run_id(project / "full" / "toy-bce"))
    )
    np.testing.assert_equal(
        json.loads((ckpt.parent.parent / "metrics.json").read_text()),
        json.loads((project / "full" / "toy-bce" / "metrics.json").read_text()),
    )


# --------------------------------------------------------------------------- full disk, read-only folder


def _unshare_prefix() -> list[str] | None:
    """`unshare` for a private mount namespace (as a mapped root user when not root), if allowed."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    prefix = [exe, "--mount"] if os.geteuid() == 0 else [exe, "--map-root-user", "--mount"]
    try:
        probe = subprocess.run(
            [*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=8k tmpfs $d && umount $d"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


UNSHARE = _unshare_prefix()
needs_tmpfs = pytest.mark.skipif(
    UNSHARE is None, reason="cannot mount a tmpfs in a private mount namespace here (unshare not permitted)"
)


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden temporary files too) with its content hash."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_commands(spec_path: str, result_path: str):
    """Driver, run inside the mount namespace: each case's grainlab command through the CLI's
    entry point (as the `grainlab` script runs it), recording its exit status, what it printed
    on stderr (a traceback included, should one escape) and the files left on its mount."""
    import contextlib
    import io
    import traceback

    spec = json.loads(Path(spec_path).read_text())
    os.chdir(spec["cwd"])
    results = {}
    for case in spec["cases"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(case["argv"])
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                traceback.print_exc()
                code = "uncaught exception"
        results[case["name"]] = {"code": code, "stderr": err.getvalue(), "files": _tree(Path(case["mount"]))}
    Path(result_path).write_text(json.dumps(results))


REC_FAST = [*FAST, "recognition.ablation=false"]
MICRO_TINY = [
    "microstructures.image_px=72",
    "microstructures.quiz1_train=10",
    "microstructures.quiz1_quiz_known=3",
    "microstructures.quiz1_quiz_unknown=2",
    "microstructures.quiz2_train=6",
    "microstructures.quiz2_quiz=2",
]
FS_KINDS = {"full": "No space left on device", "read-only": "Read-only file system"}
FS_COMMANDS = ("data synth", "data import", "boundaries train", "recognition train")


def _fs_case(
    kind: str, command: str, mount: Path, project: Path, library: Path
) -> tuple[list[str], dict, str]:
    """(argv, files already on the mount, the output path the error must name)."""
    if command == "data synth":
        seed = {"data/microstructures/manifest.json": '{"old": true}\n'}
        only = ["--only", "microstructures"] if kind == "full" else []  # read-only fails at once anyway
        argv = ["data", "synth", *only, "--out", str(mount / "data"), "--workers", "1", *sets(*MICRO_TINY)]
        named = mount / "data" / ("microstructures" if kind == "full" else "grain_boundaries")
    elif command == "data import":
        seed = {"data/grain_boundaries/x/manifest.json": '{"old": true}\n'}
        argv = ["data", "import", str(project / "src"), "--name", "x", "--out", str(mount / "data")]
        argv.append("--replace")  # over the old dataset on the mount
        named = mount / "data" / "grain_boundaries" / "x"
    elif command == "boundaries train":
        seed = {}
        run = [*KILL_RUN, "boundaries.epochs=1", "boundaries.snapshot_epochs=[]"]
        argv = ["boundaries", "train", "--dataset", "toy", "--loss", "bce", "--out", str(mount), *sets(*run)]
        named = mount / "toy-bce" / "checkpoints"
    else:
        seed = {}
        argv = [
            "recognition",
            "train",
            "--data",
            str(library),
            "--out",
            str(mount / "models"),
            *sets(*REC_FAST),
        ]
        named = mount / "models"
    return argv, seed, str(named)


@pytest.fixture(scope="module")
def fs_faults(tmp_path_factory, tiny_library, tracking_uri):
    """Every (fault, command) case run once, in one process inside a private mount namespace:
    a 64 KiB tmpfs (8 KiB for the model outputs) for "full", a tmpfs remounted read-only for
    "read-only". Each mount starts with an old version of the output where there is one.
    Runs go to the module's MLflow store; the boundary runs it held before are noted."""
    from mlflow import MlflowClient

    if UNSHARE is None:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    from test_import import make_source

    project = tmp_path_factory.mktemp("faults")
    write_data_root(project / "data")
    (project / "params.yaml").write_text("profile: demo\n")
    make_source(project / "src", size=(128, 128))  # ~50 KB per noise image: 64 KiB fill up mid-import
    script, cases, seeds, expected = ["set -e"], [], {}, {}
    for kind in FS_KINDS:
        for command in FS_COMMANDS:
            name = f"{kind}/{command}"
            mount = project / "mnt" / kind.replace("-", "") / command.replace(" ", "-")
            mount.mkdir(parents=True)
            argv, seed, named = _fs_case(kind, command, mount, project, tiny_library)
            seed_dir = project / "seed" / kind / command.replace(" ", "-")
            for rel, text in seed.items():
                (seed_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (seed_dir / rel).write_text(text)
            size = "8k" if command.endswith("train") else "64k"
            script.append(f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))}")
            if seed:
                script.append(f"cp -a {shlex.quote(str(seed_dir))}/. {shlex.quote(str(mount))}/")
            if kind == "read-only":
                script.append(f"mount -o remount,ro {shlex.quote(str(mount))}")
            cases.append({"name": name, "argv": argv, "mount": str(mount)})
            seeds[name] = _tree(seed_dir) if seed else {}
            expected[name] = named
    spec, result = project / "spec.json", project / "result.json"
    spec.write_text(json.dumps({"cwd": str(project), "cases": cases}))
    driver = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_reliability as t; t._run_commands({str(spec)!r}, {str(result)!r})"
    )
    script.append(f"exec {shlex.quote(sys.executable)} -c {shlex.quote(driver)}")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grain-boundaries")
    runs_before = {r.info.run_id for r in client.search_runs([exp.experiment_id])} if exp else set()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run(
        [*UNSHARE, "sh", "-c", "\n".join(script)], cwd=project, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and result.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs_before, json.loads(result.read_text()), seeds, expected


def _check_fs_case(fs_faults, kind, command):
    _, results, seeds, named = fs_faults
    got = results[f"{kind}/{command}"]
    err = got["stderr"]
    assert got["code"] == 2, err
    assert "Traceback" not in err, err
    line = f"grainlab: error: {named[f'{kind}/{command}']}"
    assert line in err and FS_KINDS[kind] in err, err
    assert got["files"] == seeds[f"{kind}/{command}"]  # nothing new, nothing half-written, the old kept


@needs_tmpfs
@pytest.mark.parametrize("kind", list(FS_KINDS))
@pytest.mark.parametrize("command", ["data synth", "data import", "boundaries train"])
def test_full_or_read_only_output_is_a_clear_error_and_leaves_nothing(fs_faults, kind, command):
    _check_fs_case(fs_faults, kind, command)


@needs_tmpfs
def test_recognition_train_into_a_read_only_folder(fs_faults):
    _check_fs_case(fs_faults, "read-only", "recognition train")


@needs_tmpfs
def test_recognition_train_onto_a_full_disk(fs_faults):
    _check_fs_case(fs_faults, "full", "recognition train")


def test_failed_boundary_run_is_marked_failed_with_the_reason(fs_faults, tracking_uri):
    from mlflow import MlflowClient

    runs_before = fs_faults[0]
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("grain-boundaries").experiment_id])
    runs = [r for r in runs if r.info.run_id not in runs_before]
    # the read-only output folder is refused before any run starts; the full disk fails the run
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "No space left on device" in runs[0].data.tags["failure_reason"]


def test_enospc_from_the_image_writer_in_process(tmp_path, monkeypatch, capsys):
    """Where no tmpfs can be mounted: the disk 'fills up' at the third image written by an import."""
    from PIL import Image as PILImage

    from test_import import make_source

    src = make_source(tmp_path / "src")
    target = tmp_path / "data" / "grain_boundaries" / "x"
    real_save, calls = PILImage.Image.save, {"n": 0}

    def save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", save)
    argv = ["data", "import", str(src), "--name", "x", "--out", str(tmp_path / "data")]
    code = main([*argv, "--params", str(ROOT / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and calls["n"] == 3, err
    assert f"grainlab: error: {target}: cannot write (No space left on device)" in err
    assert list((tmp_path / "data" / "grain_boundaries").iterdir()) == []  # no dataset, no temporary folder


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root ignores file permissions; the read-only tmpfs tests cover it"
)
def test_chmod_read_only_output_folder(tmp_path, capsys):
    from test_import import make_source

    src = make_source(tmp_path / "src")
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        argv = [
            "data",
            "import",
            str(src),
            "--name",
            "x",
            "--out",
            str(out),
            "--params",
            str(ROOT / "params.yaml"),
        ]
        code = main(argv)
        err = capsys.readouterr().err
        assert (
            code == 2 and f"grainlab: error: {out / 'grain_boundaries'}" in err and "Permission denied" in err
        )
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


# --------------------------------------------------------------------------- bad input through the CLI


def _save_untrained_checkpoint(path: Path, in_channels: int = 1) -> Path:
    """A boundary checkpoint of an untrained tiny U-Net: enough to run `boundaries trace`."""
    from grainlab.boundaries.train import save_checkpoint
    from grainlab.boundaries.unet import UNetArgs, build_unet

    torch.manual_seed(0)
    args = UNetArgs(in_channels=in_channels, base_channels=4, depth=2)
    net = build_unet(args)
    save_checkpoint(path, {"model_args": args.to_dict(), "model": net.state_dict(), "params": {}, "epoch": 0})
    return path


def _grey_picture(h=40, w=70) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((np.sin(xx / 5.0) * np.cos(yy / 7.0) + 1) * 127.5).round().astype(np.uint8)


def _same_picture_in_other_formats(folder: Path, grey8: np.ndarray) -> dict[str, Path]:
    """The same picture as an 8-bit PNG, a 16-bit PNG and a float32 TIFF in [0, 1]."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"8-bit": folder / "p8.png", "16-bit": folder / "p16.png", "float": folder / "pf.tif"}
    Image.fromarray(grey8).save(paths["8-bit"])
    Image.fromarray(grey8.astype(np.uint16) * 257).save(paths["16-bit"])
    Image.fromarray(grey8.astype(np.float32) / 255).save(paths["float"])
    assert Image.open(paths["16-bit"]).mode.startswith("I;16") and Image.open(paths["float"]).mode == "F"
    return paths


def test_trace_normalises_16_bit_and_float_images_and_refuses_out_of_range_floats(project, capsys):
    ckpt = _save_untrained_checkpoint(project / "m.pt")
    paths = _same_picture_in_other_formats(project / "in", _grey_picture())
    small = project / "in" / "small.png"  # smaller than one 64 px tile
    Image.fromarray(_grey_picture(9, 13)).save(small)
    tile = ["--set", "boundaries.tile_px=64"]
    assert (
        main(
            [
                "boundaries",
                "trace",
                *map(str, paths.values()),
                str(small),
                "--model",
                str(ckpt),
                "--out",
                "t",
                *tile,
            ]
        )
        == 0
    )
    probs = {k: np.asarray(Image.open(project / "t" / f"{p.stem}-probability.png")) for k, p in paths.items()}
    assert np.array_equal(probs["8-bit"], probs["16-bit"]) and np.array_equal(probs["8-bit"], probs["float"])
    assert np.asarray(Image.open(project / "t" / "small-tracing.png")).shape == (9, 13)
    capsys.readouterr()

    Image.fromarray(np.full((8, 8), 300.0, np.float32)).save(project / "in" / "hot.tif")
    code = main(
        ["boundaries", "trace", str(project / "in" / "hot.tif"), "--model", str(ckpt), "--out", "t2", *tile]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{project / 'in' / 'hot.tif'}: float pixel values span 300..300; expected values in [0, 1]" in err
    assert not (project / "t2").exists()


def test_import_normalises_16_bit_and_float_micrographs(tmp_path):
    from grainlab.datasets.importer import import_dataset

    grey8 = _grey_picture()
    mask = np.zeros(grey8.shape, np.uint8)
    mask[20, :] = 255
    stored = {}
    for kind, path in _same_picture_in_other_formats(tmp_path / "pictures", grey8).items():
        src = tmp_path / "src" / kind
        (src / "images").mkdir(parents=True)
        (src / "masks").mkdir()
        shutil.copy(path, src / "images" / f"a-1{path.suffix}")
        Image.fromarray(mask).save(src / "masks" / "a-1.png")
        import_dataset(src, tmp_path / "out", kind.replace("-", ""))
        stored[kind] = np.asarray(Image.open(tmp_path / "out" / kind.replace("-", "") / "images" / "a-1.png"))
    assert np.array_equal(stored["8-bit"], grey8)
    assert np.array_equal(stored["16-bit"], grey8) and np.array_equal(stored["float"], grey8)


@pytest.mark.parametrize("name", ["../evil", "../../etc", "a/../../b"])
def test_import_name_with_dot_dot_through_the_cli(tmp_path, capsys, name):
    from test_import import make_source

    src = make_source(tmp_path / "src")
    out = tmp_path / "project" / "data"
    before = sorted(tmp_path.rglob("*"))
    code = main(
        ["data", "import", str(src), "--name", name, "--out", str(out), "--params", str(ROOT / "params.yaml")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"dataset name {name!r} is not a plain folder name" in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere


@pytest.fixture(scope="module")
def recognizer_dir(tmp_path_factory, tiny_library):
    """A tiny recognizer trained through the CLI (one short epoch) on the tiny library."""
    root = tmp_path_factory.mktemp("classify")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    (root / "params.yaml").write_text("profile: demo\n")
    assert (
        main(["recognition", "train", "--data", str(tiny_library), "--out", "models", *sets(*REC_FAST)]) == 0
    )
    yield root / "models" / "quiz1"
    mp.undo()


def test_classify_normalises_16_bit_and_float_and_refuses_images_smaller_than_a_crop(
    recognizer_dir, tiny_library, capsys
):
    root = recognizer_dir.parent.parent
    library_image = sorted((tiny_library / "quiz1" / "quiz").glob("*.png"))[0]
    grey8 = np.asarray(Image.open(library_image).convert("L"))
    printed = {}
    for kind, path in _same_picture_in_other_formats(root / "odd", grey8).items():
        argv = ["recognition", "classify", str(path), "--px-per-um", "20", "--model", str(recognizer_dir)]
        assert (
            main([*argv, "--crops", "30", "--out", str(root / "sal" / f"{kind}.png"), *sets(*REC_FAST)]) == 0
        )
        printed[kind] = capsys.readouterr().out.split("wrote")[0]
    assert "answer:" in printed["8-bit"]
    assert printed["16-bit"] == printed["8-bit"] and printed["float"] == printed["8-bit"]
    for size in ((1, 1), (20, 40)):
        path = root / "odd" / f"small-{size[0]}x{size[1]}.png"
        Image.fromarray(np.zeros(size, np.uint8)).save(path)
        argv = ["recognition", "classify", str(path), "--px-per-um", "20", "--model", str(recognizer_dir)]
        assert main([*argv, *sets(*REC_FAST)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: {size[1]}x{size[0]} pixels is smaller than the smallest crop (32 px" in err
        assert "Traceback" not in err


# --------------------------------------------------------------------------- security defaults

SERVER_PROGRAMS = (
    "mlflow ui",
    "mlflow server",
    "mlflow models serve",
    "optuna-dashboard",
    "uvicorn",
    "gunicorn",
)


def test_every_server_the_makefile_starts_binds_to_loopback_unless_asked():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", text, re.M)
    recipes = [line for line in text.splitlines() if line.startswith("\t")]
    server_lines = [line for line in recipes if any(p in line for p in SERVER_PROGRAMS)]
    assert len(server_lines) >= 3  # the MLflow UI and both model servers
    for line in server_lines:
        assert "--host $(HOST)" in line, line
    dry = subprocess.run(
        ["make", "-n", "-s", "ui", "serve", "serve-recognizer"], cwd=ROOT, capture_output=True, text=True
    )
    servers = [line for line in dry.stdout.splitlines() if any(p in line for p in SERVER_PROGRAMS)]
    assert len(servers) == 3 and all("--host 127.0.0.1 " in line for line in servers), dry.stdout
    exposed = subprocess.run(
        ["make", "-n", "-s", "ui", "HOST=0.0.0.0"], cwd=ROOT, capture_output=True, text=True
    )
    assert "--host 0.0.0.0 " in exposed.stdout  # only when the user asks for it
    for path in [ROOT / "dvc.yaml", *sorted((ROOT / "src").rglob("*.py"))]:  # no server there binds to all
        assert "0.0.0.0" not in path.read_text(), path


def test_no_credentials_in_params_yaml():
    import yaml

    text = (ROOT / "params.yaml").read_text()
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), "a URL with a password in params.yaml"

    def keys(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield f"{prefix}{k}", v
                yield from keys(v, f"{prefix}{k}.")

    secret = re.compile(r"pass(word)?|secret|token|api_?key|credential", re.I)
    found = [(k, v) for k, v in keys(yaml.safe_load(text)) if secret.search(k.split(".")[-1]) and v]
    assert found == []


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://alice:s3cret@db.example:5432/optuna", "postgresql://alice:***@db.example:5432/optuna"),
        ("postgresql+psycopg://bob:p%40ss@127.0.0.1/db", "postgresql+psycopg://bob:***@127.0.0.1/db"),
        ("https://carol:tok-123@mlflow.example/", "https://carol:***@mlflow.example/"),
        ("postgresql://eve:p@ss/w@db:5432/x", "postgresql://eve:***@db:5432/x"),  # unencoded @ and /
        ("error at postgresql://eve:s3cret@db/x: refused", "error at postgresql://eve:***@db/x: refused"),
        ("postgresql://dave@127.0.0.1:5432/db", "postgresql://dave@127.0.0.1:5432/db"),  # no password
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
    ],
)
def test_mask_url_hides_passwords(url, shown):
    from grainlab.tracking import mask_url

    assert mask_url(url) == shown


def test_cli_errors_print_the_tracking_url_masked(project, monkeypatch, capsys):
    """MLflow's own error quotes the tracking URL in full; the CLI's error line must not."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:hunter2@127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    import mlflow

    Image.fromarray(_grey_picture()).save(project / "p.png")
    previous = mlflow.get_tracking_uri()
    try:
        code = main(["boundaries", "trace", "p.png", "--model", "runs:/0123456789abcdef/model", "--out", "t"])
    finally:
        mlflow.set_tracking_uri(previous)  # the CLI set mlflow's global URI to the unreachable server
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "hunter2" not in err and "user:***@127.0.0.1:1" in err


def test_model_files_load_with_weights_only():
    calls = [
        (path, line)
        for path in sorted((ROOT / "src").rglob("*.py"))
        for line in path.read_text().splitlines()
        if "torch.load(" in line and not line.lstrip().startswith("#") and '"""' not in line
    ]
    assert calls and all("weights_only=True" in line for _, line in calls), calls
    for path in sorted((ROOT / "src").rglob("*.py")):
        assert not re.search(
            r"^\s*(import pickle|from pickle|import dill|import joblib)", path.read_text(), re.M
        ), path
