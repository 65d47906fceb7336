"""Issue 15 for the data commands: nothing lost, nothing hung, nothing leaked.

`data synth` replaces only the folders it generates, `data import` never overwrites a
dataset unasked nor takes a synthetic dataset's name, a killed synth leaves no worker
processes and its debris is removed by the next run and ignored by DVC, and bad
arguments give one error line.
"""

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grainlab.cli import main
from grainlab.datasets.folder import load_dataset, load_test_set
from test_import import PARAMS, make_source

BIN = Path(sys.executable).parent
RECIPES = ("lopez-toderas", "grae", "gong", "grae-large")
TINY = ["tem.image_px=64", "test_set.regions=1", "test_set.tilts_per_region=2"] + [
    f"recipes.{r}.{k}={v}" for r in RECIPES for k, v in (("regions", 1), ("pairs_per_region", 2))
]


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def synth(out: Path, *extra: str, workers: int = 1) -> int:
    argv = ["data", "synth", "--only", "grain_boundaries", "--out", str(out), "--params", str(PARAMS)]
    return main([*argv, "--workers", str(workers), *sets(*TINY), *extra])


def data_import(src: Path, out: Path, name: str, *extra: str) -> int:
    return main(
        ["data", "import", str(src), "--name", name, "--out", str(out), "--params", str(PARAMS), *extra]
    )


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(root: Path) -> list[Path]:
    """grainlab's temporary names (staged_dir, atomic_path) anywhere under root."""
    return sorted(p for p in root.rglob(".*") if p.name.endswith(".tmp") or p.name.endswith(".old"))


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("grainlab: error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- item 1


def test_synth_replaces_only_its_own_folders(tmp_path, capsys):
    data = tmp_path / "data"
    assert data_import(make_source(tmp_path / "src"), data, "mydata") == 0
    mine = snapshot(data / "grain_boundaries" / "mydata")
    assert synth(data) == 0, capsys.readouterr().err
    (data / "grain_boundaries" / "grae" / "stale.png").write_bytes(b"from an older run")
    first = {r: snapshot(data / "grain_boundaries" / r) for r in (*RECIPES, "test")}

    assert synth(data, workers=2) == 0, capsys.readouterr().err
    gb = data / "grain_boundaries"
    assert snapshot(gb / "mydata") == mine  # the imported dataset is untouched
    assert len(load_dataset(gb / "mydata").pairs) == 3
    assert not (gb / "grae" / "stale.png").exists()  # a generated folder is replaced as a whole
    del first["grae"]["stale.png"]
    assert {r: snapshot(gb / r) for r in (*RECIPES, "test")} == first  # byte-identical regeneration
    assert sorted(p.name for p in gb.iterdir()) == sorted([*RECIPES, "test", "mydata"])
    assert len(load_test_set(gb / "test")) == 2


# --------------------------------------------------------------------------- item 2


def test_import_refuses_an_existing_name_unless_replace(tmp_path, capsys):
    data = tmp_path / "data"
    assert data_import(make_source(tmp_path / "src"), data, "mine") == 0
    before = snapshot(data / "grain_boundaries" / "mine")
    capsys.readouterr()

    other = make_source(tmp_path / "other", stems=("c-1", "d-1"))
    assert data_import(other, data, "mine") == 2
    line = one_error_line(capsys.readouterr().err)
    assert (
        str(data / "grain_boundaries" / "mine") in line and "already exists" in line and "--replace" in line
    )
    assert snapshot(data / "grain_boundaries" / "mine") == before

    assert data_import(other, data, "mine", "--replace") == 0
    assert load_dataset(data / "grain_boundaries" / "mine").regions == ["c", "d"]
    assert leftovers(data) == []


@pytest.mark.parametrize("name", ["test", "grae", "grae-large", "Test", "extra"])
def test_import_never_takes_a_synthetic_name(tmp_path, capsys, name):
    data = tmp_path / "data"
    extra_recipe = sets("recipes.extra.regions=1", "recipes.extra.pairs_per_region=2")
    assert synth(data, *extra_recipe) == 0, capsys.readouterr().err
    gb = data / "grain_boundaries"
    before = snapshot(gb)
    capsys.readouterr()
    src = make_source(tmp_path / "src")
    for extra in ([], ["--replace"], ["--replace", *extra_recipe]):
        assert data_import(src, data, name, *extra) == 2
        line = one_error_line(capsys.readouterr().err)
        assert repr(name) in line and "synthetic" in line, line
    assert snapshot(gb) == before


def test_import_of_a_synthetic_name_is_refused_before_any_synth(tmp_path, capsys):
    assert data_import(make_source(tmp_path / "src"), tmp_path / "data", "test", "--replace") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'test'" in line and "grainlab data synth" in line
    assert not (tmp_path / "data" / "grain_boundaries" / "test").exists()


# --------------------------------------------------------------------------- items 8 and 9


@pytest.mark.parametrize("verb", ["import", "synth"])
@pytest.mark.parametrize("below", ["", "sub"])
def test_out_that_is_a_file_gives_one_line(tmp_path, capsys, verb, below):
    blocker = tmp_path / "data.txt"
    blocker.write_text("not a folder")
    out = blocker / below if below else blocker
    if verb == "import":
        code = data_import(make_source(tmp_path / "src"), out, "x")
    else:
        code = synth(out)
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert (
        f"--out {out}" in line
        and f"{blocker} exists and is not a folder" in line
        or (not below and "it exists and is not a folder" in line)
    ), line
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "src"][: 2 if verb == "import" else 1]


@pytest.mark.parametrize(
    ("pattern", "stem", "misses"),
    [("^(zzz)", "a-0-0", "3 of 3"), ("^(a)-", "b-0-0", "1 of 3"), ("^(a)?", "b-0-0", "1 of 3")],
)
def test_region_pattern_must_match_every_stem(tmp_path, capsys, pattern, stem, misses):
    data = tmp_path / "data"
    code = data_import(make_source(tmp_path / "src"), data, "x", "--region-pattern", pattern)
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--region-pattern {pattern!r}" in line and repr(stem) in line and misses in line, line
    assert not (data / "grain_boundaries" / "x").exists()


# --------------------------------------------------------------------------- item 5


def _alive(procs):
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_killed_synth_leaves_no_workers_and_a_rerun_removes_its_debris(tmp_path, capsys):
    data = tmp_path / "data"
    assert data_import(make_source(tmp_path / "src"), data, "mydata") == 0
    mine = snapshot(data / "grain_boundaries" / "mydata")

    long_run = [*TINY, "recipes.grae.regions=3000"]
    cmd = [BIN / "grainlab", "data", "synth", "--only", "grain_boundaries", "--out", str(data)]
    cmd += ["--params", str(PARAMS), "--workers", "2", *sets(*long_run)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers = psutil.Process(proc.pid).children(recursive=True)
            staged = [p for d in leftovers(data) if d.is_dir() for p in d.rglob("*.png")]
            if len(workers) >= 2 and len(staged) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) >= 2, "synth ended before it could be killed mid-way"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(workers) == [], f"orphaned workers: {[p.pid for p in _alive(workers)]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _alive(workers):
            p.kill()

    # What an older grainlab left when killed: the whole folder staged beside it.
    (data / ".grain_boundaries.k3j2h1g0.tmp" / "grae").mkdir(parents=True)
    (data / ".grain_boundaries.k3j2h1g0.tmp" / "grae" / "r000_00.png").write_bytes(b"half")
    # Top-level debris; files a killed worker was writing sit inside these folders.
    debris = [p for p in leftovers(data) if p.parent in (data, data / "grain_boundaries")]
    assert data / ".grain_boundaries.k3j2h1g0.tmp" in debris
    assert any(p.parent == data / "grain_boundaries" for p in debris)  # the killed run's own staging
    assert synth(data, workers=2) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert all(f"removed {p}" in out for p in debris), out
    assert leftovers(data) == []
    assert snapshot(data / "grain_boundaries" / "mydata") == mine
    assert len(load_dataset(data / "grain_boundaries" / "grae").pairs) == 2


def test_dvc_ignores_grainlab_temporary_names(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / ".dvcignore", repo / ".dvcignore")
    gb = repo / "data" / "grain_boundaries"
    for rel in ("grae/images/r000_00.png", ".grae.ab12cd34.tmp/images/r000_00.png", ".gong.old/x.png"):
        (gb / rel).parent.mkdir(parents=True, exist_ok=True)
        (gb / rel).write_bytes(rel.encode())
    (gb / "grae" / ".manifest.json.x1y2z3w4.tmp").write_text("{}")
    (repo / "data" / ".grain_boundaries.q1w2e3r4.tmp").mkdir()
    (repo / "data" / ".grain_boundaries.q1w2e3r4.tmp" / "y.png").write_bytes(b"y")

    def dvc(*args):
        result = subprocess.run([BIN / "dvc", *args], cwd=repo, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    dvc("init", "-q", "--no-scm")
    dvc("add", "-q", "data")
    assert "nfiles: 1\n" in (repo / "data.dvc").read_text()
