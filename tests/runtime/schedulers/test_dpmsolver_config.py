"""DPMSolverMultistepScheduler: config round trips through diffusers, and validation of bad input."""

from __future__ import annotations

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
from _dpmsolver_harness import (
    DIFFUSERS_SCHEDULES,
    FromStart,
    tolerance,
)
from _parity import run_parity
from _scheduler_checks import assert_step_after_the_last_raises

from deploy_diff.runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler as Ours

# diffusers' own noise: its deprecation notice for (sde-)dpmsolver and a NumPy 2 __array__ notice
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*algorithm_types dpmsolver and sde-dpmsolver:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


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
    assert_step_after_the_last_raises(s, x)
    sde = Ours(algorithm_type="sde-dpmsolver++")
    sde.set_timesteps(3)
    with pytest.raises(ValueError, match="variance_noise"):
        sde.step(x, sde.timesteps[0], x, variance_noise=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(-1)
