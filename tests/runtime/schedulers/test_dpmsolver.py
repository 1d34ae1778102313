"""DPMSolverMultistepScheduler against diffusers: timesteps, every prev_sample of full loops (ODE and SDE,
matched generators), config round trips, validation, and each documented difference.

Tolerances (max|ours - theirs| / max(1, max|theirs|) over every prev_sample). diffusers holds its schedule in
float32 (its sigmas are up to ~8e-5 relative off the float64 ones); ours is float64. How much of that reaches
the samples depends on the algorithm, measured over ~2000 random configurations:

* dpmsolver++ (the default): 1e-4 (worst seen 3.6e-5);
* sde-dpmsolver++: 5e-4 (worst 3.2e-4): the noise coefficient sigma_t sqrt(1 - exp(-2h)) is sensitive to h,
  and diffusers' float32 exp(-2h) for the tiny h of a final step onto sigma_min (1 ulp apart in float32)
  adds noise of ~5e-5 where ours adds none (the exact limit);
* dpmsolver / sde-dpmsolver (noise prediction, deprecated in diffusers): 2e-3 (worst 1.3e-3): their update
  (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps cancels two large terms, and the SDE one swells the sample
  (x ~ 1e3 mid-loop) before it shrinks;
* sigma_max > 1e3 (squaredcos_cap_v2, zero terminal SNR, our ``cosine``): 1e-2 (docs/parity.md: diffusers' float32
  arrays are ~1e-3 off there; worst seen 5.6e-3);
* sigma_min < 5e-3 (our ``karras`` schedule, where 1 - abar_0 ~ 4e-6 keeps 2 digits in float32 and diffusers'
  sigmas are up to 0.7% off): 2e-2 (worst seen 1.3e-2);
* the noise-prediction types on those extreme schedules are left out of the parity sample: with alpha_s
  ~ 1e-4 their float32 update cancels terms of size ~1e4, so diffusers is up to ~0.5 off the float64 result
  (ours ~0.02); they are checked against our own float64 run instead
  (``test_noise_prediction_on_extreme_schedules``) and, with diffusers' sigmas copied in, against diffusers.

The per-algorithm tolerances are diffusers' float32 schedule, not the solver: with diffusers' float32 sigmas
copied into ours, every ``dpmsolver++`` case agrees to 1e-5 (``test_solver_equals_diffusers_given_its_sigmas``).
"""

from __future__ import annotations

import itertools

import diffusers
import numpy as np
import pytest
import torch
from _dpmsolver_harness import (
    DEFAULTS,
    DIFFUSERS_SCHEDULES,
    NOISE_ALGOS,
    SCHEDULE_AXES,
    SOLVER_AXES,
    SPACE,
    _check_parity,
    _extremes,
    _loop,
    _loop_custom,
    _pair,
    _run_parity,
    _valid,
    _with_their_sigmas,
    tolerance,
)
from _parity import rel_err, run_parity
from _sweep import case_id, cross_product, run_sweep, sample_cases

from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler as Ours
from deploy_diff.runtime.schedulers.sigmas import diffusers_float32_alphas_cumprod

# diffusers' own noise: its deprecation notice for (sde-)dpmsolver and a NumPy 2 __array__ notice
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*algorithm_types dpmsolver and sde-dpmsolver:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


# -- parity --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", sample_cases(SPACE, 50, seed=20240601, valid=_valid), ids=case_id)
def test_parity_random_configs(cfg):
    _run_parity(cfg)


@pytest.mark.slow
def test_parity_cross_product_of_solver_axes():
    run_sweep(cross_product({a: SPACE[a] for a in SOLVER_AXES}, _valid, base=DEFAULTS), _run_parity)


@pytest.mark.slow
def test_parity_cross_product_of_schedule_axes():
    run_sweep(cross_product({a: SPACE[a] for a in SCHEDULE_AXES}, _valid, base=DEFAULTS), _run_parity)


@pytest.mark.slow
def test_parity_large_random_sample():
    run_sweep(sample_cases(SPACE, 1500, seed=7, valid=_valid), _run_parity)


@pytest.mark.parametrize(
    "algo,tol", [("dpmsolver++", 2e-5), ("sde-dpmsolver++", 1e-4), ("dpmsolver", 1e-3), ("sde-dpmsolver", 1e-4)]
)
def test_solver_equals_diffusers_given_its_sigmas(algo, tol):
    """With diffusers' float32 sigmas copied into ours, only float32 arithmetic separates the two: the
    per-algorithm tolerances of the parity tests are diffusers' schedule rounding, not a different solver.
    (dpmsolver++: 2e-5 vs 1e-4 end to end; sde-dpmsolver++ 1e-4: diffusers' float32 sqrt(1 - exp(-2h)) at a
    final step with h ~ 1e-7; dpmsolver 1e-3: float32 cancellation in both.)"""
    cases = [c for c in sample_cases(SPACE, 600, seed=3, valid=_valid) if c["algorithm_type"] == algo]
    cases = [c for c in cases if tolerance(c, _pair(c)[0]) <= 2e-3][:15]
    worst = max(_with_their_sigmas(cfg) for cfg in cases)
    assert worst <= tol, worst


def test_noise_prediction_sde_on_an_extreme_schedule_given_diffusers_sigmas():
    """End to end this case is 0.57 off diffusers (our `karras` schedule with zero terminal SNR: diffusers'
    sigmas 0.7% off, the noise-prediction SDE swells the sample to ~1.5e3); with its sigmas, 1e-5."""
    cfg = dict(
        DEFAULTS,
        algorithm_type="sde-dpmsolver",
        solver_order=1,
        prediction_type="v_prediction",
        sigmas="lu",
        final_sigmas_type="sigma_min",
        beta_schedule="karras",
        rescale_betas_zero_snr=True,
        lower_order_final=False,
        timestep_spacing="leading",
        steps=10,
    )
    assert _with_their_sigmas(cfg) <= 1e-4
    assert _check_parity(cfg) > 0.1


@pytest.mark.parametrize("algo", NOISE_ALGOS)
def test_noise_prediction_on_extreme_schedules(algo):
    """dpmsolver / sde-dpmsolver (noise prediction) where sigma_max > 1e3 or sigma_min < 5e-3: our float32 run
    stays within 3e-2 of our float64 run (diffusers' float32 run is up to ~0.5 off it)."""
    for sched, rescale in [("squaredcos_cap_v2", False), ("linear", True), ("cosine", False), ("karras", True)]:
        for pt, n, sigmas in [
            ("epsilon", 10, None),
            ("v_prediction", 7, "use_karras_sigmas"),
            ("sample", 2, None),
            ("v_prediction", 10, "use_lu_lambdas"),
        ]:
            kw = dict(
                algorithm_type=algo,
                final_sigmas_type="sigma_min",
                beta_schedule=sched,
                rescale_betas_zero_snr=rescale,
                prediction_type=pt,
            )
            if sigmas:
                kw[sigmas] = True
            x32 = TorchGenerator(0).randn((2, 3, 8, 8))
            a = _loop(Ours(**kw), n, x32)
            b = _loop(Ours(**kw), n, x32.astype(np.float64))
            worst = max(rel_err(p, q) for p, q in zip(a, b))
            assert worst <= 3e-2, (kw, n, worst)
            assert all(np.isfinite(p).all() for p in a)


# -- timesteps -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 61, 999, 1000])
@pytest.mark.parametrize(
    "extra",
    [{}, {"steps_offset": 1}, {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}],
    ids=["plain", "offset1", "lclip"],
)
def test_spaced_timesteps_equal_diffusers(spacing, n, extra):
    """Exact, or a clear ValueError where diffusers' own timesteps repeat (NaN / IndexError later) or leave
    [0, T) (it feeds t = 1000 to the model)."""
    ours, theirs = (
        Ours(timestep_spacing=spacing, **extra),
        diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, **extra),
    )
    theirs.set_timesteps(n)
    dt = theirs.timesteps.numpy()
    if len(np.unique(dt)) < len(dt) or dt.max() >= 1000:
        with pytest.raises(ValueError, match="repeated timesteps|outside"):
            ours.set_timesteps(n)
        return
    ours.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps, dt)
    assert ours.timesteps.dtype == np.int64
    assert ours.num_inference_steps == theirs.num_inference_steps == len(dt)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-4 if "beta_schedule" not in extra else 1e-3)


@pytest.mark.parametrize("kind", ["karras", "lu", "exp", "beta"])
@pytest.mark.parametrize(
    "schedule,rescale",
    [
        ("linear", False),
        ("scaled_linear", False),
        ("squaredcos_cap_v2", False),
        ("linear", True),
        ("squaredcos_cap_v2", True),
    ],
)
def test_sigma_list_timesteps_equal_diffusers(kind, schedule, rescale):
    """Karras / Lu / exponential / beta timesteps go through a float32 replica of diffusers' alphas_cumprod:
    equal for these n (float64 arrays would be one unit off for 25-100% of n)."""
    cfg = {"beta_schedule": schedule, "rescale_betas_zero_snr": rescale, "sigmas": kind}
    ours, theirs = _pair(cfg, diffusers.DPMSolverMultistepScheduler)
    for n in [1, 2, 7, 10, 25, 50, 100]:
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy(), err_msg=f"n={n}")
        big = _extremes(ours)[0] > 1e3
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-3 if big else 1e-4, atol=1e-12)


@pytest.mark.parametrize(
    "kw,n",
    [
        ({"timestep_spacing": "leading", "steps_offset": 1}, 999),
        ({"timestep_spacing": "leading"}, 1000),
        ({"lambda_min_clipped": 100.0}, 10),
    ],
)
def test_sigma_lists_ignore_the_spacing(kw, n):
    """With Karras sigmas the spaced timesteps are unused (diffusers computes and drops them), so spacings that
    are refused on their own (test_degenerate_schedules_refused) are fine here."""
    ours, theirs = (
        Ours(use_karras_sigmas=True, **kw),
        diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **kw),
    )
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["karras", "lu", "exp", "beta"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale", [False, True])
def test_sigma_list_timesteps_every_n(kind, schedule, rescale):
    """n = 1 .. 1000 (every 3rd; 11th for beta): equal for >= 97% of n; otherwise one timestep is one unit
    off (torch's float32 linspace / sqrt rounding, which the replica cannot replay)."""
    ours, theirs = _pair(
        {"beta_schedule": schedule, "rescale_betas_zero_snr": rescale, "sigmas": kind},
        diffusers.DPMSolverMultistepScheduler,
    )
    ns = range(1, 1001, 3 if kind != "beta" else 11)
    mismatched = 0
    for n in ns:
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        d = np.abs(ours.timesteps - theirs.timesteps.numpy())
        assert d.max() <= 1, n
        mismatched += int(d.max() > 0)
    assert mismatched <= 0.03 * len(ns), mismatched


def test_float32_replica_of_diffusers_alphas_cumprod():
    for schedule, rescale in itertools.product(DIFFUSERS_SCHEDULES, [False, True]):
        kw = {"beta_schedule": schedule, "rescale_betas_zero_snr": rescale}
        ours, theirs = Ours(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
        rep = ours._alphas_cumprod_f32()
        ref = theirs.alphas_cumprod.numpy()
        assert rep.dtype == np.float32
        if not rescale:  # torch's float32 linspace replayed, or the same float32 betas: bit-identical
            np.testing.assert_array_equal(rep, ref)
        if schedule == "squaredcos_cap_v2":  # betas from Python floats: the replica is their float32 cast
            np.testing.assert_array_equal(diffusers_float32_alphas_cumprod(ours._raw_betas, rescale), rep)
        np.testing.assert_allclose(rep, ref, rtol=5e-5)
        # our float64 schedule is the exact one; diffusers' float32 one is within the documented 1e-4
        np.testing.assert_allclose(ours.alphas_cumprod, ref, rtol=1e-4 if not rescale else 2e-4, atol=1e-7)


def test_trailing_extra_timestep_minus_one_as_diffusers():
    ours, theirs = Ours(timestep_spacing="trailing"), diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing")
    err = run_parity(ours, theirs, 61)
    assert ours.timesteps[-1] == -1 and len(ours.timesteps) == 62 and ours.num_inference_steps == 62
    assert ours.sigmas[-2] == pytest.approx(np.sqrt((1 - ours.alphas_cumprod[0]) / ours.alphas_cumprod[0]))
    assert err <= 1e-4


def test_trailing_zero_then_minus_one_repeats_a_sigma():
    """trailing with n = 769 ends ..., 2, 0, -1: t = -1 has the sigma of t = 0 (h = 0). diffusers' midpoint
    update passes through (parity); its heun update is NaN there, ours the exact limit (no change)."""
    cfg = dict(DEFAULTS, timestep_spacing="trailing", steps=769)
    assert run_parity(*_pair(cfg), 769) <= 1e-4
    ours, theirs = _pair(dict(cfg, solver_type="heun"))
    a = _loop(ours, 769, TorchGenerator(0).randn((1, 3, 4, 4)))
    assert list(ours.timesteps[-2:]) == [0, -1] and ours.sigmas[-3] == ours.sigmas[-2]
    np.testing.assert_array_equal(a[-2], a[-3])
    assert np.isfinite(a[-1]).all()
    b = _loop(theirs, 769, torch.from_numpy(TorchGenerator(0).randn((1, 3, 4, 4))), torch_side=True)
    assert np.isnan(b[-2]).all()


def test_timesteps_before_set_timesteps_as_diffusers():
    ours, theirs = Ours(), diffusers.DPMSolverMultistepScheduler()
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-4)
    assert ours.init_noise_sigma == 1.0 and isinstance(ours.init_noise_sigma, float)
    assert Ours.order == diffusers.DPMSolverMultistepScheduler.order == 1


def test_custom_timesteps_as_diffusers():
    ts = [901, 700, 420, 250, 99, 10]
    ours, theirs = Ours(), diffusers.DPMSolverMultistepScheduler()
    ours.set_timesteps(timesteps=ts)
    theirs.set_timesteps(timesteps=ts)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    x = TorchGenerator(0).randn((2, 3, 8, 8))
    a = _loop_custom(ours, ts, x)
    b = _loop_custom(theirs, ts, torch.from_numpy(x))
    assert max(rel_err(p, q) for p, q in zip(a, b)) <= 1e-4
