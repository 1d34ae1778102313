"""Faults while exporting: ``kill -9`` mid-way (to a new folder, over an existing bundle, between the two renames
that install a bundle), the clean-up of an earlier export's leftovers, a file-size limit on the graph and a read-only
output folder. The bundle at ``--out`` is either absent or a complete one, never a partial one. Every test's docstring
says what was tried, what the user sees and what is kept.

The tests run as root, so ``chmod`` cannot make a folder unwritable: a write failure is made real with
``RLIMIT_FSIZE`` (writes past the limit fail with EFBIG, the way a full disk or a quota fails them: SIGXFSZ is
ignored, as Python itself does), or injected as ``OSError(ENOSPC)`` / ``OSError(EROFS)`` where a subprocess would be
too slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import onnx
import pytest
from _reliability import (
    CLI,
    ENV,
    dead_pid,
    error_line,
    file_size_limit,
    kill9,
    leftovers,
    read_only_folder,
    tree,
    wait_for,
)

from deploy_diff.cli import main
from deploy_diff.export.staging import remove_stale_leftovers
from deploy_diff.runtime.bundle import load_bundle


@pytest.fixture
def traced_once(bundle, monkeypatch):
    """Skip torch's tracing (seconds per export): ``export_onnx`` returns the graph the ``bundle`` fixture was traced
    to. Everything after it (fusion, writing, validation against torch, install, cleanup) is the real code."""
    monkeypatch.setattr("deploy_diff.export.bundle.export_onnx", lambda *a, **k: onnx.load(str(bundle / "unet.onnx")))


# -- kill -9 during export -----------------------------------------------------------------------------------------
def kill_export_midway(run_dir: Path, out: Path, delay: float) -> int:
    """Start `deploy-diff export RUN --out OUT`, SIGKILL it ``delay`` s after its hidden ``.OUT.partial-PID-*``
    folder appears (while torch traces the model); return its pid."""
    proc = subprocess.Popen(
        [*CLI, "export", str(run_dir), "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert wait_for(lambda: any(out.parent.glob(f".{out.name}.partial-{proc.pid}-*")), proc), (
            "the export never started writing"
        )
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
    clean-up (`remove_stale_leftovers`), which leaves the bundle as it is."""
    out = tmp_path / "B"
    shutil.copytree(bundle, out)
    before = tree(out)
    kill_export_midway(run_dir, out, delay=0.3)
    assert tree(out) == before
    load_bundle(out)
    remove_stale_leftovers(out)
    assert leftovers(tmp_path, "B") == [] and tree(out) == before


def test_export_killed_between_the_two_renames_puts_the_previous_bundle_back(bundle, tmp_path):
    """A kill between `install`'s two renames (the previous bundle moved aside to `.NAME.old-PID-*/bundle`, the new
    one still in `.NAME.partial-PID-*`) leaves no bundle at --out. The next export (its first step,
    `remove_stale_leftovers`) moves the previous bundle back, byte for byte, and removes both hidden folders."""
    out = tmp_path / "B"
    pid = dead_pid()
    old = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f".B.old-{pid}-"))
    shutil.copytree(bundle, old / "bundle")
    partial = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f".B.partial-{pid}-"))
    shutil.copytree(bundle, partial, dirs_exist_ok=True)
    (partial / "unet.onnx").write_bytes(b"the new bundle, never renamed into place")
    remove_stale_leftovers(out)
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
    remove_stale_leftovers(out)
    assert leftovers(tmp_path, "B") == [live.name]
    assert tree(out) == tree(bundle)


# -- disk full / read-only output folder --------------------------------------------------------------------------
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
