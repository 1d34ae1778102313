"""Shared by the UniPC tests: ``_Theirs`` and the float64 trajectories, the configuration space, one case's
parity check.

diffusers' ``UniPCMultistepScheduler.step`` takes no ``generator``, and where a step ends at sigma = 0 or has
h = 0 it returns NaN for several valid configurations (see the class docstring of ours). ``_Theirs`` adapts the
diffusers scheduler to ``run_parity`` and replaces such a non-finite result by the limit ours documents, computed
from diffusers' own state (its x_0 prediction or its corrected sample); a non-finite result anywhere else fails.
"""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import numpy as np
import torch
from _parity import _pattern, fake_model, rel_err, run_parity
from _sweep import case_id

from deploy_diff.runtime.schedulers.unipc import UniPCMultistepScheduler

STEPS = [1, 2, 7, 10, 50]
DIFFUSERS_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCHEDULE_KW = {
    "linear": {},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
}


class _Theirs:
    """diffusers' scheduler driven like ours (see the module docstring). ``sigmas``: replace diffusers' float32
    sigmas by ours (float64) after each ``set_timesteps``, to run diffusers' code in float64."""

    def __init__(self, inner, sigmas: np.ndarray | None = None):
        self.inner = inner
        self.sigmas = sigmas
        self.replaced: list[int] = []

    def set_timesteps(self, n, **kw):
        self.inner.set_timesteps(n, **kw)
        if self.sigmas is not None:
            assert len(self.sigmas) == len(self.inner.sigmas)
            self.inner.sigmas = torch.from_numpy(np.array(self.sigmas, dtype=np.float64))
        self.replaced = []
        t = self.inner.timesteps
        if len(t) > 1 and t[0] == t[1]:
            # diffusers would start at index 1 (and crash at the end); ours starts at 0 (documented)
            self.inner.set_begin_index(0)

    @property
    def timesteps(self):
        return self.inner.timesteps

    @property
    def init_noise_sigma(self):
        return self.inner.init_noise_sigma

    def scale_model_input(self, sample, t):
        return self.inner.scale_model_input(sample, t)

    def step(self, model_output, t, sample, generator=None, **kw):
        inner = self.inner
        try:
            prev = inner.step(model_output, t, sample, **kw).prev_sample
            if torch.isfinite(prev).all():
                return SimpleNamespace(prev_sample=prev)
            i = inner.step_index - 1
        except torch.linalg.LinAlgError:
            # order 3 into sigma = 0: r_k = 0 makes diffusers' R singular (raised inside the predictor, after
            # model_outputs and last_sample were updated)
            i = inner.step_index
            inner._step_index += 1
        sig_next, sig = inner.sigmas[i + 1], inner.sigmas[i]
        if sig_next == 0:  # into sigma = 0: ours gives the first-order limit, i.e. x_0
            m0 = inner.model_outputs[-1]
            if inner.predict_x0:
                ref = m0
            else:
                alpha_s0, sigma_s0 = inner._sigma_to_alpha_sigma_t(sig)
                ref = (inner.last_sample - sigma_s0 * m0) / alpha_s0
        elif sig_next == sig:  # h = 0: the identity
            ref = inner.last_sample
        else:
            raise AssertionError(f"diffusers returned non-finite values at step {i} (sigma {sig} -> {sig_next})")
        self.replaced.append(i)
        return SimpleNamespace(prev_sample=ref.to(sample.dtype))


def _model64(x: np.ndarray, t: float) -> np.ndarray:
    """fake_model in float64 (the float32 one rounds its input, which the float64 runs must not)."""
    return 0.5 * np.tanh(x) + 0.3 * np.sin(_pattern(x.shape).astype(np.float64) + t * 0.01)


def _trajectory(scheduler, n: int, dtype, seed: int = 0, shape=(2, 3, 8, 8)) -> list[np.ndarray]:
    """Every prev_sample (as float64) of a loop from run_parity's latents, with fake_model (float32) or
    _model64 (float64)."""
    is_torch = isinstance(scheduler, _Theirs)
    scheduler.set_timesteps(n)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy().astype(dtype)
    if is_torch:
        x = torch.from_numpy(x)
    out = []
    for t in scheduler.timesteps:
        xn = x.numpy() if is_torch else x
        m = fake_model(xn, float(t)) if dtype == np.float32 else _model64(xn, float(t))
        x = scheduler.step(torch.from_numpy(m) if is_torch else m, t, x).prev_sample
        out.append((x.numpy() if is_torch else x).astype(np.float64))
    return out


def _worst(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(rel_err(x, y) for x, y in zip(a, b))


# -- configuration space --------------------------------------------------------------------------------
SPACE = {
    "schedule": ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "cosine"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "solver_type": ["bh1", "bh2"],
    "solver_order": [1, 2, 3],
    "predict_x0": [True, False],
    "lower_order_final": [True, False],
    "disable_corrector": [(), (0,), (1, 3)],
    "sigmas": ["linspace", "leading", "leading+1", "trailing", "karras", "exponential", "beta", "flow"],
    "final_sigmas_type": ["zero", "sigma_min"],
    "thresholding": [False, True, "dynamic"],  # True: sample_max_value 1 (clipping); "dynamic": 2.5, ratio 0.9
    "rescale_betas_zero_snr": [False, True],
    "steps": STEPS,
}
# the slow test's full cross product
FULL_SPACE = {
    "schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "solver_type": ["bh1", "bh2"],
    "solver_order": [1, 2, 3],
    "predict_x0": [True, False],
    "lower_order_final": [True, False],
    "disable_corrector": [()],
    "sigmas": ["linspace", "leading+1", "trailing", "karras", "exponential"],
    "final_sigmas_type": ["zero", "sigma_min"],
    "thresholding": [False],
    "rescale_betas_zero_snr": [False],
    "steps": STEPS,
}


def _normalise(case: dict) -> dict:
    case = dict(case)
    if case["sigmas"] == "flow":
        case.update(prediction_type="flow_prediction", predict_x0=True, rescale_betas_zero_snr=False)
    if not case["predict_x0"]:
        case["thresholding"] = False  # only acts on x_0 predictions
    return case


def _configs(case: dict) -> tuple[dict, dict]:
    """(our kwargs, diffusers' kwargs) of a case; our non-diffusers schedules reach diffusers as trained_betas."""
    kw = {
        k: case[k]
        for k in (
            "prediction_type",
            "solver_type",
            "solver_order",
            "predict_x0",
            "lower_order_final",
            "final_sigmas_type",
            "rescale_betas_zero_snr",
        )
    }
    kw["thresholding"] = bool(case["thresholding"])
    if case["thresholding"] == "dynamic":
        kw.update(sample_max_value=2.5, dynamic_thresholding_ratio=0.9)
    kw["disable_corrector"] = list(case["disable_corrector"])
    sig = case["sigmas"]
    if sig in ("linspace", "leading", "trailing"):
        kw["timestep_spacing"] = sig
    elif sig == "leading+1":
        kw.update(timestep_spacing="leading", steps_offset=1)
    elif sig == "flow":
        kw.update(use_flow_sigmas=True, flow_shift=3.0)
    else:
        kw[f"use_{sig}_sigmas"] = True
    schedule = case["schedule"]
    ours = dict(kw, beta_schedule=schedule, **SCHEDULE_KW.get(schedule, {}))
    if schedule in DIFFUSERS_SCHEDULES:
        theirs = dict(ours)
    else:
        theirs = dict(kw, trained_betas=UniPCMultistepScheduler(**ours)._raw_betas.tolist())
    return ours, theirs


def _tolerance(ours: UniPCMultistepScheduler) -> float:
    # diffusers' float32 schedule is ~1e-3 off where sigma at the first timestep exceeds 1e3 (docs/parity.md)
    return 1e-2 if ours.sigmas[0] > 1e3 else 1e-4


def _run_case(case: dict) -> dict:
    """Parity of one case, three ways:

    * float32, ours vs diffusers (run_parity): within 1e-4 (1e-2 where sigma_max > 1e3);
    * float64, ours vs diffusers' own code run in float64 on our sigmas: the algorithm and the state machine,
      free of float32 noise, within 1e-8;
    * where the float32 runs differ by more than the tolerance, the configuration is ill-conditioned in float32
      (predict_x0=False with sample/v prediction converts x_0 to epsilon and back, cancelling terms of size
      sigma_max; flow sigmas at 1 - 1e-6 lose 1% of alpha = 1 - sigma in float32; diffusers' float32 sigma_min
      is ~1e-3 off for squaredcos-like schedules): then ours must be at least as close to the float64
      reference as diffusers' float32 run is (within 4x: rounding errors scatter).
    """
    ours_kw, theirs_kw = _configs(case)
    n = case["steps"]
    ours = UniPCMultistepScheduler(**ours_kw)
    theirs32 = _Theirs(diffusers.UniPCMultistepScheduler(**theirs_kw))
    err32 = run_parity(ours, theirs32, n)
    # only the documented last-step limits may differ from diffusers' own arithmetic
    assert set(theirs32.replaced) <= {n - 1}, theirs32.replaced
    tol = _tolerance(ours)

    theirs64 = _Theirs(diffusers.UniPCMultistepScheduler(**theirs_kw), sigmas=ours.sigmas)
    ref = _trajectory(theirs64, n, np.float64)
    err64 = _worst(_trajectory(UniPCMultistepScheduler(**ours_kw), n, np.float64), ref)
    assert err64 <= 1e-8, (case_id(case), err64)
    result = {"err32": err32, "err64": err64, "tol": tol, "replaced": theirs32.replaced, "ill": False}
    if err32 > tol:
        mine = _worst(_trajectory(UniPCMultistepScheduler(**ours_kw), n, np.float32), ref)
        theirs = _worst(_trajectory(theirs32, n, np.float32), ref)
        assert mine <= max(tol, 4 * theirs), (case_id(case), err32, mine, theirs)
        result.update(ill=True, ours_vs_ref=mine, theirs_vs_ref=theirs)
    return result
