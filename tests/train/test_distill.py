"""Distillation (issue 12): the objectives equal the runtime schedulers' arithmetic, a student run is an ordinary run
that export and the runtime take unchanged (its bundle samples in its own few steps by default), resume is exact
and refuses another teacher, method or target, and class conditioning survives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deploy_diff.cli import main
from deploy_diff.export.bundle import export_bundle
from deploy_diff.export.sources import load_run_source
from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.schedulers import DDIMScheduler, load_scheduler
from deploy_diff.train.checkpoint import CheckpointError, find_checkpoint
from deploy_diff.train.config import TrainConfig
from deploy_diff.train.distill import Distiller, ddim_step, distill, progressive_v_target
from deploy_diff.train.trainer import Trainer
from deploy_diff.train.unet import UNetConfig

TINY = UNetConfig(sample_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2)


def _teacher(path, seed=0, num_classes=0):
    cfg = TrainConfig(steps=6, batch_size=16, log_every=2, save_every=0, sample_every=0, warmup_steps=2, seed=seed)
    model = UNetConfig(**{**TINY.to_dict(), "num_classes": num_classes})
    Trainer(model, cfg, path, progress=False).train()
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def consistency_bundle(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("cd")
    result = distill(teacher, root / "run", method="consistency", steps=4, progress=False)
    export_bundle(load_run_source(root / "run"), root / "bundle", validation_batches=(1,), optimize=False, log=None)
    return root, result


def _ab(abar: np.ndarray, t: int) -> tuple[float, float]:
    return (1.0, 0.0) if t < 0 else (float(np.sqrt(abar[t])), float(np.sqrt(1 - abar[t])))


def test_progressive_target_is_the_v_whose_runtime_ddim_step_lands_on_two_teacher_steps():
    """Two DDIM steps of the teacher (runtime DDIMScheduler, trailing, 8 steps) from x_t, and one step of the student
    (the same scheduler at 4 steps) with the target v as model output, land on the same sample."""
    rng = np.random.default_rng(0)
    fine = DDIMScheduler(prediction_type="epsilon", timestep_spacing="trailing", clip_sample=False)
    coarse = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    fine.set_timesteps(8)
    coarse.set_timesteps(4)
    abar = fine.alphas_cumprod
    for i, t in enumerate(coarse.timesteps):
        x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
        eps1, eps2 = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))
        t_mid, t_next = int(fine.timesteps[2 * i + 1]), int(coarse.timesteps[i + 1]) if i + 1 < 4 else -1
        x_mid = fine.step(eps1, int(t), x).prev_sample
        x_next = fine.step(eps2, t_mid, x_mid).prev_sample
        # the trainer's torch arithmetic, on the same numbers
        tt = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        ours_mid = ddim_step(tt(eps1), tt(x), *_ab(abar, int(t)), *_ab(abar, t_mid), "epsilon")
        ours_next = ddim_step(tt(eps2), ours_mid, *_ab(abar, t_mid), *_ab(abar, t_next), "epsilon")
        np.testing.assert_allclose(ours_next.numpy(), x_next, rtol=0, atol=2e-5)
        v = progressive_v_target(tt(x), tt(x_next), *_ab(abar, int(t)), *_ab(abar, t_next))
        landed = coarse.step(v.numpy().astype(np.float32), int(t), x).prev_sample
        np.testing.assert_allclose(landed, x_next, rtol=0, atol=2e-4)


def test_consistency_function_is_the_lcm_schedulers_denoised_output(consistency_bundle, teacher, tmp_path):
    root, _ = consistency_bundle
    d = Distiller(teacher, tmp_path / "x", method="consistency", steps=1, progress=False)
    lcm = load_scheduler(json.loads((root / "run" / "scheduler_config.json").read_text()))
    lcm.set_timesteps(4)
    rng = np.random.default_rng(1)
    for t in lcm.timesteps:
        x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
        out = rng.standard_normal(x.shape).astype(np.float32)
        ours = d.consistency_function(torch.from_numpy(out), torch.from_numpy(x), torch.full((3,), int(t)))
        denoised = lcm.step(out, t, x, generator=None).denoised
        np.testing.assert_allclose(ours.numpy(), denoised, rtol=1e-5, atol=1e-5)
    assert {int(t) for t in d.grid} == set(int(t) for t in lcm.origin_timesteps())


def test_student_run_exports_and_samples_in_its_own_few_steps(consistency_bundle, teacher, capsys):
    root, result = consistency_bundle
    run, bundle = root / "run", root / "bundle"
    assert result["step"] == 4 and result["method"] == "consistency" and result["default_inference_steps"] == 4
    for name in ("model.safetensors", "ema.safetensors", "config.json", "scheduler_config.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").stat().st_size > 1000 and list((run / "samples").glob("*.png"))
    meta = json.loads((run / "config.json").read_text())
    assert meta["distill"]["method"] == "consistency"
    assert meta["distill"]["teacher_sha256"] == find_checkpoint(teacher).meta["files"]["ema.safetensors"]
    assert meta["sampling"] == {"default_inference_steps": 4, "max_inference_steps": 50}
    import diffusers

    sched = diffusers.LCMScheduler.from_pretrained(run)  # diffusers reads the student's sampler as is
    assert sched.config.prediction_type == "sample"  # the consistency student predicts x0
    manifest = json.loads((bundle / "deploy_diff.json").read_text())
    assert manifest["model"]["default_inference_steps"] == 4 and manifest["model"]["max_inference_steps"] == 50

    pipe = Pipeline.from_bundle(bundle)
    calls = []
    default = pipe(num_images=2, seed=0, callback=lambda i, t, x: calls.append(int(t)))
    assert len(calls) == 4
    np.testing.assert_array_equal(default, pipe(num_images=2, num_inference_steps=4, seed=0))
    assert pipe(num_images=1, num_inference_steps=1, seed=0).shape == (1, 8, 8, 1)
    with pytest.raises(ValueError, match="max_inference_steps=50"):
        pipe(num_images=1, num_inference_steps=51, seed=0)
    assert Pipeline.from_bundle(bundle, scheduler="ddim")(num_images=1, num_inference_steps=60, seed=0).shape[0] == 1

    assert main(["sample", str(bundle), "--out", str(root / "g.png"), "-n", "2", "--seed", "0", "--no-progress"]) == 0
    assert "LCMScheduler, 4 steps" in capsys.readouterr().out


def test_progressive_straight_run_equals_resume_across_a_round(teacher, tmp_path):
    """8 steps = 4 rounds of 2 (16 -> 8 -> 4 -> 2 student steps for target 2). 3 steps, then a resume to 8, equals 8
    straight: the resumed run restores the round teacher it saved mid-round."""
    straight = Distiller(teacher, tmp_path / "a", method="progressive", steps=8, target_steps=2, progress=False)
    straight.train()
    killed = Distiller(teacher, tmp_path / "b", method="progressive", steps=8, target_steps=2, progress=False)
    for _ in range(3):  # a run checkpointed at step 3 and killed
        killed.train_step()
    killed.save()
    resumed = Distiller(teacher, tmp_path / "b", steps=8, target_steps=2, resume=True, progress=False)
    assert resumed.method == "progressive" and resumed.round_teacher is not None and resumed.step == 3
    resumed.train()
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    sched = json.loads((tmp_path / "b" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["timestep_spacing"] == "trailing"
    sampling = find_checkpoint(tmp_path / "b").meta["sampling"]
    assert sampling == {"default_inference_steps": 2, "max_inference_steps": None}


def test_consistency_straight_run_equals_half_resume_half(teacher, tmp_path):
    straight = Distiller(teacher, tmp_path / "a", method="consistency", steps=4, progress=False)
    straight.train()
    distill(teacher, tmp_path / "b", method="consistency", steps=2, progress=False)
    resumed = Distiller(teacher, tmp_path / "b", steps=4, resume=True, progress=False)
    resumed.train()
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics]
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_with_another_teacher_method_or_target_is_refused(teacher, consistency_bundle, tmp_path):
    run = consistency_bundle[0] / "run"
    before = (run / "config.json").read_bytes()
    other = _teacher(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="sha256"):
        distill(other, run, steps=6, resume=True, progress=False)
    with pytest.raises(ValueError, match="method='consistency', not 'progressive'"):
        distill(teacher, run, method="progressive", steps=6, resume=True, progress=False)
    with pytest.raises(ValueError, match="target_steps=4, not 2"):
        distill(teacher, run, target_steps=2, steps=6, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        distill(teacher, run, steps=6, progress=False)
    with pytest.raises(ValueError, match="training run, not a distillation run"):
        distill(teacher, teacher, resume=True, progress=False)
    with pytest.raises(ValueError, match="itself a distilled run"):
        distill(run, tmp_path / "x", progress=False)
    with pytest.raises(CheckpointError, match="teacher must be a training run"):
        distill(tmp_path / "nothing", tmp_path / "y", progress=False)
    for kw, match in (({"method": "lcm"}, "method must be one of"), ({"target_steps": 0}, "target_steps must be")):
        with pytest.raises(ValueError, match=match):
            distill(teacher, tmp_path / "z", progress=False, **kw)
    assert (run / "config.json").read_bytes() == before
    # the CLI says it in its own words
    assert main(["distill", str(teacher), "--out", str(run), "--method", "progressive", "--resume"]) == 1


def test_class_conditional_student_keeps_labels_and_guidance(tmp_path):
    teacher = _teacher(tmp_path / "t", num_classes=10)
    result = distill(teacher, tmp_path / "s", steps=4, progress=False)  # the default method: progressive
    assert result["method"] == "progressive" and result["default_inference_steps"] == 4
    export_bundle(load_run_source(tmp_path / "s"), tmp_path / "b", validation_batches=(1,), optimize=False, log=None)
    pipe = Pipeline.from_bundle(tmp_path / "b")
    assert pipe.model.num_classes == 10 and pipe.model.null_class_label == 10
    assert pipe.model.default_inference_steps == 4 and pipe.model.max_inference_steps is None
    assert pipe.inference_steps() == 4 and pipe.inference_steps(100) == 100  # DDIM takes any step count
    plain = pipe(num_images=2, seed=0, class_labels=[3, 7])
    guided = pipe(num_images=2, seed=0, class_labels=[3, 7], guidance_scale=2.0)
    assert plain.shape == guided.shape == (2, 8, 8, 1) and not np.array_equal(plain, guided)
