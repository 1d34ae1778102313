"""DDPM and DDIM against diffusers: timesteps, every prev_sample of full loops, documented differences."""

import warnings

import diffusers
import numpy as np
import pytest
import torch
from _parity import fake_model, rel_err, run_parity
from _sweep import case_id, cross_product, run_sweep, sample_cases

from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.schedulers import DDIMScheduler, DDPMScheduler

STEPS = [1, 2, 7, 10, 50]


def tolerance(cfg):
    # diffusers' float32 schedule arrays are ~1e-3 off where abar_T is tiny (docs/parity.md)
    return 1e-2 if cfg.get("beta_schedule") == "squaredcos_cap_v2" or cfg.get("rescale_betas_zero_snr") else 1e-4


DDPM_SPACE = {
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    # fixed_large_log is NaN in diffusers: tested against fixed_large below
    "variance_type": ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"],
    "clip_sample": [True, False],
    "thresholding": [False, True],
    "timestep_spacing": ["leading", "trailing", "linspace"],
    "steps_offset": [0, 1],
    "rescale_betas_zero_snr": [False, True],
    "steps": STEPS,
}
DDIM_SPACE = {
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "clip_sample": [True, False],
    "thresholding": [False, True],
    "set_alpha_to_one": [True, False],
    "timestep_spacing": ["leading", "trailing"],
    "steps_offset": [0, 1],
    "rescale_betas_zero_snr": [False, True],
    "eta": [0.0, 0.5, 1.0],
    "use_clipped_model_output": [False, True],
    "steps": STEPS,
}


def _valid(cfg):
    # zero terminal SNR with epsilon prediction and no clipping has no x_0 at the first step (diffusers: inf)
    if cfg["rescale_betas_zero_snr"] and cfg["prediction_type"] == "epsilon" and cfg["timestep_spacing"] != "leading":
        return False
    if cfg.get("timestep_spacing") == "trailing" and 1000 % cfg["steps"] != 0 and "eta" in cfg:
        return False  # DDIM: diffusers' prev = t - T // n is wrong there (tested separately below)
    if cfg["timestep_spacing"] != "leading" and cfg["steps_offset"]:
        return False  # steps_offset only acts on leading spacing; keep the sample varied
    return True


def _run_ddpm(cfg):
    cfg = dict(cfg)
    steps = cfg.pop("steps")
    out_channels = 6 if cfg["variance_type"] == "learned_range" else None
    err = run_parity(DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), steps, out_channels=out_channels)
    assert err <= tolerance(cfg), (cfg, steps, err)


def _run_ddim(cfg):
    cfg = dict(cfg)
    steps = cfg.pop("steps")
    kw = {"eta": cfg.pop("eta"), "use_clipped_model_output": cfg.pop("use_clipped_model_output")}
    err = run_parity(DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg), steps, step_kwargs=kw)
    assert err <= tolerance(cfg), (cfg, steps, err)


@pytest.mark.parametrize("cfg", sample_cases(DDPM_SPACE, 40, seed=1, valid=_valid), ids=case_id)
def test_ddpm_parity(cfg):
    _run_ddpm(cfg)


@pytest.mark.parametrize("cfg", sample_cases(DDIM_SPACE, 40, seed=2, valid=_valid), ids=case_id)
def test_ddim_parity(cfg):
    _run_ddim(cfg)


@pytest.mark.slow
def test_ddpm_parity_full_cross_product():
    run_sweep(cross_product(DDPM_SPACE, _valid), _run_ddpm)


@pytest.mark.slow
def test_ddim_parity_full_cross_product():
    run_sweep(cross_product(DDIM_SPACE, _valid), _run_ddim)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 999, 1000])
def test_timesteps_equal_diffusers(cls, spacing, n):
    ours, theirs = cls(timestep_spacing=spacing), getattr(diffusers, cls.__name__)(timestep_spacing=spacing)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.timesteps.dtype == np.int64


@pytest.mark.parametrize("spacing,n", [("linspace", 7), ("linspace", 50), ("trailing", 7), ("trailing", 30)])
def test_ddim_prev_timestep_is_next_entry_where_diffusers_is_wrong(spacing, n):
    """diffusers' DDIM uses prev = t - T // n, which skips or repeats timesteps for these spacings
    (diffusers #11347, #12633). Ours steps to the next entry of ``timesteps``. Reference: DDIM with eta = 1
    is the DDPM posterior, and diffusers' *DDPM* already uses the next entry for every spacing."""
    ours = DDIMScheduler(timestep_spacing=spacing, clip_sample=False)
    ddpm = diffusers.DDPMScheduler(timestep_spacing=spacing, clip_sample=False)
    # sanity check that the comparison can fail: DDIM with eta = 0 is not DDPM
    assert run_parity(DDIMScheduler(timestep_spacing=spacing, clip_sample=False), ddpm, n) > 1e-3
    err = _ddim_eta1_vs_ddpm(ours, ddpm, n)
    assert err <= 1e-4
    # and diffusers' own DDIM does *not* agree with its DDPM here
    err_theirs = _ddim_eta1_vs_ddpm(diffusers.DDIMScheduler(timestep_spacing=spacing, clip_sample=False), ddpm, n)
    assert err_theirs > 1e-3


def _ddim_eta1_vs_ddpm(ddim, ddpm, n):
    ddim.set_timesteps(n)
    ddpm.set_timesteps(n)
    x = TorchGenerator(0).randn((2, 3, 8, 8))
    y = torch.from_numpy(x.copy())
    g2 = torch.Generator().manual_seed(1)
    g1 = TorchGenerator(1) if isinstance(ddim, DDIMScheduler) else torch.Generator().manual_seed(1)
    worst = 0.0
    for t in ddpm.timesteps:
        eps = fake_model(x if isinstance(x, np.ndarray) else x.numpy(), float(t))
        eps_t = torch.from_numpy(fake_model(y.numpy(), float(t)))
        if isinstance(ddim, DDIMScheduler):
            x = ddim.step(eps, int(t), x, eta=1.0, generator=g1).prev_sample
        else:
            x = ddim.step(
                torch.from_numpy(eps), t, torch.from_numpy(np.asarray(x)), eta=1.0, generator=g1
            ).prev_sample.numpy()
        y = ddpm.step(eps_t, t, y, generator=g2).prev_sample
        worst = max(worst, rel_err(np.asarray(x), y))
    return worst


def test_ddim_leading_offset_last_step_uses_final_alpha():
    """leading + steps_offset=1 + 500 < n < 1000: diffusers' last step uses alphas_cumprod[0]; ours uses
    final_alpha_cumprod (the documented exception). Everything before the last step agrees."""
    n = 600
    ours = DDIMScheduler(steps_offset=1, clip_sample=False)
    theirs = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert ours.timesteps[-1] == 1
    a_t, a_prev = ours._alpha_prods(1)
    assert a_prev == ours.final_alpha_cumprod == 1.0
    x = np.ones((1, 1, 2, 2), np.float32)
    eps = np.full_like(x, 0.1)
    out = ours.step(eps, 1, x).prev_sample
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    np.testing.assert_allclose(out, x0, rtol=1e-6)  # abar_prev = 1: the step lands on x_0
    their_prev = theirs.step(torch.from_numpy(eps), 1, torch.from_numpy(x)).prev_sample.numpy()
    assert not np.allclose(their_prev, x0, rtol=1e-6)


def test_ddim_zero_snr_eta1_is_finite_where_diffusers_is_nan():
    cfg = dict(
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    )
    ours = DDIMScheduler(**cfg)
    ours.set_timesteps(10)
    x = TorchGenerator(0).randn((1, 3, 8, 8))
    g = TorchGenerator(1)
    for t in ours.timesteps:
        x = ours.step(fake_model(x, float(t)), t, x, eta=1.0, generator=g).prev_sample
        assert np.isfinite(x).all()


def test_zero_snr_epsilon_without_clipping_is_refused_clearly():
    s = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    s.set_timesteps(5)
    x = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        s.step(np.zeros_like(x) + 0.5, s.timesteps[0], x, generator=TorchGenerator(0))


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_config_round_trip_through_diffusers(cls, tmp_path):
    ours = cls(
        beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    )
    ours.save_config(tmp_path)
    theirs = getattr(diffusers, cls.__name__).from_pretrained(tmp_path)
    assert run_parity(cls.from_config(tmp_path), theirs, 10) <= 1e-4
    # diffusers' own file loads here, _class_name and _diffusers_version included
    theirs.save_config(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = cls.from_config(tmp_path / "d")
    assert back.config == ours.config


@pytest.mark.parametrize("schedule", ["cosine", "iddpm_linear", "karras", "sigmoid"])
def test_non_diffusers_schedules_saved_as_trained_betas(schedule, tmp_path):
    ours = DDIMScheduler(beta_schedule=schedule, clip_sample=False)
    ours.save_config(tmp_path)
    theirs = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    np.testing.assert_allclose(theirs.alphas_cumprod.double().numpy(), ours.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert run_parity(DDIMScheduler.from_config(tmp_path), theirs, 10) <= 1e-4


def test_trained_betas_with_zero_snr_rescale_are_not_rescaled_twice(tmp_path):
    ours = DDIMScheduler(
        beta_schedule="cosine", rescale_betas_zero_snr=True, prediction_type="v_prediction", clip_sample=False
    )
    ours.save_config(tmp_path)
    theirs = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    np.testing.assert_allclose(theirs.alphas_cumprod.double().numpy(), ours.alphas_cumprod, atol=1e-6)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta_schedule": "cosin"}, "beta_schedule"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
        ({"clip_sample_range": 0}, "clip_sample_range"),
    ],
)
def test_bad_config_values(cls, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        cls(**kwargs)
    assert "expected" in str(e.value) or "must" in str(e.value)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("n", [0, -1, 1001, 2.5, None])
def test_bad_num_inference_steps(cls, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls().set_timesteps(n)


def test_ddim_bad_eta_and_noise_arguments():
    s = DDIMScheduler()
    s.set_timesteps(5)
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="eta"):
        s.step(x, s.timesteps[0], x, eta=-0.1)
    with pytest.raises(ValueError, match="not both"):
        s.step(x, s.timesteps[0], x, eta=1.0, generator=TorchGenerator(0), variance_noise=x)
    with pytest.raises(ValueError, match="not one of"):
        s.step(x, 3, x)


def test_ddpm_variance_noise_order_matches_diffusers_with_generator_lists():
    """A list of generators (one per image) draws like diffusers' randn_tensor with a list."""
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    ours.set_timesteps(3)
    theirs.set_timesteps(3)
    x = np.zeros((2, 1, 4, 4), np.float32)
    t = ours.timesteps[0]
    a = ours.step(x, t, x, generator=[TorchGenerator(3), TorchGenerator(4)]).prev_sample
    b = theirs.step(
        torch.from_numpy(x),
        int(t),
        torch.from_numpy(x),
        generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)],
    ).prev_sample
    np.testing.assert_allclose(a, b.numpy(), atol=1e-6)


def test_ddpm_fixed_large_log_is_finite_and_equals_fixed_large():
    """diffusers' fixed_large_log step is NaN (sqrt of a log variance); ours is the fixed_large step."""
    theirs = diffusers.DDPMScheduler(variance_type="fixed_large")
    assert run_parity(DDPMScheduler(variance_type="fixed_large_log"), theirs, 10) <= 1e-4
    nan_theirs = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    nan_theirs.set_timesteps(2)
    x = torch.zeros((1, 1, 4, 4))
    out = nan_theirs.step(x, nan_theirs.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isnan(out).any()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clipped", [False, True])
def test_zero_beta_start_steps_stay_finite(prediction_type, eta, clipped):
    """beta_start=0 makes x_t = x_0 at t = 0 (no noise): DDIM and DDPM step exactly there, never 0/0 (found by
    fuzzing: ZeroDivisionError with eta > 0, NaN for prediction_type='sample')."""
    from deploy_diff.runtime.rng import TorchGenerator
    from deploy_diff.runtime.schedulers import DDIMScheduler, DDPMScheduler

    for s, kw in (
        (
            DDIMScheduler(beta_start=0.0, prediction_type=prediction_type),
            dict(eta=eta, use_clipped_model_output=clipped),
        ),
        (DDPMScheduler(beta_start=0.0, prediction_type=prediction_type), {}),
    ):
        s.set_timesteps(4)
        x = np.full((1, 1, 4, 4), 0.87, np.float32)
        g = TorchGenerator(0)
        for t in s.timesteps:
            x = s.step(np.float32(0.1) * x, t, x, generator=g, **kw).prev_sample
        assert np.isfinite(x).all()
