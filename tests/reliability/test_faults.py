"""Faults: ``kill -9`` during training and export, a full disk (or a file-size limit) and a read-only folder while
checkpoints, bundles and sample grids are written. Every test's docstring says what was tried, what the user sees
and what is kept.

The tests run as root, so ``chmod`` cannot make a folder unwritable: a write failure is made real with
``RLIMIT_FSIZE`` (writes past the limit fail with EFBIG, the way a full disk or a quota fails them: SIGXFSZ is
ignored, as Python itself does), or injected as ``OSError(ENOSPC)`` / ``OSError(EROFS)`` where a subprocess would be
too slow.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploy_diff.cli import main
from deploy_diff.export.bundle import _remove_stale_leftovers
from deploy_diff.runtime.bundle import load_bundle
from deploy_diff.train import checkpoint as checkpoint_mod
from deploy_diff.train.checkpoint import (
    CONFIG_FILE,
    HASHED_FILES,
    CheckpointError,
    find_checkpoint,
    read_checkpoint,
    read_trainer_state,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "deploy_diff.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                     os.environ.get("PYTHONPATH")])))
MODEL_FLAGS = ["--base-channels", "8", "--channel-mult", "1,2", "--attention-resolutions", "4", "--num-heads", "2"]
CHECKPOINT_FILES = HASHED_FILES + (CONFIG_FILE,)


# -- helpers ------------------------------------------------------------------------------------------------------
def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path``, hidden ones included, with its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden siblings of ``parent/name``: ``.NAME.partial-*`` / ``.NAME.old-*`` (export), ``.NAME.*.tmp`` (files)."""
    return sorted(p.name for p in parent.glob(f".{name}.*"))


def step_folders(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpts.glob("step_*")) if ckpts.is_dir() else []


def dead_pid() -> int:
    """The pid of a process that has certainly exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``cond()`` every 10 ms until it holds, ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(0.01)
    return False


def kill9(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the process finished before it could be killed (the test needs a longer run)"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def fsize_limit(nbytes: int):
    """``preexec_fn`` for a child whose writes past ``nbytes`` bytes fail with EFBIG ("File too large")."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """The same limit in this process, for the duration of the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def error_line(stderr: str, command: str) -> str:
    """The CLI's error: the last line of stderr, ``deploy-diff COMMAND: error: ...``, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and "Traceback" not in stderr, stderr
    assert lines[-1].startswith(f"deploy-diff {command}: error: "), stderr
    assert sum("error" in line.lower() for line in lines) == 1, stderr
    return lines[-1]


def read_only_folder(monkeypatch, folder: Path, name: str) -> None:
    """Creating a file or folder (``tempfile.NAME(dir=folder)``) in ``folder`` fails with EROFS."""
    real = getattr(tempfile, name)

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, name, refuse)


class FullDisk:
    """A file whose first write lands 16 bytes and then fails the way a full disk fails it (ENOSPC)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(bytes(data)[:16])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)


# -- shared run and bundle: conftest's session fixtures `cond_run_dir` (our conditional UNet trained 30 steps, top
# level and checkpoints/step_0000030) and `cond_run_bundle` (its bundle); tests change copies only --------------
@pytest.fixture
def run_dir(cond_run_dir):
    return cond_run_dir


@pytest.fixture
def bundle(cond_run_bundle):
    return cond_run_bundle


@pytest.fixture
def traced_once(bundle, monkeypatch):
    """Skip torch's tracing (seconds per export): ``export_onnx`` returns the graph the ``bundle`` fixture was traced
    to. Everything after it (fusion, writing, validation against torch, install, cleanup) is the real code."""
    monkeypatch.setattr("deploy_diff.export.bundle.export_onnx", lambda *a, **k: onnx.load(str(bundle / "unet.onnx")))


def copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy of ``run_dir`` to change, and the step of its checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    return run, find_checkpoint(run).step


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


# -- 1. kill -9 during training ---------------------------------------------------------------------------------
KILLED_RUN_STEPS = 24


def test_train_killed_three_times_at_random_moments_resumes_and_finishes(tmp_path, capsys):
    """`deploy-diff train` (a checkpoint every 2 steps) is killed with SIGKILL three times, at seeded random
    moments after it saved something new, and `--resume`d each time. After every kill the run folder loads a
    complete checkpoint with its optimizer state (the top level, or a whole `checkpoints/step_N` when the kill tore
    the top level; never a partial file), at most one save behind the newest. The last `--resume` trains to
    `--steps` and finishes with a whole top level; `metrics.jsonl` holds one valid row per logged step (a killed
    run's tail is dropped) and no half-written step folder is left."""
    run = tmp_path / "run"
    data = tmp_path / "images.npy"  # 64 random 8x8 images: `--data digits` would import scikit-learn (2 s a run)
    np.save(data, np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8))
    fresh = [*CLI, "train", "--data", str(data), "--out", str(run), "--steps", str(KILLED_RUN_STEPS),
             "--save-every", "2", "--log-every", "3", *MODEL_FLAGS, "--batch-size", "16", "--sample-every", "0",
             "--device", "cpu", "--no-progress"]
    resume = [*CLI, "train", "--out", str(run), "--steps", str(KILLED_RUN_STEPS), "--resume", "--no-progress"]
    rng = random.Random(20240607)
    delays = [round(rng.uniform(0.0, 0.25), 3) for _ in range(3)]
    newest = 0
    for i, delay in enumerate(delays):
        proc = subprocess.Popen(fresh if i == 0 else resume, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            assert wait_for(lambda n=newest: step_folders(run) and step_folders(run)[-1] > n, proc), \
                f"run {i} saved no new checkpoint"
            time.sleep(delay)
            kill9(proc)
        finally:
            proc.kill()
            proc.wait()
        steps = step_folders(run)
        # step folders are renamed into place whole (only the oldest may be half pruned, and is then skipped)
        assert read_checkpoint(step_dir(run, steps[-1])).step == steps[-1]
        ck = find_checkpoint(run)
        assert 0 < ck.step < KILLED_RUN_STEPS
        assert ck.step >= steps[-1] - 2, (ck.step, steps)  # at most one save interval behind
        assert read_trainer_state(ck)["step"] == ck.step
        newest = steps[-1]

    # the last leg runs in this process (no second torch import) and needs no intermediate saves
    assert main([*resume[len(CLI):], "--save-every", "0"]) == 0
    assert read_checkpoint(run).step == find_checkpoint(run).step == KILLED_RUN_STEPS  # the top level is whole
    assert step_folders(run)[-1] == KILLED_RUN_STEPS and len(step_folders(run)) <= 2  # keep_last
    assert list((run / "checkpoints").glob(".tmp-*")) == []  # a killed save's step folder is removed by the next
    assert list(run.glob(".*")) == []  # temp files of top-level writes killed mid-way: removed by the next save
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == KILLED_RUN_STEPS


def test_temp_files_of_a_killed_save_are_removed_by_the_next_save(run_dir, tmp_path, capsys):
    """A kill while a run's top-level files are written (metrics.jsonl and loss.png by temp file + rename, the
    checkpoint's files staged as `.NAME.HEX.tmp` first) leaves hidden temp files. The run still loads and resumes,
    and the next save removes them (a staged trainer_state.pt is as large as the optimizer state), as it removes
    `checkpoints/.tmp-*`."""
    run, s = copy_run(run_dir, tmp_path)
    for name in (".metrics.jsonl.k7x2m9qa.tmp", ".loss.png.3hd8s0pz.tmp", ".trainer_state.pt.0badf00d.tmp"):
        (run / name).write_bytes(b"half written")
    assert main(["train", "--out", str(run), "--steps", str(s + 1), "--resume", "--no-progress"]) == 0
    assert read_checkpoint(run).step == s + 1
    assert list(run.glob(".*")) == []


def fail_before_the_top_level_changes(run: Path, steps: int, monkeypatch) -> int:
    """Resume ``run`` to ``steps`` with the disk full from the first top-level copy on; return the exit code."""
    real = shutil.copyfile

    def full_disk(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_mod.shutil, "copyfile", full_disk)
    try:
        return main(["train", "--out", str(run), "--steps", str(steps), "--resume", "--no-progress"])
    finally:
        monkeypatch.setattr(checkpoint_mod.shutil, "copyfile", real)


def test_save_failing_before_the_top_level_changes_keeps_both_checkpoints(run_dir, tmp_path, monkeypatch, capsys):
    """A save that fails (disk full: ENOSPC) right after `checkpoints/step_N` is complete, before any top-level file
    was replaced: `deploy-diff train` exits 1 with one line `...OSError: [Errno 28] No space left on device`; no
    staged file is left; the previous save (the top level) and step N (`checkpoints/step_N`) are both whole, the
    run loads and `--resume` finishes."""
    run, s = copy_run(run_dir, tmp_path)
    assert fail_before_the_top_level_changes(run, s + 2, monkeypatch) == 1
    assert "No space left on device" in error_line(capsys.readouterr().err, "train")
    assert list(run.glob(".*")) == [] and list((run / "checkpoints").glob(".*")) == []
    assert read_checkpoint(step_dir(run, s + 2)).step == s + 2
    assert read_checkpoint(run).step == s
    assert find_checkpoint(run).step in (s, s + 2)
    assert main(["train", "--out", str(run), "--steps", str(s + 4), "--resume", "--no-progress"]) == 0
    assert read_checkpoint(run).step == s + 4


def test_save_failing_before_the_top_level_changes_resumes_from_the_newest_checkpoint(run_dir, tmp_path, monkeypatch):
    """The same failed save (or a kill at that moment): `--resume` continues from the newest complete
    checkpoint, step N in `checkpoints/step_N` (newer than the intact top level), not from the save before it."""
    run, s = copy_run(run_dir, tmp_path)
    assert fail_before_the_top_level_changes(run, s + 2, monkeypatch) == 1
    assert find_checkpoint(run).step == s + 2


def test_save_failing_while_the_top_level_is_replaced_falls_back_to_the_step_folder(run_dir, tmp_path, monkeypatch,
                                                                                     capsys):
    """The disk fills (ENOSPC) while a checkpoint's top-level files are being replaced (`model.safetensors` already
    new, the rest old): `deploy-diff train` exits 1 with one error line `...OSError: [Errno 28] No space left on
    device`; no staged file is left; the torn top level is recognised by its sha256 list and the run loads the
    complete `checkpoints/step_N` instead; `--resume` continues from it and repairs the top level."""
    run, s = copy_run(run_dir, tmp_path)
    real = shutil.copyfile
    calls = []

    def full_disk_on_the_second_file(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            Path(dst).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.shutil, "copyfile", full_disk_on_the_second_file)
    assert main(["train", "--out", str(run), "--steps", str(s + 2), "--resume", "--no-progress"]) == 1
    monkeypatch.setattr(checkpoint_mod.shutil, "copyfile", real)
    assert "No space left on device" in error_line(capsys.readouterr().err, "train")
    assert list(run.glob(".*")) == []
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(run)  # torn: the new model.safetensors beside the old config.json
    ck = find_checkpoint(run)
    assert ck.step == s + 2 and ck.path == step_dir(run, s + 2)
    assert main(["train", "--out", str(run), "--steps", str(s + 4), "--resume", "--no-progress"]) == 0
    assert read_checkpoint(run).step == s + 4


def test_save_killed_while_swapping_a_step_folder_leaves_no_junk(run_dir, tmp_path):
    """A kill between the two renames that replace an existing `checkpoints/step_N` (the same step saved again, e.g.
    `train --resume` at its final step) leaves the old folder as hidden `.old-step_N-*` and the new one as
    `.tmp-step_N-*`. The run still loads (its top level); the next save removes both leftovers (the `.old` one
    is a whole checkpoint's worth of disk)."""
    run, s = copy_run(run_dir, tmp_path)
    ckpts = run / "checkpoints"
    shutil.copytree(step_dir(run, s), ckpts / f".tmp-{step_dir(run, s).name}-0badf00d")
    os.rename(step_dir(run, s), ckpts / f".old-{step_dir(run, s).name}-deadbeef")
    ck = find_checkpoint(run)
    assert ck.step == s and ck.path == run
    save_checkpoint(run, ck.step, ck.model_state, ck.ema_state, read_trainer_state(ck), ck.meta,
                    (run / "scheduler_config.json").read_text())
    assert read_checkpoint(step_dir(run, s)).step == s
    assert sorted(p.name for p in ckpts.glob(".*")) == []


# -- 2. kill -9 during export -----------------------------------------------------------------------------------
def kill_export_midway(run_dir: Path, out: Path, delay: float) -> int:
    """Start `deploy-diff export RUN --out OUT`, SIGKILL it ``delay`` s after its hidden ``.OUT.partial-PID-*``
    folder appears (while torch traces the model); return its pid."""
    proc = subprocess.Popen([*CLI, "export", str(run_dir), "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: any(out.parent.glob(f".{out.name}.partial-{proc.pid}-*")), proc), \
            "the export never started writing"
        time.sleep(delay)
        kill9(proc)
    finally:
        proc.kill()
        proc.wait()
    return proc.pid


def test_export_killed_leaves_no_bundle_and_the_next_export_cleans_up(run_dir, tmp_path, traced_once, capsys):
    """`deploy-diff export` to a new --out killed with SIGKILL mid-way: nothing appears at --out (only a hidden
    `.NAME.partial-PID-*` folder beside it, which a killed process cannot remove); the next export to the same --out
    removes that folder and writes a valid bundle."""
    out = tmp_path / "B"
    pid = kill_export_midway(run_dir, out, delay=0.3)
    assert not out.exists()
    stale = list(tmp_path.glob(f".B.partial-{pid}-*"))
    assert len(stale) == 1 and leftovers(tmp_path, "B") == [stale[0].name]
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert leftovers(tmp_path, "B") == []
    load_bundle(out)


def test_export_killed_while_replacing_a_bundle_keeps_the_previous_one(run_dir, bundle, tmp_path):
    """`deploy-diff export` over an existing bundle killed with SIGKILL mid-way: the bundle at --out is byte for byte
    the previous one and verifies; the hidden partial folder of the killed export is removed by the next export's
    clean-up (`_remove_stale_leftovers`), which leaves the bundle as it is."""
    out = tmp_path / "B"
    shutil.copytree(bundle, out)
    before = tree(out)
    kill_export_midway(run_dir, out, delay=0.3)
    assert tree(out) == before
    load_bundle(out)
    _remove_stale_leftovers(out)
    assert leftovers(tmp_path, "B") == [] and tree(out) == before


def test_export_killed_between_the_two_renames_puts_the_previous_bundle_back(bundle, tmp_path):
    """A kill between `_install`'s two renames (the previous bundle moved aside to `.NAME.old-PID-*/bundle`, the new
    one still in `.NAME.partial-PID-*`) leaves no bundle at --out. The next export (its first step,
    `_remove_stale_leftovers`) moves the previous bundle back, byte for byte, and removes both hidden folders."""
    out = tmp_path / "B"
    pid = dead_pid()
    old = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f".B.old-{pid}-"))
    shutil.copytree(bundle, old / "bundle")
    partial = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f".B.partial-{pid}-"))
    shutil.copytree(bundle, partial, dirs_exist_ok=True)
    (partial / "unet.onnx").write_bytes(b"the new bundle, never renamed into place")
    _remove_stale_leftovers(out)
    assert tree(out) == tree(bundle)
    load_bundle(out)
    assert leftovers(tmp_path, "B") == []


def test_export_leftovers_of_a_running_export_are_left_alone(bundle, tmp_path):
    """Hidden folders of an export that is still running (its pid alive) are never touched by another export's
    clean-up; those of a dead export killed after its second rename are removed, and the bundle it installed is
    kept."""
    out = tmp_path / "B"
    shutil.copytree(bundle, out)
    live = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f".B.partial-{os.getpid()}-"))
    dead_old = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f".B.old-{dead_pid()}-"))
    shutil.copytree(bundle, dead_old / "bundle")
    (dead_old / "bundle" / "unet.onnx").write_bytes(b"the previous bundle's graph")
    _remove_stale_leftovers(out)
    assert leftovers(tmp_path, "B") == [live.name]
    assert tree(out) == tree(bundle)


# -- 3. disk full / read-only output folder ---------------------------------------------------------------------
def test_train_checkpoint_write_fails_keeps_the_previous_checkpoint(run_dir, tmp_path, capsys):
    """`deploy-diff train --resume` whose checkpoint cannot be written (a 100 kB file-size limit: the weights fail
    with EFBIG, as on a full disk): exit 1 with one line `deploy-diff train: error: SafetensorError: ...File too
    large...`; the previous checkpoint (top level and `checkpoints/`) is byte for byte untouched and still loads;
    no temporary folder is left."""
    run, s = copy_run(run_dir, tmp_path)
    before = {name: (run / name).read_bytes() for name in CHECKPOINT_FILES}
    before_ckpts = tree(run / "checkpoints")
    with file_size_limit(100_000):
        rc = main(["train", "--out", str(run), "--steps", str(s + 1), "--resume", "--no-progress"])
    assert rc == 1
    assert "File too large" in error_line(capsys.readouterr().err, "train")
    assert {name: (run / name).read_bytes() for name in CHECKPOINT_FILES} == before
    assert tree(run / "checkpoints") == before_ckpts
    assert find_checkpoint(run).step == read_checkpoint(run).step == s
    assert list(run.glob(".*")) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-a-bundle"])
def test_export_graph_write_fails(run_dir, bundle, tmp_path, traced_once, capsys, existing):
    """`deploy-diff export` whose graph cannot be written (a 64 kB file-size limit: EFBIG, as on a full disk): exit 1
    with one line `deploy-diff export: error: ...File too large...`; no bundle and no hidden partial folder at the
    destination; a bundle already at --out is byte for byte untouched."""
    out = tmp_path / "B"
    if existing:
        shutil.copytree(bundle, out)
    before = tree(out) if existing else None
    with file_size_limit(64 << 10):
        rc = main(["export", str(run_dir), "--out", str(out)])
    assert rc == 1
    assert "File too large" in error_line(capsys.readouterr().err, "export")
    assert leftovers(tmp_path, "B") == []
    if existing:
        assert tree(out) == before
        load_bundle(out)
    else:
        assert not out.exists()


def test_export_into_a_read_only_folder(run_dir, bundle, tmp_path, monkeypatch, capsys):
    """`deploy-diff export --out` in a read-only folder (EROFS when the hidden work folder is created): exit 1 with
    one line `deploy-diff export: error: OSError: [Errno 30] Read-only file system: '<folder>'`; the bundle already
    there is byte for byte untouched and nothing else is created."""
    out = tmp_path / "B"
    shutil.copytree(bundle, out)
    before = tree(out)
    read_only_folder(monkeypatch, tmp_path, "mkdtemp")
    assert main(["export", str(run_dir), "--out", str(out)]) == 1
    line = error_line(capsys.readouterr().err, "export")
    assert "Read-only file system" in line and str(tmp_path) in line
    assert tree(out) == before and leftovers(tmp_path, "B") == []


SAMPLE = ["-n", "2", "--steps", "2", "--seed", "0", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("npz", [False, True], ids=["png", "npz"])
def test_sample_output_write_fails(bundle, tmp_path, npz):
    """`deploy-diff sample --out grid.png` (or `--npz`) whose output cannot be written (a 64-byte file-size limit:
    EFBIG, as on a full disk): exit 1 with one line `deploy-diff sample: error: OSError: [Errno 27] File too
    large`; the existing output file is byte for byte untouched and no temporary file is left beside it."""
    out = tmp_path / ("grid.npz" if npz else "grid.png")
    out.write_bytes(b"the previous output")
    res = subprocess.run([*CLI, "sample", str(bundle), "--out", str(out), *SAMPLE, *(["--npz"] if npz else [])],
                         env=ENV, capture_output=True, text=True, timeout=120, preexec_fn=fsize_limit(64))
    assert res.returncode == 1, res.stderr
    assert "File too large" in error_line(res.stderr, "sample")
    assert out.read_bytes() == b"the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS"])
def test_sample_on_a_full_disk_or_in_a_read_only_folder(bundle, tmp_path, monkeypatch, capsys, fault):
    """`deploy-diff sample --out grid.png` on a full disk (the PNG write fails after 16 bytes: ENOSPC) or in a
    read-only folder (the temporary file cannot be created: EROFS): exit 1 with one line `deploy-diff sample: error:
    OSError: [Errno 28] No space left on device` / `[Errno 30] Read-only file system: '<folder>'`; the existing
    grid.png is byte for byte untouched and no temporary file is left."""
    from deploy_diff.runtime import _fileio, images

    out = tmp_path / "grid.png"
    out.write_bytes(b"the previous grid")
    if fault == "ENOSPC":
        @contextlib.contextmanager
        def full_disk(path):
            with _fileio.atomic_open(path) as f:
                yield FullDisk(f)

        monkeypatch.setattr(images, "atomic_open", full_disk)
    else:
        read_only_folder(monkeypatch, tmp_path, "mkstemp")
    assert main(["sample", str(bundle), "--out", str(out), *SAMPLE]) == 1
    line = error_line(capsys.readouterr().err, "sample")
    assert os.strerror(getattr(errno, fault)) in line
    assert out.read_bytes() == b"the previous grid"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_sample_write_error_names_the_file(bundle, tmp_path, monkeypatch, capsys):
    """`deploy-diff sample --out grid.png` on a full disk: the one error line names the file that could not be
    written (`... No space left on device: '.../grid.png'`)."""
    from deploy_diff.runtime import _fileio, images

    @contextlib.contextmanager
    def full_disk(path):
        with _fileio.atomic_open(path) as f:
            yield FullDisk(f)

    monkeypatch.setattr(images, "atomic_open", full_disk)
    out = tmp_path / "grid.png"
    assert main(["sample", str(bundle), "--out", str(out), *SAMPLE]) == 1
    assert "grid.png" in error_line(capsys.readouterr().err, "sample")
