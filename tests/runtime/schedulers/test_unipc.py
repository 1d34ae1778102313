"""UniPC against diffusers: timesteps, every prev_sample of full loops, the multistep state, documented differences.

diffusers' ``UniPCMultistepScheduler.step`` takes no ``generator``, and where a step ends at sigma = 0 or has
h = 0 it returns NaN for several valid configurations (see the class docstring of ours). ``_Theirs`` adapts the
diffusers scheduler to ``run_parity`` and replaces such a non-finite result by the limit ours documents, computed
from diffusers' own state (its x_0 prediction or its corrected sample); a non-finite result anywhere else fails.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from _parity import _pattern, fake_model, rel_err, run_parity
from _sweep import case_id, cross_product, run_sweep, sample_cases

from deploy_diff.runtime.schedulers.sigmas import torch_linspace_f32
from deploy_diff.runtime.schedulers.unipc import UniPCMultistepScheduler

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

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
    # diffusers' float32 schedule is ~1e-3 off where sigma at the first timestep exceeds 1e3 (DESIGN.md)
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


# -- the multistep state machine ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"solver_order": 3, "disable_corrector": [0, 2]},
        {"solver_order": 2, "lower_order_final": False, "final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        {"solver_order": 3, "predict_x0": False, "solver_type": "bh1", "prediction_type": "v_prediction"},
        {"solver_order": 1, "timestep_spacing": "trailing"},
    ],
    ids=["o3-dc02", "o2-nolof-karras", "o3-eps-bh1-v", "o1-trailing"],
)
def test_state_machine_follows_diffusers(kw):
    n = 9
    ours, theirs = UniPCMultistepScheduler(**kw), diffusers.UniPCMultistepScheduler(**kw)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    x_o = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    x_t = torch.from_numpy(x_o.copy())
    for i, (to, tt) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        m_o = fake_model(x_o, float(to))
        m_t = torch.from_numpy(fake_model(x_t.numpy(), float(tt)))
        x_o = ours.step(m_o, to, x_o).prev_sample
        x_t = theirs.step(m_t, tt, x_t).prev_sample
        if i == n - 1 and not torch.isfinite(x_t).all():
            break
        assert ours.step_index == theirs.step_index == i + 1
        assert ours.lower_order_nums == theirs.lower_order_nums
        assert ours.this_order == theirs.this_order
        assert [None if t is None else int(t) for t in ours.timestep_list] == [
            None if t is None else int(t) for t in theirs.timestep_list
        ]
        assert rel_err(ours.last_sample, theirs.last_sample) < 1e-4
        for mo, mt in zip(ours.model_outputs, theirs.model_outputs):
            assert (mo is None) == (mt is None)
            if mo is not None:
                assert rel_err(mo, mt) < 1e-4
        assert rel_err(x_o, x_t) < 1e-4, i


def test_corrector_uses_previous_output():
    """The corrector changes the sample (so the state above matters), and disabling it changes the result."""
    n = 6
    outs = []
    for dc in ([], [0, 1, 2, 3, 4]):
        s = UniPCMultistepScheduler(disable_corrector=dc)
        s.set_timesteps(n)
        x = np.ones((1, 3, 4, 4), np.float32)
        for t in s.timesteps:
            x = s.step(fake_model(x, float(t)), t, x).prev_sample
        outs.append(x)
    assert np.max(np.abs(outs[0] - outs[1])) > 1e-3


def test_set_timesteps_resets_state():
    def loop(s, steps, stop=None):
        x = np.full((1, 3, 4, 4), 0.5, np.float32)
        for i, t in enumerate(s.timesteps):
            if i == stop:
                break
            x = s.step(fake_model(x, float(t)), t, x).prev_sample
        return x

    fresh = UniPCMultistepScheduler(solver_order=3)
    fresh.set_timesteps(10)
    expected = loop(fresh, 10)
    s = UniPCMultistepScheduler(solver_order=3)
    s.set_timesteps(7)
    loop(s, 7, stop=4)
    s.set_timesteps(10)
    assert s.step_index is None and s.lower_order_nums == 0 and s.last_sample is None
    assert all(m is None for m in s.model_outputs) and all(t is None for t in s.timestep_list)
    np.testing.assert_array_equal(loop(s, 10), expected)


@pytest.mark.parametrize("begin", [0, 3])
def test_begin_index_and_mid_schedule_start(begin):
    n = 10
    for use_begin in (True, False):
        ours, theirs = UniPCMultistepScheduler(solver_order=3), diffusers.UniPCMultistepScheduler(solver_order=3)
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        if use_begin:
            ours.set_begin_index(begin)
            theirs.set_begin_index(begin)
        x_o = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
        x_t = torch.from_numpy(x_o.copy())
        for to, tt in zip(ours.timesteps[begin:], theirs.timesteps[begin:]):
            x_o = ours.step(fake_model(x_o, float(to)), to, x_o).prev_sample
            x_t = theirs.step(torch.from_numpy(fake_model(x_t.numpy(), float(tt))), tt, x_t).prev_sample
            assert rel_err(x_o, x_t) < 1e-4
        assert ours.step_index == n


def test_first_step_at_repeated_first_timestep_starts_at_zero():
    """squaredcos_cap_v2 + Karras: the first timesteps repeat (999, 999, ...); ours starts at index 0 and runs
    the whole loop, as diffusers does after set_begin_index(0) (without it diffusers starts at index 1 and
    fails at the last step)."""
    ours = UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    theirs = diffusers.UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    theirs.set_begin_index(0)
    assert ours.timesteps[0] == ours.timesteps[1]
    x_o = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    x_t = torch.from_numpy(x_o.copy())
    for i, (to, tt) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        x_o = ours.step(fake_model(x_o, float(to)), to, x_o).prev_sample
        x_t = theirs.step(torch.from_numpy(fake_model(x_t.numpy(), float(tt))), tt, x_t).prev_sample
        assert ours.step_index == i + 1
        assert np.all(np.isfinite(x_o)) and rel_err(x_o, x_t) < 1e-2  # sigma_max = 2e4: diffusers' float32


# -- documented limits ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"solver_type": "bh1"},
        {"predict_x0": False},
        {"predict_x0": False, "solver_type": "bh1", "prediction_type": "v_prediction"},
        {"lower_order_final": False, "solver_order": 3},
    ],
    ids=["bh1", "eps", "eps-bh1-v", "o3-nolof"],
)
def test_last_step_into_zero_sigma_is_the_limit(kw):
    """Into sigma = 0 ours gives x_0 (the limit). Checked against diffusers with the final sigma set to 1e-7
    instead of 0 and a first-order last step, where its arithmetic is finite."""
    n = 8
    ours = UniPCMultistepScheduler(**kw)
    theirs = diffusers.UniPCMultistepScheduler(**dict(kw, lower_order_final=True))
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    theirs.sigmas[-1] = 1e-7
    x_o = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    x_t = torch.from_numpy(x_o.copy())
    for to, tt in zip(ours.timesteps, theirs.timesteps):
        m_o = fake_model(x_o, float(to))
        out = ours.step(m_o, to, x_o)
        x_t = theirs.step(torch.from_numpy(fake_model(x_t.numpy(), float(tt))), tt, x_t).prev_sample
        x_o = out.prev_sample
    assert np.all(np.isfinite(x_o))
    if ours.predict_x0:
        limit = out.pred_original_sample
    else:  # x_0 from the corrected sample the last predictor started from
        sigma = ours.sigmas[-2]
        alpha = 1 / math.sqrt(sigma**2 + 1)
        limit = (ours.last_sample - sigma * alpha * ours.model_outputs[-1]) / alpha
    assert rel_err(x_o, limit) < 1e-6
    if not kw.get("lower_order_final", True):
        return  # ours drops to order 1 there; diffusers' order 3 diverges as sigma -> 0
    assert rel_err(x_o, x_t) < 1e-4


def test_zero_length_last_step_is_identity():
    """Karras + final_sigmas_type='sigma_min': the last step has h = 0 and returns the corrected sample."""
    s = UniPCMultistepScheduler(
        use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3, lower_order_final=False
    )
    s.set_timesteps(6)
    assert s.sigmas[-1] == s.sigmas[-2]
    x = np.random.default_rng(3).standard_normal((1, 3, 4, 4)).astype(np.float32)
    for t in s.timesteps:
        x = s.step(fake_model(x, float(t)), t, x).prev_sample
    np.testing.assert_array_equal(x, s.last_sample)


# -- flow sigmas ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,set_kw",
    [
        ({"use_dynamic_shifting": True}, {"mu": 0.8}),
        ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.5}),
        ({"shift_terminal": 0.1, "flow_shift": 2.0}, {}),
        ({"final_sigmas_type": "sigma_min", "flow_shift": 5.0, "solver_order": 3}, {}),
        ({}, {"sigmas": np.array([1.0, 0.8, 0.55, 0.3, 0.1])}),
    ],
    ids=["dyn-exp", "dyn-linear", "terminal", "sigma_min-o3", "custom"],
)
def test_flow_parity(kw, set_kw):
    kw = dict(kw, use_flow_sigmas=True, prediction_type="flow_prediction")
    ours, theirs = UniPCMultistepScheduler(**kw), diffusers.UniPCMultistepScheduler(**kw)
    n = 12 if "sigmas" not in set_kw else None
    ours.set_timesteps(n, **set_kw)
    theirs.set_timesteps(n, **set_kw)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    x_o = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    x_t = torch.from_numpy(x_o.copy())
    for to, tt in zip(ours.timesteps, theirs.timesteps):
        x_o = ours.step(fake_model(x_o, float(to)), to, x_o).prev_sample
        x_t = theirs.step(torch.from_numpy(fake_model(x_t.numpy(), float(tt))), tt, x_t).prev_sample
        assert rel_err(x_o, x_t) < 1e-4


# -- add_noise, API ---------------------------------------------------------------------------------------
def test_add_noise():
    x0 = np.random.default_rng(5).standard_normal((3, 3, 4, 4)).astype(np.float32)
    noise = np.random.default_rng(6).standard_normal((3, 3, 4, 4)).astype(np.float32)
    s = UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    # before set_timesteps: the training schedule (diffusers indexes its reversed timesteps here)
    t = np.array([0, 10, 900])
    ac = s.alphas_cumprod[t][:, None, None, None]
    np.testing.assert_allclose(s.add_noise(x0, noise, t), np.sqrt(ac) * x0 + np.sqrt(1 - ac) * noise, rtol=1e-6)
    for karras in (False, True):
        ours = UniPCMultistepScheduler(use_karras_sigmas=karras)
        theirs = diffusers.UniPCMultistepScheduler(use_karras_sigmas=karras)
        ours.set_timesteps(10)
        theirs.set_timesteps(10)
        t = ours.timesteps[[0, 4, 9]]
        got = ours.add_noise(x0, noise, t)
        want = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        assert got.dtype == np.float32 and rel_err(got, want) < 1e-5
        ours.set_begin_index(2)
        theirs.set_begin_index(2)
        want = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        assert rel_err(ours.add_noise(x0, noise, t), want) < 1e-5
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of"):
        s.add_noise(x0, noise, np.array([5, 5, 5]))


def test_step_api():
    s = UniPCMultistepScheduler()
    assert s.order == 1 and s.init_noise_sigma == 1.0 and s.timesteps.dtype == np.float32
    s.set_timesteps(4)
    x = np.ones((1, 3, 4, 4), np.float32)
    assert s.scale_model_input(x, s.timesteps[0]) is x
    out = s.step(np.zeros_like(x), s.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].dtype == np.float32
    res = s.step(np.zeros_like(x), s.timesteps[1], out[0], generator=object())
    assert res.pred_original_sample is not None and res.pred_original_sample.shape == x.shape
    x64 = np.ones((1, 3, 4, 4), np.float64)
    s.set_timesteps(3)
    assert s.step(np.zeros_like(x64), s.timesteps[0], x64).prev_sample.dtype == np.float64


def test_beta_sigmas_need_no_scipy(monkeypatch):
    """use_beta_sigmas works with scipy unimportable (the runtime does not install it) and gives the timesteps
    it gives with scipy present."""
    import sys

    with_scipy = UniPCMultistepScheduler(use_beta_sigmas=True)
    with_scipy.set_timesteps(7)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    s = UniPCMultistepScheduler(use_beta_sigmas=True)
    s.set_timesteps(7)
    np.testing.assert_array_equal(s.timesteps, with_scipy.timesteps)
    np.testing.assert_array_equal(s.sigmas, with_scipy.sigmas)


def test_solver_type_alias_maps_to_bh2_like_diffusers():
    ours = UniPCMultistepScheduler(solver_type="midpoint")
    theirs = diffusers.UniPCMultistepScheduler(solver_type="midpoint")
    assert ours.config["solver_type"] == theirs.config.solver_type == "bh2"


# -- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"solver_order": 3, "solver_type": "bh1", "use_karras_sigmas": True, "timestep_spacing": "trailing"},
        {"beta_schedule": "sigmoid", "prediction_type": "v_prediction", "disable_corrector": [0, 1]},
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "final_sigmas_type": "sigma_min",
            "timestep_spacing": "leading",
            "steps_offset": 1,
        },
    ],
    ids=["karras-bh1", "sigmoid-trained-betas", "sd-like"],
)
def test_save_config_loads_in_diffusers(tmp_path, kw):
    ours = UniPCMultistepScheduler(**kw)
    ours.save_config(tmp_path)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert data["_class_name"] == "UniPCMultistepScheduler"
    assert ("trained_betas" in data and data["trained_betas"] is not None) == (kw.get("beta_schedule") == "sigmoid")
    theirs = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path)
    err = run_parity(UniPCMultistepScheduler.from_config(tmp_path), _Theirs(theirs), 10)
    assert err < 1e-4


def test_diffusers_config_loads_in_ours(tmp_path):
    theirs = diffusers.UniPCMultistepScheduler(
        solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction", disable_corrector=[1]
    )
    theirs.save_config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = UniPCMultistepScheduler.from_config(tmp_path)
    assert ours.config["solver_order"] == 3 and ours.config["disable_corrector"] == [1]
    assert run_parity(ours, _Theirs(theirs), 10) < 1e-4
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    data["surely_unknown_key"] = 1
    with pytest.warns(UserWarning, match="surely_unknown_key"):
        UniPCMultistepScheduler.from_config(data)


def test_ddpm_bundle_config_keeps_leading_spacing(tmp_path):
    diffusers.DDPMScheduler(timestep_spacing="leading", steps_offset=1).save_config(tmp_path)
    ours = UniPCMultistepScheduler.from_config(tmp_path)
    theirs = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert ours.config["timestep_spacing"] == theirs.config.timestep_spacing == "leading"
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


# -- validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"solver_order": 0}, "solver_order"),
        ({"solver_order": 4}, "solver_order"),
        ({"solver_type": "heunish"}, "solver_type"),
        ({"final_sigmas_type": "one"}, "final_sigmas_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"beta_schedule": "nope"}, "beta_schedule"),
        ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
        ({"use_flow_sigmas": True, "use_beta_sigmas": True}, "use_flow_sigmas"),
        ({"solver_p": object()}, "solver_p"),
        ({"shift_terminal": 0.1}, "shift_terminal"),
        ({"prediction_type": "flow_prediction", "predict_x0": False}, "flow_prediction"),
        ({"disable_corrector": "01"}, "disable_corrector"),
        ({"time_shift_type": "cubic"}, "time_shift_type"),
        ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio"),
        ({"flow_shift": 0.0}, "flow_shift"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        UniPCMultistepScheduler(**kw)


@pytest.mark.parametrize(
    "kw,n,set_kw,match",
    [
        ({}, 0, {}, "num_inference_steps"),
        ({}, 1001, {}, "num_inference_steps"),
        ({}, 2.5, {}, "num_inference_steps"),
        ({"timestep_spacing": "linspace"}, 1000, {}, "repeats a sigma"),
        ({"timestep_spacing": "leading"}, 1000, {}, "repeats a sigma"),
        ({"timestep_spacing": "leading", "steps_offset": 1}, 999, {}, "steps_offset"),
        ({}, None, {"sigmas": [0.9, 0.5]}, "use_flow_sigmas"),
        ({"use_flow_sigmas": True}, None, {"sigmas": [1.5, 0.5]}, "custom flow sigmas"),
        ({"use_flow_sigmas": True, "use_dynamic_shifting": True}, 10, {}, "mu"),
    ],
)
def test_bad_set_timesteps_raises(kw, n, set_kw, match):
    s = UniPCMultistepScheduler(**kw)
    with pytest.raises(ValueError, match=match):
        s.set_timesteps(n, **set_kw)


def test_bad_step_raises():
    s = UniPCMultistepScheduler()
    x = np.zeros((1, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of"):
        s.step(x, 3, x)
    for t in s.timesteps:
        x = s.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="steps are done"):
        s.step(x, s.timesteps[-1], x)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(5)


def test_trailing_with_every_timestep_is_finite():
    """trailing, n = T ends at t = 0; with sigma_min the last step has h = 0 (identity), with the zero-SNR
    ``linear`` schedule sigma rises at the top (diffusers steps through it, and so does ours)."""
    for kw in ({"final_sigmas_type": "sigma_min"}, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}):
        s = UniPCMultistepScheduler(timestep_spacing="trailing", **kw)
        s.set_timesteps(1000)
        x = np.random.default_rng(0).standard_normal((1, 1, 2, 2)).astype(np.float32)
        for t in s.timesteps:
            x = s.step(fake_model(x, float(t)), t, x).prev_sample
        assert np.all(np.isfinite(x)) and math.isfinite(float(np.max(np.abs(x))))
