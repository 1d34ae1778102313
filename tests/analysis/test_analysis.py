"""Quality metric and the compact Python API (DiffusionAnalyzer, DiffusionModel, DiffusionTrainer)."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from deploy_diff.analysis.bench import dumps, image_diff, sample_for_quality
from deploy_diff.analysis.quality import DigitsQuality, frechet_distance
from deploy_diff.runtime.schedulers.beta_schedules import get_betas
from deploy_diff.train import DiffusionAnalyzer, DiffusionConfig, DiffusionModel, DiffusionTrainer, SchedulerType


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 6))
    b = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) * 0.5 + 1.0
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


@pytest.fixture(scope="module")
def quality():
    return DigitsQuality()


def test_real_digits_score_at_the_floor_and_noise_far_above(quality):
    assert quality.test_accuracy > 0.9
    real = quality.x_test.numpy().reshape(-1, 8, 8)
    assert quality.score(real)["ratio"] == pytest.approx(1.0)
    assert quality.score(np.random.default_rng(0).random((540, 8, 8)))["ratio"] > 20
    # upsampled real digits (a 16 px model's output) are pooled back to 8x8 and still score near the floor
    up = real.repeat(2, axis=1).repeat(2, axis=2)
    assert quality.score(up)["ratio"] < 1.05
    agreement = quality.score(real, quality.y_test.numpy())["class_agreement"]
    assert agreement == pytest.approx(quality.test_accuracy)


def test_image_diff_psnr_and_json_without_infinity():
    a = np.full((2, 4, 4, 1), 0.5, dtype=np.float32)
    b = a.copy()
    b[0, 0, 0, 0] = 0.9  # one pixel of 32 off by 0.4: mse 0.005
    d = image_diff(b, a)
    assert d["max_abs"] == pytest.approx(0.4) and d["mean_abs"] == pytest.approx(0.4 / 32)
    assert d["psnr_db"] == pytest.approx(-10 * np.log10(0.16 / 32))
    assert image_diff(a, a) == {"max_abs": 0.0, "mean_abs": 0.0, "psnr_db": float("inf")}
    with pytest.raises(ValueError, match="shape"):
        image_diff(a[:1], a)
    # equal images have an infinite PSNR: JSON gets null there (and for nan), never the non-standard Infinity
    text = dumps({"rows": [image_diff(a, a), {"x": float("nan"), "y": (1.5, float("-inf"))}]})
    assert json.loads(text) == {
        "rows": [{"max_abs": 0.0, "mean_abs": 0.0, "psnr_db": None}, {"x": None, "y": [1.5, None]}]
    }


def test_quality_samples_do_not_depend_on_the_chunking(cond_run_bundle):
    from deploy_diff.runtime import Pipeline

    pipe = Pipeline.from_bundle(cond_run_bundle, scheduler="ddim")
    images, labels = sample_for_quality(pipe, 13, 2, chunk=5)
    whole, same_labels = sample_for_quality(pipe, 13, 2)
    np.testing.assert_array_equal(labels, np.arange(13) % 10)
    np.testing.assert_array_equal(same_labels, labels)
    np.testing.assert_allclose(images, whole, atol=1e-6)  # image i: seed i, class i % 10, whatever its call
    one = pipe(num_images=1, num_inference_steps=2, seed=[11], class_labels=[1])
    np.testing.assert_allclose(images[11:12], one, atol=1e-6)


def _tiny_config(**kw) -> DiffusionConfig:
    """An 8x8 one-channel model small enough to train and sample in a test."""
    return DiffusionConfig(image_size=8, in_channels=1, out_channels=1, hidden_size=16, num_layers=1, num_heads=2, **kw)


def test_seed_api_names_work():
    assert SchedulerType.SCALED_LINEAR.value == "iddpm_linear"  # improved-DDPM's scaled linear
    cfg = _tiny_config(scheduler_type=SchedulerType.SCALED_LINEAR)
    model = DiffusionModel(cfg)
    np.testing.assert_allclose(model.scheduler.betas.numpy(), get_betas("iddpm_linear", 1000), rtol=1e-6)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([1, 2, 3, 999])
    noisy, noise = model.scheduler.add_noise(x, t)
    abar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, abar.sqrt() * x + (1 - abar).sqrt() * noise)
    v = model.scheduler.get_velocity(x, noise, t)
    torch.testing.assert_close(v, abar.sqrt() * noise - (1 - abar).sqrt() * x)
    out = model.sample(batch_size=2, num_inference_steps=3)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(batch_size=1, num_inference_steps=2, guidance_scale=3.0)
    stats = DiffusionAnalyzer().analyze_model(model)
    assert stats["parameters"] == sum(p.numel() for p in model.unet.parameters())
    assert stats["flops_per_forward"] > 2 * stats["parameters"] > 0 and stats["activation_bytes_per_image"] > 0
    rows = DiffusionAnalyzer().benchmark_sampling(model, steps=(2,), methods=("ddim", "ddpm"))
    assert [r["method"] for r in rows] == ["ddim", "ddpm"] and all(r["seconds"] > 0 for r in rows)
    result = DiffusionTrainer(model, cfg).train([x, x], num_epochs=2)
    assert result["steps"] == 4 and all(np.isfinite(result["losses"]))


def test_seed_api_conditional_uses_config_guidance():
    cfg = _tiny_config(num_classes=3, guidance_scale=2.0)
    model = DiffusionModel(cfg)
    out = model.sample(batch_size=3, num_inference_steps=2, class_labels=[0, 1, 2])
    assert out.shape == (3, 1, 8, 8)
    result = DiffusionTrainer(model).train([(torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]))])
    assert result["steps"] == 1
