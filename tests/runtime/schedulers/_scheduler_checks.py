"""Checks several scheduler test files make the same way, written once.

* ``assert_diffusers_config_round_trip``: our saved config loads in diffusers and runs a 10-step loop like
  ours, and diffusers' re-saved config loads back (without a warning) to the same config;
* ``assert_loop_matches_diffusers``: every prev_sample of a deterministic loop (from an index on) agrees;
* ``assert_img2img_from``: add_noise at one timestep agrees, and so does the loop that starts there;
* ``assert_step_after_the_last_raises``: a step past the end of the schedule is refused;
* ``seconds_per_step``: the best of three timed loops, per step (the ``slow`` speed comparisons);
* ``BAD_COMMON_CONFIG_VALUES``: option values every sigma-space scheduler refuses, with the name the error gives.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from _parity import fake_model, rel_err, run_parity
from _sigma_parity import NoGenerator

from deploy_diff.runtime.rng import TorchGenerator

#: (kwargs, what the ValueError names) refused by Euler, Euler ancestral and Heun alike
BAD_COMMON_CONFIG_VALUES = [
    ({"beta_schedule": "cosin"}, "beta_schedule"),
    ({"prediction_type": "noise"}, "prediction_type"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"steps_offset": -1}, "steps_offset"),
]


def assert_diffusers_config_round_trip(ours, diffusers_cls, tmp_path, *, no_generator=False, timestep_atol=0.0):
    """Save ``ours``; diffusers' ``from_pretrained`` of it runs 10 steps like ours loaded back (prev_sample
    within 1e-4); diffusers' own save of it loads back into ours without a warning, with the same config."""
    cls = type(ours)
    ours.save_config(tmp_path)
    theirs = diffusers_cls.from_pretrained(tmp_path)
    a, b = cls.from_config(tmp_path), theirs
    if no_generator:
        a, b = NoGenerator(a), NoGenerator(b)
    assert run_parity(a, b, 10, timestep_atol=timestep_atol) <= 1e-4
    theirs.save_config(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = cls.from_config(tmp_path / "d")
    assert back.config == ours.config


def assert_loop_matches_diffusers(ours, theirs, x, y, start=0, tol=1e-4, generators=None):
    """Step both (timesteps already set) from index ``start`` with the fake model, and with ``generators``
    (ours, theirs) when given; every prev_sample agrees within ``tol``."""
    kw_o, kw_t = ({}, {}) if generators is None else ({"generator": generators[0]}, {"generator": generators[1]})
    for to, tt in zip(ours.timesteps[start:], theirs.timesteps[start:]):
        x = ours.step(fake_model(ours.scale_model_input(x, to), float(to)), to, x, **kw_o).prev_sample
        y = theirs.step(
            torch.from_numpy(fake_model(theirs.scale_model_input(y, tt).numpy(), float(tt))), tt, y, **kw_t
        ).prev_sample
        assert rel_err(x, y) <= tol


def assert_img2img_from(ours, theirs, start):
    """img2img: noise one sample to the timestep at index ``start`` on both sides (within 1e-6), then run the
    rest of the loop from there (every prev_sample within 1e-4)."""
    x0 = TorchGenerator(0).randn((2, 3, 8, 8))
    noise = TorchGenerator(1).randn((2, 3, 8, 8))
    x = ours.add_noise(x0, noise, ours.timesteps[start : start + 1])
    y = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), theirs.timesteps[start : start + 1])
    assert rel_err(x, y) <= 1e-6
    assert_loop_matches_diffusers(ours, theirs, x, y, start)


def assert_step_after_the_last_raises(s, x, match="set_timesteps", *, scale_input=False, **step_kwargs):
    """Step ``s`` (timesteps already set) through its whole schedule; one step more raises ValueError(match)."""
    for t in s.timesteps:
        if scale_input:
            s.scale_model_input(x, t)
        s.step(x, t, x, **step_kwargs)
    with pytest.raises(ValueError, match=match):
        s.step(x, s.timesteps[-1], x)


def seconds_per_step(s, sample, n, *, scale_input=True, **step_kwargs):
    """The best of three full n-step loops of ``s`` (model output = sample), in seconds per step."""
    best = float("inf")
    for _ in range(3):
        s.set_timesteps(n)
        ts = list(s.timesteps)
        t0 = time.perf_counter()
        for t in ts:
            if scale_input:
                s.scale_model_input(sample, t)
            s.step(sample, t, sample, **step_kwargs)
        best = min(best, time.perf_counter() - t0)
    return best / len(ts)
