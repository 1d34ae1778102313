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
* sigma_max > 1e3 (squaredcos_cap_v2, zero terminal SNR, our ``cosine``): 1e-2 (DESIGN.md: diffusers' float32
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
import json
import math
import time
import warnings

import diffusers
import numpy as np
import pytest
import torch
from _parity import fake_model, rel_err, run_parity
from _sweep import case_id, cross_product, run_sweep, sample_cases

from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler as Ours
from deploy_diff.runtime.schedulers.sigmas import diffusers_float32_alphas_cumprod

# diffusers' own noise: its deprecation notice for (sde-)dpmsolver and a NumPy 2 __array__ notice
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*algorithm_types dpmsolver and sde-dpmsolver:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

STEPS = [1, 2, 7, 10, 50]
NOISE_ALGOS = ("dpmsolver", "sde-dpmsolver")
DIFFUSERS_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SIGMA_FLAGS = {
    "karras": "use_karras_sigmas",
    "lu": "use_lu_lambdas",
    "exp": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}

SPACE = {
    "algorithm_type": ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"],
    "solver_order": [1, 2, 3],
    "solver_type": ["midpoint", "heun"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "sigmas": ["plain", "karras", "lu", "exp", "beta"],
    "final_sigmas_type": ["zero", "sigma_min"],
    "lower_order_final": [True, False],
    "euler_at_final": [False, True],
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "cosine", "karras"],
    "rescale_betas_zero_snr": [False, True],
    "timestep_spacing": ["linspace", "leading", "trailing"],
    "steps_offset": [0, 1],
    "lambda_min_clipped": [-math.inf, -5.1],
    "thresholding": [False, True],
    "variance_type": [None, "learned_range"],
    "steps": STEPS,
}
# the full cross product of SPACE is ~10^7 runs: the slow tests take the cross product of the solver axes
# (default schedule) and of the schedule axes (default solver), plus a large random sample of everything
SOLVER_AXES = (
    "algorithm_type",
    "solver_order",
    "solver_type",
    "prediction_type",
    "sigmas",
    "final_sigmas_type",
    "lower_order_final",
    "euler_at_final",
    "steps",
)
SCHEDULE_AXES = (
    "beta_schedule",
    "rescale_betas_zero_snr",
    "timestep_spacing",
    "steps_offset",
    "lambda_min_clipped",
    "thresholding",
    "variance_type",
    "prediction_type",
    "steps",
)
# diffusers' defaults (dpmsolver++, second order, midpoint, linspace) with 10 steps
DEFAULTS = {k: v[0] for k, v in SPACE.items()} | {"solver_order": 2, "steps": 10}


class FromStart(diffusers.DPMSolverMultistepScheduler):
    """diffusers, told to start at index 0 where the first timestep repeats (a documented difference: its own
    lookup takes the second occurrence and fails with IndexError at the last step). Otherwise unchanged."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        if len(self.timesteps) > 1 and self.timesteps[0] == self.timesteps[1]:
            self.set_begin_index(0)


def _kwargs(cfg: dict) -> dict:
    kw = {k: v for k, v in cfg.items() if k not in ("sigmas", "steps")}
    if cfg.get("sigmas", "plain") != "plain":
        kw[SIGMA_FLAGS[cfg["sigmas"]]] = True
    if kw.get("beta_schedule") == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    return kw


def _pair(cfg: dict, theirs_cls=FromStart, ours_cls=Ours):
    kw = _kwargs(cfg)
    ours = ours_cls(**kw)
    if kw.get("beta_schedule", "linear") not in DIFFUSERS_SCHEDULES:
        kw["trained_betas"] = ours._raw_betas.tolist()  # diffusers' DPM-Solver knows ours only as trained_betas
    return ours, theirs_cls(**kw)


def _extremes(ours) -> tuple[float, float]:
    ac = ours.alphas_cumprod
    return float(np.sqrt((1 - ac[-1]) / ac[-1])), float(np.sqrt((1 - ac[0]) / ac[0]))


def tolerance(cfg: dict, ours) -> float:
    sigma_max, sigma_min = _extremes(ours)
    if sigma_min < 5e-3:
        return 2e-2  # our `karras` schedule: diffusers' float32 sigmas are up to 0.7% off (1 - abar_0 ~ 4e-6)
    if sigma_max > 1e3:
        return 1e-2
    algo = cfg.get("algorithm_type", "dpmsolver++")
    if algo in NOISE_ALGOS:
        return 2e-3
    return 5e-4 if algo == "sde-dpmsolver++" else 1e-4


def _nan_in_diffusers(cfg: dict) -> bool:
    """Karras / Lu / exponential / beta sigmas end at sigma_min; final_sigmas_type="sigma_min" repeats it, so
    the last step has h = 0, where diffusers' heun and third-order updates are NaN unless the last step is
    lowered to first order (tested in test_repeated_final_sigma_is_exact_where_diffusers_is_nan)."""
    n = cfg["steps"]
    lowered = cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
    return (
        cfg["sigmas"] != "plain"
        and cfg["final_sigmas_type"] == "sigma_min"
        and n >= 2
        and cfg["solver_order"] >= 2
        and not lowered
    )


def _valid(cfg: dict) -> bool:
    algo = cfg["algorithm_type"]
    if algo in NOISE_ALGOS and cfg["final_sigmas_type"] == "zero":
        return False  # refused by both (test_bad_config_values)
    if algo == "sde-dpmsolver" and cfg["solver_order"] == 3:
        return False  # refused by ours, UnboundLocalError in diffusers (test_sde_dpmsolver_third_order_refused)
    if cfg["variance_type"] and cfg["prediction_type"] != "epsilon":
        return False  # diffusers crashes (test_learned_variance_uses_the_first_c_channels)
    if cfg["timestep_spacing"] != "leading" and cfg["steps_offset"]:
        return False  # steps_offset only acts on leading spacing; keep the sample varied
    if _nan_in_diffusers(cfg):
        return False
    if algo in NOISE_ALGOS and (
        cfg["beta_schedule"] in ("squaredcos_cap_v2", "cosine", "karras") or cfg["rescale_betas_zero_snr"]
    ):
        return False  # float32 cancellation ~1e4 in both implementations (module docstring)
    return True


def _check_parity(cfg: dict) -> float:
    ours, theirs = _pair(cfg)
    out_channels = 6 if cfg["variance_type"] else None
    err = run_parity(ours, theirs, cfg["steps"], out_channels=out_channels)
    assert np.isfinite(err)
    return err


def _run_parity(cfg: dict) -> None:
    err = _check_parity(cfg)
    ours = _pair(cfg)[0]
    assert err <= tolerance(cfg, ours), (case_id(cfg), err, tolerance(cfg, ours))


def _loop(s, n, x, seed=1, out_channels=None, torch_side=False, **step_kwargs):
    """Run a full loop of ``s`` on the fake model; returns the list of prev_samples (NumPy)."""
    s.set_timesteps(n)
    g = torch.Generator().manual_seed(seed) if torch_side else TorchGenerator(seed)
    outs = []
    for t in s.timesteps:
        xin = x.numpy() if torch_side else x
        m = fake_model(xin, float(t), out_channels).astype(xin.dtype)
        m = torch.from_numpy(m) if torch_side else m
        x = s.step(m, t, x, generator=g, **step_kwargs).prev_sample
        outs.append(x.numpy() if torch_side else x)
    return outs


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


class WithTheirSigmas(Ours):
    """Ours with diffusers' float32 sigmas copied in after set_timesteps (``theirs`` is set by the test)."""

    theirs = None

    def set_timesteps(self, n):
        super().set_timesteps(n)
        self.theirs.set_timesteps(n)
        s = self.theirs.sigmas.numpy().astype(np.float64)
        self.sigmas = s
        alpha = 1 / np.sqrt(1 + s * s)
        self._alpha, self._sigma = alpha.tolist(), (s * alpha).tolist()
        with np.errstate(divide="ignore"):
            self._lambda = (-np.log(s)).tolist()


def _with_their_sigmas(cfg):
    ours, theirs = _pair(cfg, ours_cls=WithTheirSigmas)
    ours.theirs = theirs
    return run_parity(ours, theirs, cfg["steps"], out_channels=6 if cfg["variance_type"] else None)


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


def _loop_custom(s, ts, x):
    s.set_timesteps(timesteps=ts)
    out = []
    for t in s.timesteps:
        xin = x if isinstance(x, np.ndarray) else x.numpy()
        m = fake_model(xin, float(t))
        x = s.step(m if isinstance(x, np.ndarray) else torch.from_numpy(m), t, x).prev_sample
        out.append(x)
    return out


# -- SDE noise -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_sde_noise_with_generator_lists_matches_diffusers(algo):
    """One generator per image (diffusers' randn_tensor with a list): each image draws its own slice."""
    kw = {"algorithm_type": algo, "final_sigmas_type": "sigma_min" if algo == "sde-dpmsolver" else "zero"}
    ours, theirs = Ours(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    x = TorchGenerator(0).randn((2, 3, 8, 8))
    y = torch.from_numpy(x.copy())
    go = [TorchGenerator(3), TorchGenerator(4)]
    gt = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    worst = 0.0
    for t in ours.timesteps:
        x = ours.step(fake_model(x, float(t)), t, x, generator=go).prev_sample
        y = theirs.step(torch.from_numpy(fake_model(y.numpy(), float(t))), t, y, generator=gt).prev_sample
        worst = max(worst, rel_err(x, y))
    assert worst <= 3e-4
    # the noise matters: other seeds give another result
    z = _loop(Ours(**kw), 6, TorchGenerator(0).randn((2, 3, 8, 8)), seed=5)[-1]
    assert rel_err(z, y) > 1e-3


def test_sde_variance_noise_matches_diffusers():
    ours, theirs = (
        Ours(algorithm_type="sde-dpmsolver++"),
        diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
    )
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x = TorchGenerator(0).randn((1, 3, 8, 8))
    y = torch.from_numpy(x.copy())
    noise = TorchGenerator(9).randn((5, 1, 3, 8, 8))
    for i, t in enumerate(ours.timesteps):
        x = ours.step(fake_model(x, float(t)), t, x, variance_noise=noise[i]).prev_sample
        y = theirs.step(
            torch.from_numpy(fake_model(y.numpy(), float(t))), t, y, variance_noise=torch.from_numpy(noise[i])
        ).prev_sample
    assert rel_err(x, y) <= 1e-4


def test_sde_other_generators_and_none_give_finite_float32():
    for g in (None, np.random.default_rng(0), TorchGenerator(0)):
        s = Ours(algorithm_type="sde-dpmsolver++", solver_order=3)
        s.set_timesteps(8)
        x = TorchGenerator(0).randn((2, 3, 8, 8))
        for t in s.timesteps:
            x = s.step(fake_model(x, float(t)), t, x, generator=g).prev_sample
        assert x.dtype == np.float32 and np.isfinite(x).all()


# -- documented differences ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["karras", "lu", "exp", "beta"])
@pytest.mark.parametrize("solver_type,order", [("heun", 2), ("midpoint", 3), ("heun", 3)])
def test_repeated_final_sigma_is_exact_where_diffusers_is_nan(kind, solver_type, order):
    """final_sigmas_type="sigma_min" repeats the last sigma of these lists (h = 0 at the last step, PR #6477's
    sigma_min). diffusers' heun / third-order update is NaN there; ours returns the sample unchanged (the
    h -> 0 limit, which is also what diffusers' midpoint second-order update gives). Steps before agree."""
    cfg = dict(
        DEFAULTS, sigmas=kind, final_sigmas_type="sigma_min", solver_type=solver_type, solver_order=order, steps=20
    )
    ours, theirs = _pair(cfg)
    a = _loop(ours, 20, TorchGenerator(0).randn((2, 3, 8, 8)))
    b = _loop(theirs, 20, torch.from_numpy(TorchGenerator(0).randn((2, 3, 8, 8))), torch_side=True)
    assert np.isnan(b[-1]).any()
    assert max(rel_err(p, q) for p, q in zip(a[:-1], b[:-1])) <= 1e-4
    np.testing.assert_array_equal(a[-1], a[-2])
    assert ours.sigmas[-1] == ours.sigmas[-2]


def test_karras_sigma_min_midpoint_repeats_last_sigma_like_diffusers():
    """Current diffusers (after PR #6477): Karras + dpmsolver++ ends at sigma_min with "sigma_min" (a final
    no-op step) and at 0 with "zero"; both match diffusers."""
    for final in ("sigma_min", "zero"):
        ours, theirs = (
            Ours(use_karras_sigmas=True, final_sigmas_type=final),
            diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type=final),
        )
        assert run_parity(ours, theirs, 20) <= 1e-4
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-4)
        assert (ours.sigmas[-1] == ours.sigmas[-2]) == (final == "sigma_min")


def test_repeated_first_timestep_starts_at_index_zero():
    """Non-rounded Karras timesteps of squaredcos_cap_v2 + zero terminal SNR start 998, 998, 998, ...:
    diffusers' lookup takes the second 998, skips sigma_max and raises IndexError at the last step; ours
    starts at 0, as diffusers does when told set_begin_index(0)."""
    cfg = dict(DEFAULTS, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, sigmas="karras", steps=10)
    ours, _ = _pair(cfg)
    ours.set_timesteps(10)
    assert ours.timesteps[0] == ours.timesteps[1]
    plain = diffusers.DPMSolverMultistepScheduler(**_kwargs(cfg))
    with pytest.raises(IndexError):
        _loop(plain, 10, torch.from_numpy(TorchGenerator(0).randn((2, 3, 8, 8))), torch_side=True)
    _run_parity(cfg)  # against FromStart
    # and mid-loop lookups of a repeated timestep still take diffusers' second occurrence
    assert ours.index_for_timestep(ours.timesteps[0]) == 1


def test_sde_dpmsolver_third_order_refused():
    with pytest.raises(ValueError, match="solver_order=3"):
        Ours(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    theirs = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False
    )
    with pytest.raises(UnboundLocalError):
        _loop(theirs, 5, torch.zeros((1, 3, 4, 4)), torch_side=True)


def test_deis_and_unipc_aliases(tmp_path):
    """algorithm_type "deis" and solver_type "logrho"/"bh1"/"bh2" map as in diffusers; "deis" works with
    the default final_sigmas_type="zero" (diffusers raises, checking before it maps)."""
    s = Ours(algorithm_type="deis", solver_type="bh2")
    assert s.config["algorithm_type"] == "dpmsolver++" and s.config["solver_type"] == "midpoint"
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.DPMSolverMultistepScheduler(algorithm_type="deis")
    x = TorchGenerator(0).randn((1, 3, 8, 8))
    np.testing.assert_array_equal(_loop(s, 7, x)[-1], _loop(Ours(), 7, x)[-1])
    # a DEIS scheduler_config.json from disk loads (diffusers' DPMSolver raises on it)
    diffusers.DEISMultistepScheduler(solver_order=3).save_config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Ours.from_config(tmp_path)
    assert t.config["algorithm_type"] == "dpmsolver++" and t.config["solver_order"] == 3
    with pytest.raises(ValueError):
        diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("algo", ["dpmsolver++", "dpmsolver"])
def test_learned_variance_uses_the_first_c_channels(channels, pt, algo):
    """variance_type set and a 2C-channel output: the first C channels are the prediction. diffusers takes
    [:, :3] (right for 3 channels, with epsilon only; other cases crash or mis-broadcast there)."""
    kw = {
        "variance_type": "learned_range",
        "prediction_type": pt,
        "algorithm_type": algo,
        "final_sigmas_type": "sigma_min" if algo == "dpmsolver" else "zero",
    }
    shape = (2, channels, 8, 8)
    x = TorchGenerator(0).randn(shape)
    a = _loop(Ours(**kw), 7, x, out_channels=2 * channels)
    kw.pop("variance_type")
    b = _loop(Ours(**kw), 7, x)  # the same model without the variance channels
    np.testing.assert_allclose(a[-1], b[-1], rtol=0, atol=1e-6)
    if channels == 3 and pt == "epsilon":
        theirs = diffusers.DPMSolverMultistepScheduler(variance_type="learned_range", **kw)
        c = _loop(theirs, 7, torch.from_numpy(x), out_channels=6, torch_side=True)
        assert max(rel_err(p, q) for p, q in zip(a, c)) <= 1e-3


def test_add_noise_as_diffusers_after_set_timesteps():
    for kw in ({}, {"use_karras_sigmas": True}, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}):
        ours, theirs = Ours(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
        ours.set_timesteps(10)
        theirs.set_timesteps(10)
        x0 = TorchGenerator(1).randn((3, 3, 4, 4))
        noise = TorchGenerator(2).randn((3, 3, 4, 4))
        ts = ours.timesteps[[0, 4, 9]]
        a = ours.add_noise(x0, noise, ts)
        b = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(ts)).numpy()
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        # begin index rule: every entry uses the begin index (img2img), then the current step index
        ours.set_begin_index(3)
        theirs.set_begin_index(3)
        np.testing.assert_allclose(
            ours.add_noise(x0, noise, ts),
            theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(ts)).numpy(),
            rtol=1e-4,
            atol=1e-5,
        )
        fresh = Ours(**kw)
        fresh.set_timesteps(10)
        with pytest.raises(ValueError, match="not one of"):
            fresh.add_noise(x0, noise, np.array([5, 6, 7]))  # diffusers: silently the last step's sigma


def test_add_noise_before_set_timesteps_uses_the_training_schedule():
    """diffusers' DPM-Solver add_noise before set_timesteps pairs timestep t with the sigma of T - 1 - t;
    ours uses the training schedule: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    ours, theirs = Ours(), diffusers.DPMSolverMultistepScheduler()
    x0, noise, t = np.ones((2, 1, 1, 1), np.float32), np.ones((2, 1, 1, 1), np.float32), np.array([10, 990])
    ac = ours.alphas_cumprod[t]
    np.testing.assert_allclose(ours.add_noise(x0, noise, t).ravel(), np.sqrt(ac) + np.sqrt(1 - ac), rtol=1e-6)
    bad = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy().ravel()
    assert not np.allclose(bad, np.sqrt(ac) + np.sqrt(1 - ac), rtol=1e-3)
    swapped = ours.alphas_cumprod[999 - t]
    np.testing.assert_allclose(bad, np.sqrt(swapped) + np.sqrt(1 - swapped), rtol=1e-4)  # t <-> T - 1 - t


def test_zero_snr_clamps_last_alpha_cumprod_like_diffusers():
    ours = Ours(rescale_betas_zero_snr=True)
    theirs = diffusers.DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)
    assert ours.alphas_cumprod[-1] == 2.0**-24 == float(theirs.alphas_cumprod[-1])
    ours.set_timesteps(10)
    assert ours.sigmas[0] == pytest.approx(4096.0, rel=1e-6)
    np.testing.assert_allclose(ours.alpha_t, theirs.alpha_t.numpy(), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(ours.lambda_t, theirs.lambda_t.numpy(), rtol=1e-4, atol=1e-5)


# -- state, begin index, dtypes ------------------------------------------------------------------------------
def test_set_timesteps_resets_multistep_state():
    s = Ours(solver_order=3, algorithm_type="sde-dpmsolver++")
    x = TorchGenerator(0).randn((2, 3, 8, 8))
    first = _loop(s, 10, x)
    # interrupt a loop half-way, then start again: same result as a fresh scheduler
    s.set_timesteps(10)
    y = x
    for t in s.timesteps[:4]:
        y = s.step(fake_model(y, float(t)), t, y, generator=TorchGenerator(7)).prev_sample
    assert s.step_index == 4 and s.lower_order_nums == 3
    second = _loop(s, 10, x)
    for p, q in zip(first, second):
        np.testing.assert_array_equal(p, q)
    s.set_timesteps(5)
    assert s.step_index is None and s.lower_order_nums == 0 and s.model_outputs == [None] * 3
    assert s.begin_index is None


def test_begin_index_img2img_as_diffusers():
    ours, theirs = Ours(solver_order=3), diffusers.DPMSolverMultistepScheduler(solver_order=3)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    ours.set_begin_index(8)
    theirs.set_begin_index(8)
    x = TorchGenerator(0).randn((2, 3, 8, 8))
    y = torch.from_numpy(x.copy())
    for t_o, t_t in zip(ours.timesteps[8:], theirs.timesteps[8:]):
        x = ours.step(fake_model(x, float(t_o)), t_o, x).prev_sample
        y = theirs.step(torch.from_numpy(fake_model(y.numpy(), float(t_t))), t_t, y).prev_sample
    assert ours.step_index == 20
    assert rel_err(x, y) <= 1e-4
    # without a begin index the first step looks its timestep up (starting mid-schedule)
    s = Ours()
    s.set_timesteps(20)
    s.step(np.zeros((1, 3, 4, 4), np.float32), s.timesteps[5], np.zeros((1, 3, 4, 4), np.float32))
    assert s.step_index == 6


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_and_outputs(dtype):
    s = Ours(solver_order=3)
    s.set_timesteps(10)
    x = TorchGenerator(0).randn((2, 3, 8, 8)).astype(dtype)
    ref = _loop(Ours(solver_order=3), 10, x.astype(np.float32))[-1]
    out = None
    for t in s.timesteps:
        m = fake_model(x, float(t)).astype(dtype)
        out = s.step(m, t, x)
        x = out.prev_sample
        assert x.dtype == dtype
    assert np.isfinite(x).all()
    assert rel_err(x.astype(np.float32), ref) <= (5e-3 if dtype == np.float16 else 1e-5)
    assert out.pred_original_sample.dtype == dtype
    s.set_timesteps(2)
    res = s.step(
        np.zeros((1, 3, 4, 4), np.float32), s.timesteps[0], np.ones((1, 3, 4, 4), np.float32), return_dict=False
    )
    assert isinstance(res, tuple) and len(res) == 1  # (prev_sample,) as diffusers


def test_pred_original_sample_is_x0():
    for algo in ("dpmsolver++", "dpmsolver"):
        s = Ours(algorithm_type=algo, final_sigmas_type="sigma_min")
        s.set_timesteps(10)
        x = TorchGenerator(0).randn((1, 3, 8, 8))
        eps = fake_model(x, 999.0)
        out = s.step(eps, s.timesteps[0], x)
        a, sig = 1 / math.sqrt(1 + s.sigmas[0] ** 2), s.sigmas[0] / math.sqrt(1 + s.sigmas[0] ** 2)
        np.testing.assert_allclose(out.pred_original_sample, (x - sig * eps) / a, rtol=1e-5, atol=1e-5)


# timed, so kept out of the default suite (a busy CI machine would make it flaky); the figures
# come from benchmarks/scheduler_step.py
@pytest.mark.slow
def test_step_is_much_cheaper_than_diffusers():
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)

    def per_step(s, sample, n=200):
        best = float("inf")
        for _ in range(3):
            s.set_timesteps(n)
            ts = list(s.timesteps)
            t0 = time.perf_counter()
            for t in ts:
                s.step(sample, t, sample)
            best = min(best, time.perf_counter() - t0)
        return best / n

    for kw in ({}, {"solver_order": 3}, {"thresholding": True}):
        ratio = per_step(Ours(**kw), x) / per_step(diffusers.DPMSolverMultistepScheduler(**kw), torch.from_numpy(x))
        assert ratio < 0.2, (kw, ratio)  # measured 0.03-0.1 on a 2-core machine


# -- config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "algorithm_type": "sde-dpmsolver++",
            "use_karras_sigmas": True,
            "prediction_type": "v_prediction",
            "solver_order": 3,
            "timestep_spacing": "trailing",
        },
        {
            "beta_schedule": "cosine",
            "lambda_min_clipped": -5.1,
            "final_sigmas_type": "sigma_min",
            "solver_type": "heun",
        },
        {
            "beta_schedule": "sigmoid",
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "prediction_type": "v_prediction",
            "thresholding": True,
            "use_lu_lambdas": True,
        },
    ],
    ids=["default", "sde-karras", "ours-cosine", "sigmoid-zsnr-lu"],
)
def test_config_round_trip_through_diffusers(kw, tmp_path):
    ours = Ours(**kw)
    path = ours.save_config(tmp_path)
    data = json.loads(path.read_text())
    assert data["_class_name"] == "DPMSolverMultistepScheduler"
    assert ("trained_betas" in data and data["trained_betas"] is not None) == (
        kw.get("beta_schedule", "linear") not in DIFFUSERS_SCHEDULES
    )
    theirs = FromStart.from_pretrained(tmp_path)
    back = Ours.from_config(tmp_path)
    assert {k: v for k, v in back.config.items() if k != "trained_betas"} == {
        k: v for k, v in ours.config.items() if k != "trained_betas"
    }
    np.testing.assert_allclose(back.alphas_cumprod, ours.alphas_cumprod, rtol=1e-12)
    tol = tolerance({"algorithm_type": ours.config["algorithm_type"]}, ours)
    assert run_parity(back, theirs, 10) <= tol
    # diffusers' own file loads here without warnings, _class_name and _diffusers_version included
    theirs.save_config(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Ours.from_config(tmp_path / "d")
    assert run_parity(again, FromStart.from_pretrained(tmp_path / "d"), 7) <= tol


@pytest.mark.parametrize(
    "cls",
    [
        "DDPMScheduler",
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "UniPCMultistepScheduler",
        "HeunDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
    ],
)
def test_other_diffusers_configs_load_like_diffusers(cls, tmp_path):
    """A bundle's scheduler_config.json of another class: diffusers' DPMSolverMultistepScheduler.from_pretrained
    keeps the file's shared values (e.g. DDPM's leading spacing); so does ours, without warnings."""
    getattr(diffusers, cls)().save_config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = Ours.from_config(tmp_path)
    theirs = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    for key in ("timestep_spacing", "beta_start", "beta_end", "prediction_type", "solver_type", "final_sigmas_type"):
        assert ours.config[key] == theirs.config[key], key
    assert run_parity(ours, theirs, 10) <= 1e-4


def test_unknown_config_key_warns(tmp_path):
    diffusers.DPMSolverMultistepScheduler().save_config(tmp_path)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    data["not_a_key"] = 1
    with pytest.warns(UserWarning, match="not_a_key"):
        Ours.from_config(data)


def test_diffusers_beta_schedules_attribute():
    assert set(Ours._diffusers_beta_schedules) == set(DIFFUSERS_SCHEDULES)
    with pytest.raises(NotImplementedError):
        diffusers.DPMSolverMultistepScheduler(beta_schedule="sigmoid")  # hence trained_betas for ours


# -- validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"algorithm_type": "dpm"}, "algorithm_type"),
        ({"solver_type": "euler"}, "solver_type"),
        ({"solver_order": 0}, "solver_order"),
        ({"solver_order": 4}, "solver_order"),
        ({"solver_order": True}, "solver_order"),
        ({"final_sigmas_type": "min"}, "final_sigmas_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"prediction_type": "flow_prediction"}, "flow"),
        ({"use_flow_sigmas": True}, "flow"),
        ({"variance_type": "learnt"}, "variance_type"),
        ({"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
        ({"algorithm_type": "sde-dpmsolver"}, "final_sigmas_type"),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one of"),
        ({"beta_schedule": "cosin"}, "beta_schedule"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
        ({"sample_max_value": 0}, "sample_max_value"),
        ({"lambda_min_clipped": float("nan")}, "lambda_min_clipped"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        Ours(**kwargs)
    assert any(w in str(e.value) for w in ("expected", "must", "not", "only one"))


@pytest.mark.parametrize("n", [0, -1, 1001, 2.5, True])
def test_bad_num_inference_steps(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        Ours().set_timesteps(n)


@pytest.mark.parametrize(
    "kw,n,match",
    [
        ({}, 1000, "repeated timesteps"),  # linspace: diffusers NaN
        ({"timestep_spacing": "leading"}, 1000, "repeated timesteps"),  # diffusers IndexError
        ({"timestep_spacing": "leading", "steps_offset": 1}, 999, "outside"),  # diffusers feeds t = 1000
        ({"lambda_min_clipped": 100.0}, 5, "outside"),  # clips every timestep
    ],
)
def test_degenerate_schedules_refused(kw, n, match):
    with pytest.raises(ValueError, match=match):
        Ours(**kw).set_timesteps(n)


def test_bad_set_timesteps_and_step_arguments():
    s = Ours()
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(5, timesteps=[10, 5])
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[5, 10])
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[1000, 10])
    with pytest.raises(ValueError, match="integers"):
        s.set_timesteps(timesteps=[10.5, 3])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        Ours(use_karras_sigmas=True).set_timesteps(timesteps=[10, 5])
    x = np.zeros((1, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="not one of"):
        s.step(x, 998, x)
    with pytest.raises(ValueError, match="variance_type"):
        s.step(np.zeros((1, 6, 4, 4), np.float32), s.timesteps[0], x)
    with pytest.raises(TypeError):
        s.step(torch.zeros(1, 3, 4, 4), s.timesteps[0], x)
    for t in s.timesteps:
        s.step(x, t, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, s.timesteps[-1], x)
    sde = Ours(algorithm_type="sde-dpmsolver++")
    sde.set_timesteps(3)
    with pytest.raises(ValueError, match="variance_noise"):
        sde.step(x, sde.timesteps[0], x, variance_noise=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(-1)
