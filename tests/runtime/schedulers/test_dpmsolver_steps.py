"""DPMSolverMultistepScheduler against diffusers: SDE noise, the documented differences, the multistep
state, begin index and dtypes.
"""

from __future__ import annotations

import math
import warnings

import diffusers
import numpy as np
import pytest
import torch
from _dpmsolver_harness import (
    DEFAULTS,
    _kwargs,
    _loop,
    _pair,
    _run_parity,
)
from _parity import fake_model, rel_err, run_parity
from _scheduler_checks import seconds_per_step

from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler as Ours

# diffusers' own noise: its deprecation notice for (sde-)dpmsolver and a NumPy 2 __array__ notice
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*algorithm_types dpmsolver and sde-dpmsolver:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


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

    def per_step(s, sample):
        return seconds_per_step(s, sample, 200, scale_input=False)

    for kw in ({}, {"solver_order": 3}, {"thresholding": True}):
        ratio = per_step(Ours(**kw), x) / per_step(diffusers.DPMSolverMultistepScheduler(**kw), torch.from_numpy(x))
        assert ratio < 0.2, (kw, ratio)  # measured 0.03-0.1 on a 2-core machine
