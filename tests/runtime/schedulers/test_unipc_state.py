"""UniPC against diffusers: the multistep state machine, the documented limits, flow sigmas, add_noise and the
step API, configs and validation. ``_Theirs`` (in _unipc_harness.py) adapts diffusers' scheduler; see there.
"""

from __future__ import annotations

import json
import math
import warnings

import diffusers
import numpy as np
import pytest
import torch
from _parity import fake_model, rel_err, run_parity
from _scheduler_checks import assert_step_after_the_last_raises
from _unipc_harness import (
    _Theirs,
)

from deploy_diff.runtime.schedulers.unipc import UniPCMultistepScheduler

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2


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
    assert_step_after_the_last_raises(s, x, "steps are done")
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
