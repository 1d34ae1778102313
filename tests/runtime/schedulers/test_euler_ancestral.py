"""EulerAncestralDiscreteScheduler against diffusers: timesteps, sigmas, every prev_sample of full loops with
per-step noise from matched generators, noise draw count, step-index bookkeeping, config round trips, errors.

Tolerances (tests/_sigma_parity.py): prev_sample 1e-4, or 1e-2 where diffusers' float32 schedule is itself
inexact (sigma_max > 1e3 or sigma_min < 5e-3); timesteps exact (float32).
"""

import diffusers
import numpy as np
import pytest
import torch
from _parity import fake_model, rel_err
from _scheduler_checks import (
    BAD_COMMON_CONFIG_VALUES,
    assert_diffusers_config_round_trip,
    assert_loop_matches_diffusers,
    assert_step_after_the_last_raises,
    seconds_per_step,
)
from _sigma_parity import sample_tolerance, sigma_parity_error
from _sweep import case_id, cross_product, run_sweep, sample_cases

from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler

STEPS = [1, 2, 7, 10, 50]
SPACE = {
    # iddpm_linear and karras are ours (saved for diffusers as trained_betas)
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2", "iddpm_linear", "karras"],
    # "sample" is refused by diffusers (NotImplementedError): tested separately below
    "prediction_type": ["epsilon", "v_prediction"],
    "timestep_spacing": ["linspace", "leading", "trailing"],
    "steps_offset": [0, 1],
    "rescale_betas_zero_snr": [False, True],
    "steps": STEPS,
}


def _valid(case):
    return case["timestep_spacing"] == "leading" or not case["steps_offset"]


def _run_case(case):
    cfg = {k: v for k, v in case.items() if k != "steps"}
    ours, err = sigma_parity_error(
        EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler, cfg, case["steps"]
    )
    assert err <= sample_tolerance(ours), (case_id(case), err)
    return err


@pytest.mark.parametrize("case", sample_cases(SPACE, 50, seed=21, valid=_valid), ids=case_id)
def test_euler_ancestral_parity(case):
    _run_case(case)


@pytest.mark.slow
def test_euler_ancestral_parity_full_cross_product():
    run_sweep(cross_product(SPACE, _valid), _run_case)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 61, 1000])
def test_timesteps_sigmas_init_noise_sigma_equal_diffusers(spacing, n):
    ours = EulerAncestralDiscreteScheduler(timestep_spacing=spacing, steps_offset=1)
    theirs = diffusers.EulerAncestralDiscreteScheduler(timestep_spacing=spacing, steps_offset=1)
    # before set_timesteps too (the full T-step schedule)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-4, atol=2e-6)
    assert isinstance(ours.init_noise_sigma, float)
    # sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=2e-4)


def test_one_noise_draw_per_step_including_the_last():
    """Both sides consume their generators identically: one randn of the sample's shape per step."""
    ours, theirs = EulerAncestralDiscreteScheduler(), diffusers.EulerAncestralDiscreteScheduler()
    n = 6
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    go, gt = TorchGenerator(9), torch.Generator().manual_seed(9)
    x = TorchGenerator(0).randn((1, 3, 8, 8)) * np.float32(ours.init_noise_sigma)
    y = torch.from_numpy(x.copy())
    for to, tt in zip(ours.timesteps, theirs.timesteps):
        x = ours.step(fake_model(ours.scale_model_input(x, to), float(to)), to, x, generator=go).prev_sample
        y = theirs.step(
            torch.from_numpy(fake_model(theirs.scale_model_input(y, tt).numpy(), float(tt))), tt, y, generator=gt
        ).prev_sample
    np.testing.assert_allclose(go.randn((5,)), torch.randn((5,), generator=gt).numpy(), atol=1e-6)
    ref = TorchGenerator(9)
    for _ in range(n):
        ref.randn((1, 3, 8, 8))
    ref.randn((5,))
    np.testing.assert_array_equal(go.randn((7,)), ref.randn((7,)))


def test_generator_list_matches_diffusers():
    ours, theirs = EulerAncestralDiscreteScheduler(), diffusers.EulerAncestralDiscreteScheduler()
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x = TorchGenerator(0).randn((2, 3, 8, 8)) * np.float32(ours.init_noise_sigma)
    y = torch.from_numpy(x.copy())
    go = [TorchGenerator(3), TorchGenerator(4)]
    gt = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    assert_loop_matches_diffusers(ours, theirs, x, y, generators=(go, gt))


def test_sample_prediction_works_where_diffusers_refuses():
    """diffusers raises NotImplementedError for prediction_type="sample"; ours takes x_0 = model output.
    Reference: diffusers' epsilon scheduler fed the equivalent epsilon (x - x0_hat) / sigma."""
    theirs_sample = diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample")
    theirs_sample.set_timesteps(3)
    t = theirs_sample.timesteps[0]
    z = torch.zeros((1, 1, 4, 4))
    theirs_sample.scale_model_input(z, t)
    with pytest.raises(NotImplementedError):
        theirs_sample.step(z, t, z, generator=torch.Generator().manual_seed(0))

    ours = EulerAncestralDiscreteScheduler(prediction_type="sample")
    theirs = diffusers.EulerAncestralDiscreteScheduler(prediction_type="epsilon")
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x = TorchGenerator(0).randn((2, 3, 8, 8)) * np.float32(ours.init_noise_sigma)
    y = torch.from_numpy(x.copy())
    go, gt = TorchGenerator(1), torch.Generator().manual_seed(1)
    for to, tt in zip(ours.timesteps, theirs.timesteps):
        x0_hat = np.tanh(fake_model(ours.scale_model_input(x, to), float(to)))
        x = ours.step(x0_hat, to, x, generator=go).prev_sample
        yin = theirs.scale_model_input(y, tt)
        sigma = float(theirs.sigmas[theirs.step_index])
        x0_t = np.tanh(fake_model(yin.numpy(), float(tt)))
        eps = (y.numpy().astype(np.float64) - x0_t) / sigma
        y = theirs.step(torch.from_numpy(eps.astype(np.float32)), tt, y, generator=gt).prev_sample
        assert rel_err(x, y) <= 1e-4


def test_step_index_and_add_noise_like_diffusers():
    ours, theirs = EulerAncestralDiscreteScheduler(), diffusers.EulerAncestralDiscreteScheduler()
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    x0 = TorchGenerator(0).randn((2, 3, 8, 8))
    noise = TorchGenerator(1).randn((2, 3, 8, 8))
    a = ours.add_noise(x0, noise, ours.timesteps[[1, 5]])
    b = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), theirs.timesteps[[1, 5]])
    assert rel_err(a, b) <= 1e-6
    ours.set_begin_index(3)
    theirs.set_begin_index(3)
    a = ours.add_noise(x0, noise, ours.timesteps[:1])
    b = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), theirs.timesteps[:1])
    assert rel_err(a, b) <= 1e-6
    ours.scale_model_input(a, ours.timesteps[0])
    theirs.scale_model_input(b, theirs.timesteps[0])
    assert ours.step_index == theirs.step_index == 3


def test_set_timesteps_resets_state_and_repeats_exactly():
    s = EulerAncestralDiscreteScheduler()
    runs = []
    for _ in range(2):
        s.set_timesteps(6)
        assert s.step_index is None
        x = TorchGenerator(0).randn((1, 3, 8, 8)) * np.float32(s.init_noise_sigma)
        g = TorchGenerator(5)
        for t in s.timesteps:
            x = s.step(fake_model(s.scale_model_input(x, t), float(t)), t, x, generator=g).prev_sample
        runs.append(x)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_config_round_trip_through_diffusers(tmp_path):
    ours = EulerAncestralDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        timestep_spacing="leading",
        steps_offset=1,
    )
    assert_diffusers_config_round_trip(ours, diffusers.EulerAncestralDiscreteScheduler, tmp_path)


@pytest.mark.parametrize("kwargs,match", BAD_COMMON_CONFIG_VALUES)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EulerAncestralDiscreteScheduler(**kwargs)


def test_bad_step_and_set_timesteps_arguments():
    s = EulerAncestralDiscreteScheduler()
    for n in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(n)
    s.set_timesteps(2)
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="integer timestep"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="not one of"):
        s.step(x, 3.5, x)
    assert_step_after_the_last_raises(s, x, scale_input=True, generator=TorchGenerator(0))


# timed, so kept out of the default suite (a busy CI machine would make it flaky); the figures
# come from benchmarks/scheduler_step.py
@pytest.mark.slow
def test_step_is_much_cheaper_than_diffusers():
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ratio = seconds_per_step(EulerAncestralDiscreteScheduler(), x, 300, generator=TorchGenerator(0)) / seconds_per_step(
        diffusers.EulerAncestralDiscreteScheduler(), torch.from_numpy(x), 300, generator=torch.Generator()
    )
    assert ratio < 0.5, ratio  # noise generation in NumPy dominates ours; measured ~0.3-0.4
