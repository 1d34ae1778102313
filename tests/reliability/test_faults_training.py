"""Faults while training: ``kill -9`` at random moments followed by ``--resume``, a disk that fills up before or
while a checkpoint's top-level files are replaced, a file-size limit on the checkpoint's weights, and a kill between
the two renames that replace a step folder. Every test's docstring says what was tried, what the user sees and what
is kept.

The tests run as root, so ``chmod`` cannot make a folder unwritable: a write failure is made real with
``RLIMIT_FSIZE`` (writes past the limit fail with EFBIG, the way a full disk or a quota fails them: SIGXFSZ is
ignored, as Python itself does), or injected as ``OSError(ENOSPC)`` / ``OSError(EROFS)`` where a subprocess would be
too slow.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from _reliability import CLI, ENV, error_line, file_size_limit, kill9, tree, wait_for

from deploy_diff.cli import main
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

MODEL_FLAGS = ["--base-channels", "8", "--channel-mult", "1,2", "--attention-resolutions", "4", "--num-heads", "2"]
CHECKPOINT_FILES = HASHED_FILES + (CONFIG_FILE,)


def step_folders(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpts.glob("step_*")) if ckpts.is_dir() else []


def copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy of ``run_dir`` to change, and the step of its checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    return run, find_checkpoint(run).step


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


# -- kill -9 during training ------------------------------------------------------------------------------------
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
    fresh = [
        *CLI,
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--steps",
        str(KILLED_RUN_STEPS),
        "--save-every",
        "2",
        "--log-every",
        "3",
        *MODEL_FLAGS,
        "--batch-size",
        "16",
        "--sample-every",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    resume = [*CLI, "train", "--out", str(run), "--steps", str(KILLED_RUN_STEPS), "--resume", "--no-progress"]
    rng = random.Random(20240607)
    delays = [round(rng.uniform(0.0, 0.25), 3) for _ in range(3)]
    newest = 0
    for i, delay in enumerate(delays):
        proc = subprocess.Popen(
            fresh if i == 0 else resume, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            assert wait_for(lambda n=newest: step_folders(run) and step_folders(run)[-1] > n, proc), (
                f"run {i} saved no new checkpoint"
            )
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
    assert main([*resume[len(CLI) :], "--save-every", "0"]) == 0
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


def test_save_failing_while_the_top_level_is_replaced_falls_back_to_the_step_folder(
    run_dir, tmp_path, monkeypatch, capsys
):
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
    save_checkpoint(
        run,
        ck.step,
        ck.model_state,
        ck.ema_state,
        read_trainer_state(ck),
        ck.meta,
        (run / "scheduler_config.json").read_text(),
    )
    assert read_checkpoint(step_dir(run, s)).step == s
    assert sorted(p.name for p in ckpts.glob(".*")) == []


# -- disk full while a checkpoint is written ----------------------------------------------------------------------
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
