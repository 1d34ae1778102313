"""The one step-index rule of the sigma-space schedulers (StepIndexMixin), and the repeated first sigma (S6).

A loop given ``timesteps[0]`` starts at index 0; any other timestep is looked up with diffusers' rule (its second
occurrence where it repeats). Where ``timesteps[0]`` repeats, diffusers' lookup starts at index 1, skips the first
sigma and fails with IndexError at the last step; ours runs the whole schedule, exactly as diffusers does when it
is told to start at index 0 (``set_begin_index(0)``).
"""

import diffusers
import numpy as np
import pytest
import torch
from _parity import fake_model, rel_err

from deploy_diff.runtime.schedulers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from deploy_diff.runtime.schedulers.step_index import StepIndexMixin

# the cases fuzzing found (S6): a schedule whose first sigma repeats
REPEATED_FIRST_SIGMA = [
    (
        EulerDiscreteScheduler,
        {
            "num_train_timesteps": 1,
            "interpolation_type": "log_linear",
            "timestep_type": "continuous",
            "prediction_type": "v_prediction",
        },
        1,
    ),
    (
        EulerDiscreteScheduler,
        {"num_train_timesteps": 2, "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": True},
        2,
    ),
    (
        HeunDiscreteScheduler,
        {"num_train_timesteps": 2, "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": True},
        2,
    ),
]
S6_IDS = ["euler-log_linear-T1", "euler-karras-T2", "heun-karras-T2"]


def _loop(s, n, torch_side=False):
    """A full loop on the fake model; returns every prev_sample (NumPy)."""
    s.set_timesteps(n)
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32) * np.float32(s.init_noise_sigma)
    outs = []
    for t in s.timesteps:
        if torch_side:
            xt = torch.from_numpy(x)
            inp = s.scale_model_input(xt, t).numpy()
            x = s.step(torch.from_numpy(fake_model(inp, float(t))), t, xt).prev_sample.numpy()
        else:
            inp = s.scale_model_input(x, t)
            x = s.step(fake_model(inp, float(t)), t, x).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("cls, cfg, n", REPEATED_FIRST_SIGMA, ids=S6_IDS)
def test_repeated_first_sigma_runs_the_whole_schedule(cls, cfg, n):
    """S6: the loop over ``timesteps`` reaches the end (it failed part-way with a step error) and equals diffusers
    started at index 0 (diffusers' own lookup fails here with IndexError)."""
    ours = cls(**cfg)
    ours.set_timesteps(n)
    assert len(ours.timesteps) > 1 and ours.timesteps[0] == ours.timesteps[1]
    mine = _loop(ours, n)
    assert ours.step_index == len(ours.timesteps)
    assert all(np.isfinite(x).all() for x in mine)

    theirs = getattr(diffusers, cls.__name__)(**cfg)
    with pytest.raises(IndexError):
        _loop(theirs, n, torch_side=True)

    class FromStart(getattr(diffusers, cls.__name__)):
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.set_begin_index(0)

    ref = _loop(FromStart(**cfg), n, torch_side=True)
    assert len(ref) == len(mine)
    for a, b in zip(mine, ref):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize(
    "cls",
    [
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
    ],
)
def test_every_sigma_space_scheduler_uses_the_one_rule(cls):
    assert issubclass(cls, StepIndexMixin)
    for name in ("index_for_timestep", "_init_step_index", "_current_index"):
        assert getattr(cls, name) is getattr(StepIndexMixin, name), (cls.__name__, name)


def test_lookup_takes_the_second_occurrence_except_at_the_start():
    s = HeunDiscreteScheduler()
    s.set_timesteps(4)  # [t0, t1, t1, t2, t2, t3, t3]
    t = s.timesteps
    assert s.index_for_timestep(t[1]) == 2  # diffusers' rule: a mid-schedule start does not skip a sigma
    s._init_step_index(t[0])
    assert s.step_index == 0
    s._step_index = None
    s._init_step_index(t[3])
    assert s.step_index == 4
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        s.index_for_timestep(12345.0)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_a_step_past_the_end_is_refused_the_same_way(cls):
    s = cls()
    s.set_timesteps(2)
    x = np.zeros((1, 3, 4, 4), np.float32)
    for t in s.timesteps:
        x = s.step(np.zeros_like(s.scale_model_input(x, t)), t, x).prev_sample
    with pytest.raises(ValueError, match="past the last of the 2 timesteps"):
        s.step(np.zeros_like(x), s.timesteps[-1], x)
