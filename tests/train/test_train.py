"""Training: loss falls, checkpoints round-trip and resume exactly, targets match the runtime, bad input."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_diff.cli import main
from deploy_diff.runtime.schedulers import DDPMScheduler
from deploy_diff.train.checkpoint import CheckpointError, find_checkpoint, sha256_file
from deploy_diff.train.config import TrainConfig
from deploy_diff.train.data import load_data
from deploy_diff.train.trainer import Trainer, diffusion_loss, lr_at, schedule_tensors
from deploy_diff.train.unet import UNet, UNetConfig

TINY = UNetConfig(sample_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2)
TINY_FLAGS = ["--base-channels", "16", "--channel-mult", "1,2", "--attention-resolutions", "4", "--num-heads", "2"]


def tiny_train_config(**kw):
    base = dict(steps=20, batch_size=16, log_every=1, save_every=0, sample_every=0, warmup_steps=5, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_on_digits(tmp_path):
    trainer = Trainer(TINY, tiny_train_config(steps=200, batch_size=32, lr=3e-3), tmp_path, progress=False)
    trainer.train()
    losses = [m["loss"] for m in trainer.metrics]
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-30:])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 201))
    assert all({"step", "loss", "lr"} <= set(r) for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_metrics_are_written_live_and_a_killed_runs_tail_is_dropped_on_resume(tmp_path):
    Trainer(TINY, tiny_train_config(steps=4), tmp_path, progress=False).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # rows of a run killed after its last checkpoint
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    trainer = Trainer(None, tiny_train_config(steps=6), tmp_path, resume=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    trainer.train_step()
    trainer._log_metrics({"step": trainer.step, "loss": 0.5, "lr": 0.1})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    trainer = Trainer(TINY, tiny_train_config(steps=4), tmp_path, progress=False)
    trainer.train()
    ck = find_checkpoint(tmp_path)
    assert ck.step == 4 and ck.model_config == TINY
    model = UNet(ck.model_config).eval()
    model.load_state_dict(ck.ema_state)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 500.5, 999.0])
    with torch.no_grad():
        np.testing.assert_array_equal(model(x, t).numpy(), trainer.ema(x, t).numpy())
    # the saved scheduler config is diffusers-compatible and describes the forward process
    import diffusers

    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    np.testing.assert_allclose(theirs.alphas_cumprod.numpy(), trainer.noise_scheduler.alphas_cumprod, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_straight_run_equals_half_resume_half(tmp_path, prediction_type):
    cfg = tiny_train_config(steps=10, prediction_type=prediction_type, save_every=5)
    straight = Trainer(TINY, cfg, tmp_path / "a", progress=False)
    straight.train()
    half = Trainer(TINY, tiny_train_config(steps=5, prediction_type=prediction_type), tmp_path / "b", progress=False)
    half.train()
    resumed = Trainer(None, cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 5
    resumed.train()
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics]
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # appended on resume, no duplicates
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_targets_and_noising_match_the_runtime():
    """diffusion_loss noises with the runtime's add_noise and regresses its get_velocity (v target)."""
    sched = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    sa, s1 = schedule_tensors(sched, torch.device("cpu"))
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    seen = {}

    def model(x, tt, labels):
        seen["x"] = x
        return torch.zeros_like(x)

    loss = diffusion_loss(model, x0, t, noise, None, sa, s1, "v_prediction", "l2")
    np.testing.assert_allclose(seen["x"].numpy(), sched.add_noise(x0.numpy(), noise.numpy(), t.numpy()), atol=1e-6)
    v = sched.get_velocity(x0.numpy(), noise.numpy(), t.numpy())
    abar = sched.alphas_cumprod[t.numpy()][:, None, None, None]
    np.testing.assert_allclose(v, np.sqrt(abar) * noise.numpy() - np.sqrt(1 - abar) * x0.numpy(), atol=1e-6)
    assert float(loss) == pytest.approx(float(np.mean(v.astype(np.float64) ** 2)), rel=1e-5)


def test_lr_schedule_is_defined_over_the_total():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


def test_conditional_training_with_label_dropout(tmp_path):
    cfg = UNetConfig(**{**TINY.to_dict(), "num_classes": 10})
    trainer = Trainer(cfg, tiny_train_config(steps=3, sample_every=3), tmp_path, progress=False)
    trainer.train()
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["null_class_label"] == 10 and meta["class_names"] == [str(i) for i in range(10)]
    assert list((tmp_path / "samples").glob("*.png"))


def test_image_folder_with_labels_and_a_corrupt_file(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "data" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"broken\.png"):
        data = load_data(str(tmp_path / "data"), 8, channels=3)
    assert data.images.shape == (6, 3, 8, 8) and data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(data.images.min()) >= -1 and float(data.images.max()) <= 1


def test_arrays_source(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (5, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(5) % 2)
    data = load_data(str(tmp_path / "d.npz"), 8)
    assert data.images.shape == (5, 1, 8, 8) and data.labels.tolist() == [0, 1, 0, 1, 0]
    np.save(tmp_path / "bad.npy", np.zeros((5, 4, 4, 7)))
    with pytest.raises(ValueError, match="expected images"):
        load_data(str(tmp_path / "bad.npy"), 8)


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "holds no images"),
        (lambda p: (p.mkdir(), (p / "x.png").write_bytes(b"junk")), "no readable image"),
    ],
)
def test_bad_data_is_refused(tmp_path, setup, match):
    folder = tmp_path / "data"
    setup(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            load_data(str(folder), 8, channels=3)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"prediction_type": "eps"}, "prediction_type"),
        ({"beta_schedule": "karras_seed"}, "beta_schedule"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
    ],
)
def test_invalid_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_invalid_model_config():
    with pytest.raises(ValueError, match="sample_size=6 must be divisible"):
        UNetConfig(sample_size=6, channel_mult=(1, 2, 2))


def test_resume_from_a_non_checkpoint_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="no complete deploy-diff checkpoint"):
        Trainer(None, tiny_train_config(), tmp_path, resume=True, progress=False)


def test_bad_input_leaves_existing_checkpoint_untouched(tmp_path):
    Trainer(TINY, tiny_train_config(steps=2), tmp_path, progress=False).train()
    before = {p.name: sha256_file(p) for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match="pass resume=True"):
        Trainer(TINY, tiny_train_config(steps=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="beta_schedule"):
        Trainer(None, tiny_train_config(steps=4, beta_schedule="cosine"), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="past steps=1"):
        Trainer(None, tiny_train_config(steps=1), tmp_path, resume=True, progress=False)
    assert before == {p.name: sha256_file(p) for p in tmp_path.iterdir() if p.is_file()}


def test_torn_top_level_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    Trainer(TINY, tiny_train_config(steps=4, save_every=2), tmp_path, progress=False).train()
    (tmp_path / "model.safetensors").write_bytes(b"half written")
    ck = find_checkpoint(tmp_path)
    assert ck.path.name == "step_0000004" and ck.step == 4


def test_mismatched_weights_are_refused(tmp_path):
    Trainer(TINY, tiny_train_config(steps=2), tmp_path, progress=False).train()
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["base_channels"] = 32
    for folder in [tmp_path] + list((tmp_path / "checkpoints").iterdir()):
        (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the model config"):
        Trainer(None, tiny_train_config(steps=4), tmp_path, resume=True, progress=False)


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        "digits",
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--no-progress",
        "--sample-every",
        "0",
        "--save-every",
        "0",
        *TINY_FLAGS,
    ]
    assert main(args) == 0
    assert main(["train", "--out", str(out), "--steps", "3", "--resume", "--no-progress"]) == 0
    assert find_checkpoint(out).step == 3
    assert main(["train", "--out", str(tmp_path / "x"), "--steps", "0", "--no-progress"]) == 1
    assert "steps must be an int >= 1" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "deploy_diff.cli",
        "train",
        "--data",
        "digits",
        "--out",
        str(tmp_path / "ddp"),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--no-progress",
        "--sample-every",
        "0",
        "--device",
        "cpu",
        *TINY_FLAGS,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ck = find_checkpoint(tmp_path / "ddp")
    assert ck.step == 3
    assert "x 2 processes" in proc.stdout


def test_bf16_autocast_trains_on_cpu(tmp_path):
    trainer = Trainer(TINY, tiny_train_config(steps=3, mixed_precision="bf16"), tmp_path, progress=False)
    result = trainer.train()
    assert result["step"] == 3 and np.isfinite(result["final_loss"])
    with pytest.raises(ValueError, match="fp16.*needs CUDA"):
        Trainer(TINY, tiny_train_config(mixed_precision="fp16"), tmp_path / "x", progress=False)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = UNet(TINY)
    with torch.no_grad():  # leave the zero-initialised start, where most gradients vanish
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = UNet(UNetConfig(**{**TINY.to_dict(), "gradient_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    for m in (plain, ckpt):
        m.train()
        m(x, t).pow(2).mean().backward()
    grads = [(a.grad, b.grad) for a, b in zip(plain.parameters(), ckpt.parameters())]
    assert sum(int(g.abs().sum() > 0) for g, _ in grads) > 0.9 * len(grads)
    for a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
