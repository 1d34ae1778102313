"""UniPC against diffusers: timesteps and every prev_sample of full loops (float32, and float64 against diffusers'
own code run in float64). ``_Theirs`` (in _unipc_harness.py) drives diffusers' scheduler and replaces its
documented non-finite last steps by the limit ours computes."""

from __future__ import annotations

import itertools

import diffusers
import numpy as np
import pytest
import torch
from _parity import run_parity
from _sweep import case_id, cross_product, run_sweep, sample_cases
from _unipc_harness import (
    DIFFUSERS_SCHEDULES,
    FULL_SPACE,
    SCHEDULE_KW,
    SPACE,
    STEPS,
    _configs,
    _normalise,
    _run_case,
    _Theirs,
)

from deploy_diff.runtime.schedulers.sigmas import torch_linspace_f32
from deploy_diff.runtime.schedulers.unipc import UniPCMultistepScheduler

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2


@pytest.mark.parametrize("case", sample_cases(SPACE, 56, seed=7, normalise=_normalise), ids=case_id)
def test_parity_sampled(case):
    _run_case(case)


def test_sample_covers_the_space():
    cases = sample_cases(SPACE, 56, seed=7, normalise=_normalise)
    for key, values in SPACE.items():
        seen = {c[key] for c in cases}
        missing = [v for v in values if v not in seen and not (key == "prediction_type" and v == "flow_prediction")]
        assert not missing, (key, missing)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", FULL_SPACE["schedule"])
@pytest.mark.parametrize("steps", STEPS)
def test_parity_full_cross_product(schedule, steps):
    space = dict(FULL_SPACE, schedule=[schedule], steps=[steps])
    run_sweep(cross_product(space, normalise=_normalise), _run_case, error=lambda result: result["err32"])


def test_last_step_limits_are_exercised():
    """The diffusers-NaN cases really occur in the sample (so the replacement above is tested), and ours is finite."""
    replaced = 0
    for case in sample_cases(SPACE, 56, seed=7, normalise=_normalise):
        ours_kw, theirs_kw = _configs(case)
        if case["final_sigmas_type"] == "zero" and (case["solver_type"] == "bh1" or not case["predict_x0"]):
            theirs = _Theirs(diffusers.UniPCMultistepScheduler(**theirs_kw))
            run_parity(UniPCMultistepScheduler(**ours_kw), theirs, case["steps"])
            replaced += len(theirs.replaced)
    assert replaced >= 5


# -- timesteps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("ramp", ["spacing", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_timesteps_equal_diffusers(schedule, ramp):
    """Integer timesteps equal diffusers' exactly, Karras/exponential/beta ones included (float32 mirror)."""
    ours_kw = {"beta_schedule": schedule, **SCHEDULE_KW.get(schedule, {})}
    theirs_kw = (
        dict(ours_kw)
        if schedule in DIFFUSERS_SCHEDULES
        else {"trained_betas": UniPCMultistepScheduler(**ours_kw)._raw_betas.tolist()}
    )
    spacings = (("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0))
    variants = [{"timestep_spacing": s, "steps_offset": o} for s, o in spacings]
    if ramp != "spacing":
        variants = [{ramp: True}]
    ns = (
        [1, 2, 3, 7, 10, 50, 99, 250, 999]
        if ramp == "use_beta_sigmas"
        else list(range(1, 41)) + [50, 61, 97, 100, 250, 333, 500, 999]
    )
    for extra in variants:
        ours = UniPCMultistepScheduler(**ours_kw, **extra)
        theirs = diffusers.UniPCMultistepScheduler(**theirs_kw, **extra)
        for n in ns:
            theirs.set_timesteps(n)
            if theirs.timesteps.max() >= theirs.config.num_train_timesteps:  # leading + steps_offset, n = 999
                with pytest.raises(ValueError, match="steps_offset"):
                    ours.set_timesteps(n)
                continue
            ours.set_timesteps(n)
            assert ours.timesteps.dtype == np.int64
            np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy(), err_msg=f"{extra} n={n}")
            if ramp == "spacing":
                # compared as abar = 1 / (1 + sigma^2): diffusers' float32 1 - abar has few digits near t = 0
                # (1e-3 relative in sigma for squaredcos_cap_v2), its abar is good to float32 resolution
                np.testing.assert_allclose(
                    1 / (1 + ours.sigmas**2), 1 / (1 + theirs.sigmas.numpy().astype(np.float64) ** 2), rtol=0, atol=1e-6
                )
            else:
                # a ramp spreads the float32 error of its end point sigma_min (2.6e-4 for squaredcos_cap_v2)
                np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=5e-4, atol=0)


@pytest.mark.parametrize("ramp", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize("schedule", DIFFUSERS_SCHEDULES)
def test_timesteps_zero_snr_ramps(ramp, schedule):
    """With rescale_betas_zero_snr diffusers' float32 sqrt (MKL, not correctly rounded) cannot be mirrored bit
    for bit: timesteps may then differ by one (none did on the machine these tests were written on)."""
    kw = {"beta_schedule": schedule, "rescale_betas_zero_snr": True, ramp: True, **SCHEDULE_KW.get(schedule, {})}
    ours, theirs = UniPCMultistepScheduler(**kw), diffusers.UniPCMultistepScheduler(**kw)
    for n in [1, 2, 5, 10, 25, 50, 100, 500]:
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=0, atol=1)


def test_float32_mirror_equals_diffusers_alphas_cumprod():
    for kw in [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"num_train_timesteps": 500, "beta_end": 0.03},
        {"num_train_timesteps": 2000, "beta_schedule": "scaled_linear"},
    ]:
        ours = UniPCMultistepScheduler(**kw)
        np.testing.assert_array_equal(
            ours._alphas_cumprod_f32(), diffusers.UniPCMultistepScheduler(**kw).alphas_cumprod.numpy(), err_msg=str(kw)
        )
    for n, (a, b) in itertools.product([1, 2, 7, 1000, 1001], [(1e-4, 0.02), (0.3, 0.05)]):
        np.testing.assert_array_equal(torch_linspace_f32(a, b, n), torch.linspace(a, b, n, dtype=torch.float32).numpy())


def test_karras_timesteps_through_float64_would_differ():
    """Why the float32 mirror exists: float64 sigmas move some Karras timesteps by one."""
    from deploy_diff.runtime.schedulers.sigmas import sigma_to_t

    moved = 0
    for kw in [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}]:
        ours = UniPCMultistepScheduler(use_karras_sigmas=True, **kw)
        log_sigmas = np.log(np.sqrt((1 - ours.alphas_cumprod) / ours.alphas_cumprod))
        for n in range(2, 200):
            ours.set_timesteps(n)
            t64 = np.round(sigma_to_t(ours.sigmas[:-1], log_sigmas)).astype(np.int64)
            moved += int(np.sum(t64 != ours.timesteps))
            if moved:
                return
    raise AssertionError("float64 sigmas gave diffusers' Karras timesteps for every n")
