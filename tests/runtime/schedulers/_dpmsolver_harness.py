"""Shared by the DPM-Solver tests: the configuration space, (ours, diffusers) pairs, tolerances and loops."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import torch
from _parity import fake_model, run_parity
from _sweep import case_id

from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler as Ours

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
        return False  # float32 cancellation ~1e4 in both implementations (test_dpmsolver.py's module docstring)
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


def _loop_custom(s, ts, x):
    s.set_timesteps(timesteps=ts)
    out = []
    for t in s.timesteps:
        xin = x if isinstance(x, np.ndarray) else x.numpy()
        m = fake_model(xin, float(t))
        x = s.step(m if isinstance(x, np.ndarray) else torch.from_numpy(m), t, x).prev_sample
        out.append(x)
    return out
