"""A new run's scheduler_config.json turns clip_sample off, so DDIM loaded from it does not clip x0 at every step
(diffusers' DDPM/DDIM default clip_sample=True degrades DDIM on trained models beyond ~20 steps); a run or bundle
saved with clip_sample=True keeps sampling with it."""

import json

import diffusers

from deploy_diff.runtime.schedulers import DDIMScheduler, load_scheduler
from deploy_diff.train.config import TrainConfig
from deploy_diff.train.trainer import Trainer
from deploy_diff.train.unet import UNetConfig

TINY = UNetConfig(sample_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2)


def test_new_runs_write_clip_sample_false(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, log_every=1, save_every=0, sample_every=0, warmup_steps=1, device="cpu")
    Trainer(TINY, cfg, tmp_path, progress=False).train()
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["clip_sample"] is False
    assert DDIMScheduler.from_config(tmp_path).config["clip_sample"] is False
    assert diffusers.DDIMScheduler.from_pretrained(tmp_path).config.clip_sample is False


def test_older_configs_keep_their_clip_sample(tmp_path):
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "clip_sample": True}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    assert load_scheduler(tmp_path).config["clip_sample"] is True
    assert DDIMScheduler.from_config(tmp_path).config["clip_sample"] is True
