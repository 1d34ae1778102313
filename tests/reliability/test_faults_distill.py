"""Faults while distilling: ``deploy-diff distill`` killed with SIGKILL at random moments, then ``--resume``d, ends
with a complete run, exactly as training does (the distiller writes the trainer's atomic checkpoints)."""

from __future__ import annotations

import json
import random
import subprocess
import time

import numpy as np
from _reliability import CLI, ENV, kill9, wait_for

from deploy_diff.cli import main
from deploy_diff.train.checkpoint import find_checkpoint, read_checkpoint, read_trainer_state
from deploy_diff.train.config import TrainConfig
from deploy_diff.train.trainer import Trainer
from deploy_diff.train.unet import UNetConfig

STEPS = 40  # 4 rounds of 10 steps


def _step_folders(run) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpts.glob("step_*")) if ckpts.is_dir() else []


def test_distill_killed_twice_resumes_and_finishes(tmp_path):
    """`deploy-diff distill --method progressive` (a checkpoint every 2 steps, 4 rounds of 10 steps, so kills land in
    later rounds whose teacher lives only in the checkpoint) is killed with SIGKILL twice at seeded random moments
    after a new save and resumed each time. Each kill leaves a loadable checkpoint holding the round teacher; the last
    `--resume` finishes at `--steps` with a whole top level, the run's distillation record and one metrics row per
    logged step."""
    data = tmp_path / "images.npy"  # random 8x8 images: `digits` would import scikit-learn in every process
    np.save(data, np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8))
    teacher = tmp_path / "teacher"
    model = UNetConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2)
    cfg = TrainConfig(data=str(data), steps=4, batch_size=16, save_every=0, sample_every=0, log_every=2)
    Trainer(model, cfg, teacher, progress=False).train()
    run = tmp_path / "fast"
    base = ["distill", str(teacher), "--out", str(run), "--method", "progressive", "--steps", str(STEPS)]
    fresh = [*CLI, *base, "--save-every", "2", "--no-progress"]
    resume = [*fresh, "--resume"]
    rng = random.Random(20261202)
    newest = 0
    for i in range(2):
        proc = subprocess.Popen(
            fresh if i == 0 else resume, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            assert wait_for(lambda n=newest: _step_folders(run) and _step_folders(run)[-1] > max(n, 10), proc), (
                f"run {i} saved no new checkpoint past the first round"
            )
            time.sleep(rng.uniform(0.0, 0.2))
            kill9(proc)
        finally:
            proc.kill()
            proc.wait()
        ck = find_checkpoint(run)
        assert 10 < ck.step < STEPS, ck.step
        state = read_trainer_state(ck)
        assert state["step"] == ck.step and "round_teacher" in state  # the teacher of rounds 2+ is checkpointed
        newest = _step_folders(run)[-1]
    assert main([*base, "--resume", "--save-every", "0", "--no-progress"]) == 0
    ck = read_checkpoint(run)  # the top level itself is whole
    assert ck.step == STEPS and ck.meta["distill"]["method"] == "progressive"
    assert ck.meta["sampling"]["default_inference_steps"] == 4
    assert list(run.glob(".*")) == [] and list((run / "checkpoints").glob(".tmp-*")) == []
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == STEPS
