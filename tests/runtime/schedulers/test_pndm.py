"""PNDMScheduler against diffusers: timesteps (PRK half steps, PLMS's repeated timestep), every prev_sample of
full loops over a seeded sample of configs and of Stable Diffusion 1.x's config, the counter / ets / cur_sample
state call by call, img2img entry mid-schedule, errors, configs and names, and the ``sample()`` loop.

Tolerances are test_ddpm_ddim.py's: every prev_sample within 1e-4 (relative, tests/_parity.py), 1e-2 on
``squaredcos_cap_v2``. Worst over the full cross product (1088 cases): 8.5e-3 on squaredcos_cap_v2 and 8.2e-5
elsewhere, both with trailing n = 1 and v-prediction, where the one step starts at t = 999 and cancels large
terms: diffusers' float32 result is that far from its own float64 one (8.5e-3, 8.2e-5) while ours is within
3e-8 / 6e-8 of its float64 run and 6e-8 of diffusers' float64 run. Timesteps are equal.
"""

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
from _parity import fake_model, rel_err, run_parity
from _scheduler_checks import (
    BAD_COMMON_CONFIG_VALUES,
    assert_diffusers_config_round_trip,
    assert_img2img_from,
    assert_step_after_the_last_raises,
    seconds_per_step,
)
from _sigma_parity import NoGenerator
from _sweep import case_id, cross_product, run_sweep, sample_cases

from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.sampling import sample
from deploy_diff.runtime.schedulers import PNDMScheduler, load_scheduler, scheduler_from_name

#: runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json (clip_sample is a DDIM key it carries)
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SPACE = {
    # sigmoid is not a PNDM schedule in diffusers: saved for it as trained_betas
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"],
    "skip_prk_steps": [True, False],
    "timestep_spacing": ["leading", "trailing", "linspace"],
    "steps_offset": [0, 1],
    "set_alpha_to_one": [False, True],
    "prediction_type": ["epsilon", "v_prediction"],
    "steps": [1, 2, 3, 4, 5, 7, 10, 25, 50, 60],
}


def _valid(case):
    if not case["skip_prk_steps"] and case["steps"] < 4:
        return False  # both refuse (test_too_few_steps_for_the_runge_kutta_warm_up_are_refused_like_diffusers)
    return case["timestep_spacing"] == "leading" or not case["steps_offset"]  # the offset acts on leading only


def tolerance(cfg):
    return 1e-2 if cfg["beta_schedule"] == "squaredcos_cap_v2" else 1e-4


def _pair(**cfg):
    ours = PNDMScheduler(**cfg)
    return ours, diffusers.PNDMScheduler.from_config(ours.diffusers_config())


def _run_case(case):
    cfg = {k: v for k, v in case.items() if k != "steps"}
    ours, theirs = _pair(**cfg)
    err = run_parity(NoGenerator(ours), NoGenerator(theirs), case["steps"])
    assert err <= tolerance(cfg), (case_id(case), err)


@pytest.mark.parametrize("case", sample_cases(SPACE, 60, seed=14, valid=_valid), ids=case_id)
def test_pndm_parity(case):
    _run_case(case)


@pytest.mark.slow
def test_pndm_parity_full_cross_product():
    run_sweep(cross_product(SPACE, _valid), _run_case)


def test_stable_diffusion_config():
    """SD 1.x's own config (PLMS, scaled_linear 0.00085..0.012, steps_offset 1): loads without a warning, the
    timesteps SD samples with, and a 50-step loop on latents like SD's equal to diffusers'."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = load_scheduler(SD15_CONFIG)
    theirs = diffusers.PNDMScheduler.from_config(SD15_CONFIG)
    assert type(ours) is PNDMScheduler and ours.config["skip_prk_steps"] is True
    err = run_parity(NoGenerator(ours), NoGenerator(theirs), 50, shape=(1, 4, 16, 16))
    assert err <= 1e-4
    ts = ours.timesteps
    assert ts.dtype == np.int64 and len(ts) == 51
    assert ts[:4].tolist() == [981, 961, 961, 941] and ts[-1] == 1  # PLMS's repeated second timestep


# -- timesteps and state ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 61, 333, 999, 1000])
def test_timesteps_equal_diffusers(skip, spacing, offset, n):
    ours = PNDMScheduler(skip_prk_steps=skip, timestep_spacing=spacing, steps_offset=offset)
    theirs = diffusers.PNDMScheduler(skip_prk_steps=skip, timestep_spacing=spacing, steps_offset=offset)
    if (not skip and n < 4) or (offset and n == 1000):  # refused by both (test_errors_...)
        return
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    np.testing.assert_array_equal(ours.prk_timesteps, theirs.prk_timesteps)
    np.testing.assert_array_equal(ours.plms_timesteps, theirs.plms_timesteps)


def test_runge_kutta_warm_up_timesteps():
    """The PRK layout written out: three groups of four calls at t, t - h, t - h, t - 2h (h = T // n // 2), then
    PLMS from the last group's end, n + 9 timesteps in all."""
    s = PNDMScheduler()
    s.set_timesteps(10)
    prk = [900, 850, 850, 800, 800, 750, 750, 700, 700, 650, 650, 600]
    assert s.timesteps.tolist() == prk + [600, 500, 400, 300, 200, 100, 0]


@pytest.mark.parametrize("skip", [True, False])
def test_state_follows_diffusers_call_by_call(skip):
    """counter, ets (their values), cur_sample and the PRK/PLMS choice after every call, v-prediction."""
    ours, theirs = _pair(skip_prk_steps=skip, prediction_type="v_prediction", beta_schedule="scaled_linear")
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    x = TorchGenerator(0).randn((2, 3, 8, 8))
    y = torch.from_numpy(x.copy())
    kinds = []
    for to, tt in zip(ours.timesteps, theirs.timesteps):
        kinds.append("prk" if ours.counter < len(ours.prk_timesteps) and not skip else "plms")
        x = ours.step(fake_model(x, float(to)), to, x).prev_sample
        y = theirs.step(torch.from_numpy(fake_model(y.numpy(), float(tt))), tt, y).prev_sample
        assert rel_err(x, y) <= 1e-4
        assert ours.counter == theirs.counter
        assert len(ours.ets) == len(theirs.ets)
        assert all(rel_err(a, b) <= 1e-4 for a, b in zip(ours.ets, theirs.ets))
        assert (ours.cur_sample is None) == (theirs.cur_sample is None)
        if ours.cur_sample is not None:
            assert rel_err(ours.cur_sample, theirs.cur_sample) <= 1e-4
    assert kinds == (["plms"] * 9 if skip else ["prk"] * 12 + ["plms"] * 5)
    ours.set_timesteps(8)
    assert ours.counter == 0 and ours.ets == [] and ours.cur_sample is None


@pytest.mark.parametrize("skip,start", [(True, 1), (True, 2), (True, 5), (False, 6), (False, 14)])
def test_img2img_entering_mid_schedule(skip, start):
    """A loop that starts at timesteps[start] with a fresh state (diffusers' img2img pipelines): add_noise and
    every prev_sample as diffusers, whose steps then pair the counter with other timesteps than a full loop."""
    ours, theirs = _pair(skip_prk_steps=skip)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert_img2img_from(ours, theirs, start)


def test_ets_hold_copies_of_the_model_output():
    """A runner that writes every output into one reused buffer gives the same samples as fresh outputs."""
    results = []
    for reuse in (False, True):
        s = PNDMScheduler(skip_prk_steps=False)
        s.set_timesteps(6)
        x = TorchGenerator(0).randn((1, 2, 4, 4))
        buf = np.empty_like(x)
        for t in s.timesteps:
            out = fake_model(x, float(t))
            if reuse:
                buf[...] = out
                out = buf
            x = s.step(out, t, x).prev_sample
        results.append(x)
    np.testing.assert_array_equal(results[0], results[1])


def test_trailing_timestep_minus_one_ends_the_chain():
    """trailing spacing's extra timestep -1 (n = 61): diffusers reads alphas_cumprod[-1] there (the noisiest level)
    and blows the finished sample up; ours takes final_alpha_cumprod, so that step leaves the sample unchanged.
    The timesteps and every earlier prev_sample are diffusers'."""
    ours, theirs = _pair(timestep_spacing="trailing", skip_prk_steps=True)
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.timesteps[-1] == -1
    x = TorchGenerator(0).randn((2, 3, 8, 8))
    y = torch.from_numpy(x.copy())
    for to, tt in zip(ours.timesteps, theirs.timesteps):
        before = x
        x = ours.step(fake_model(x, float(to)), to, x).prev_sample
        y = theirs.step(torch.from_numpy(fake_model(y.numpy(), float(tt))), tt, y).prev_sample
        if to != -1:
            assert rel_err(x, y) <= 1e-4
    np.testing.assert_array_equal(x, before)
    assert rel_err(x, y) > 0.5


def test_zero_betas_up_to_t_stay_finite():
    """Trained betas starting with zeros (x_t is x_0 there): the steps between those timesteps are the identity
    where diffusers divides 0 by 0 (NaN)."""
    betas = [0.0] * 3 + np.linspace(1e-4, 0.02, 997).tolist()
    ours, theirs = _pair(trained_betas=betas, skip_prk_steps=True)
    ours.set_timesteps(1000)
    theirs.set_timesteps(1000)
    x, y = np.ones((1, 1, 2, 2), np.float32), torch.ones((1, 1, 2, 2))
    for to, tt in zip(ours.timesteps, theirs.timesteps):
        x = ours.step(fake_model(x, float(to)), to, x).prev_sample
        y = theirs.step(torch.from_numpy(fake_model(y.numpy(), float(tt))), tt, y).prev_sample
    assert np.isfinite(x).all() and not torch.isfinite(y).all()


def test_step_output_and_input_scaling():
    s = PNDMScheduler(skip_prk_steps=True)
    s.set_timesteps(3)
    x = TorchGenerator(0).randn((1, 2, 4, 4))
    assert s.scale_model_input(x, s.timesteps[0]) is x and s.init_noise_sigma == 1.0
    out = s.step(x, s.timesteps[0], x)
    assert out.pred_original_sample is None and out.prev_sample.dtype == np.float32
    (prev,) = s.step(x, s.timesteps[1], x, return_dict=False)
    assert prev.dtype == np.float32


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3])
def test_too_few_steps_for_the_runge_kutta_warm_up_are_refused_like_diffusers(n):
    with pytest.raises(ValueError):
        diffusers.PNDMScheduler().set_timesteps(n)  # a NumPy broadcast error
    with pytest.raises(ValueError, match="skip_prk_steps=True"):
        PNDMScheduler().set_timesteps(n)
    PNDMScheduler(skip_prk_steps=True).set_timesteps(n)


def test_errors_equal_diffusers():
    """Where diffusers raises ValueError, ours does too (sooner where the config alone decides it)."""
    x = np.zeros((1, 1, 2, 2), np.float32)
    # a step before set_timesteps (diffusers' step() itself fails first with a TypeError on len(None))
    with pytest.raises(ValueError, match="set_timesteps"):
        diffusers.PNDMScheduler(skip_prk_steps=True).step_plms(torch.from_numpy(x), 999, torch.from_numpy(x))
    for method in ("step", "step_plms"):
        with pytest.raises(ValueError, match="set_timesteps"):
            getattr(PNDMScheduler(skip_prk_steps=True), method)(x, 999, x)
    # sample prediction: diffusers at the first step, ours at construction
    theirs = diffusers.PNDMScheduler(prediction_type="sample", skip_prk_steps=True)
    theirs.set_timesteps(2)
    with pytest.raises(ValueError, match="prediction_type"):
        theirs.step(torch.from_numpy(x), theirs.timesteps[0], torch.from_numpy(x))
    with pytest.raises(ValueError, match="prediction_type"):
        PNDMScheduler(prediction_type="sample")
    # PLMS before the Runge-Kutta warm-up
    theirs, ours = diffusers.PNDMScheduler(), PNDMScheduler()
    theirs.set_timesteps(5)
    ours.set_timesteps(5)
    with pytest.raises(ValueError, match="prk"):
        theirs.step_plms(torch.from_numpy(x), theirs.timesteps[0], torch.from_numpy(x))
    with pytest.raises(ValueError, match="PRK"):
        ours.step_plms(x, ours.timesteps[0], x)
    # an unknown spacing: diffusers in set_timesteps, ours at construction
    with pytest.raises(ValueError, match="uniform"):
        diffusers.PNDMScheduler(timestep_spacing="uniform").set_timesteps(5)
    with pytest.raises(ValueError, match="timestep_spacing"):
        PNDMScheduler(timestep_spacing="uniform")


@pytest.mark.parametrize(
    "kwargs,match",
    [*BAD_COMMON_CONFIG_VALUES, ({"skip_prk_steps": "yes"}, "skip_prk_steps"), ({"set_alpha_to_one": 1}, "set_alpha")],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PNDMScheduler(**kwargs)


def test_bad_set_timesteps_and_step_arguments():
    s = PNDMScheduler(skip_prk_steps=True)
    for n in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(n)
    with pytest.raises(ValueError, match="steps_offset=1 pushes timestep 1000 past"):
        PNDMScheduler(steps_offset=1, skip_prk_steps=True).set_timesteps(1000)  # diffusers: IndexError at a step
    s.set_timesteps(4)
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="not one of"):
        s.step(x, 998, x)
    with pytest.raises(ValueError, match="not one of"):
        s.step(x, 750.5, x)
    with pytest.raises(TypeError, match="NumPy arrays"):
        s.step(torch.from_numpy(x), 750, x)
    assert_step_after_the_last_raises(s, x)  # diffusers steps on past the end
    with pytest.raises(ValueError, match="PRK warm-up is over or off"):
        s.step_prk(x, s.timesteps[0], x)


# -- configs, names, the sampling loop -------------------------------------------------------------------------------
def test_config_round_trip_through_diffusers(tmp_path):
    ours = PNDMScheduler(
        beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True
    )
    assert_diffusers_config_round_trip(ours, diffusers.PNDMScheduler, tmp_path / "a", no_generator=True)
    ours = PNDMScheduler(**{k: v for k, v in SD15_CONFIG.items() if not k.startswith("_") and k != "clip_sample"})
    assert_diffusers_config_round_trip(ours, diffusers.PNDMScheduler, tmp_path / "b", no_generator=True)


def test_a_schedule_diffusers_pndm_does_not_know_is_saved_as_trained_betas(tmp_path):
    ours = PNDMScheduler(beta_schedule="sigmoid", skip_prk_steps=True)
    path = ours.save_config(tmp_path)
    assert len(json.loads(path.read_text())["trained_betas"]) == 1000
    theirs = diffusers.PNDMScheduler.from_pretrained(tmp_path)
    assert run_parity(NoGenerator(ours), NoGenerator(theirs), 10) <= 1e-4


def test_load_scheduler_by_class_name(tmp_path):
    diffusers.PNDMScheduler.from_config(SD15_CONFIG).save_config(tmp_path)
    for source in (tmp_path, tmp_path / "scheduler_config.json", SD15_CONFIG):
        s = load_scheduler(source)
        assert type(s) is PNDMScheduler
        assert {k: s.config[k] for k in ("skip_prk_steps", "steps_offset", "beta_schedule", "beta_end")} == {
            "skip_prk_steps": True,
            "steps_offset": 1,
            "beta_schedule": "scaled_linear",
            "beta_end": 0.012,
        }


def _other_configs(tmp_path):
    """(ours, diffusers') config pairs of other classes: in memory (defaults dropped) and from a file."""
    kw = {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    yield scheduler_from_name("ddpm", None, **kw).config, diffusers.DDPMScheduler(**kw).config
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False).save_config(tmp_path)
    yield tmp_path, diffusers.PNDMScheduler.load_config(tmp_path)


def test_scheduler_from_name_equals_diffusers_from_config(tmp_path):
    for ours_cfg, theirs_cfg in _other_configs(tmp_path):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = scheduler_from_name("pndm", ours_cfg)
        theirs = diffusers.PNDMScheduler.from_config(theirs_cfg)
        assert type(ours) is PNDMScheduler
        for key, value in ours.config.items():
            assert theirs.config[key] == value, key
        assert run_parity(NoGenerator(ours), NoGenerator(theirs), 10) <= 1e-4


def _runner(x, t, labels):
    assert t.dtype == np.float32 and len(set(t.tolist())) == 1
    return fake_model(x, float(t[0]))


@pytest.mark.parametrize("config", [SD15_CONFIG, {}], ids=["sd15-plms", "default-prk"])
def test_sample_loop_equals_diffusers_loop(config):
    """deploy_diff.runtime.sampling.sample with a PNDM scheduler: the latents of a TorchGenerator seed, one model
    call per timestep, as diffusers' pipeline loop; PNDM takes no eta or generator in step()."""
    shape, n, seed = (2, 3, 8, 8), 12, 3
    ours = sample(_runner, scheduler_from_name("pndm", config), shape, n, generator=TorchGenerator(seed))
    theirs = diffusers.PNDMScheduler.from_config(config)
    theirs.set_timesteps(n)
    y = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        y = theirs.step(torch.from_numpy(fake_model(theirs.scale_model_input(y, t).numpy(), float(t))), t, y)
        y = y.prev_sample
    assert ours.dtype == np.float32 and rel_err(ours, y) <= 1e-4
    with pytest.raises(ValueError, match="eta"):
        sample(_runner, PNDMScheduler(), shape, n, eta=0.5)


# timed, so kept out of the default suite (a busy machine would make it flaky)
@pytest.mark.slow
def test_step_is_much_cheaper_than_diffusers():
    x = np.random.default_rng(0).standard_normal((2, 4, 64, 64)).astype(np.float32)
    ratio = seconds_per_step(PNDMScheduler(skip_prk_steps=True), x, 50, scale_input=False) / seconds_per_step(
        diffusers.PNDMScheduler(skip_prk_steps=True), torch.from_numpy(x), 50, scale_input=False
    )
    assert ratio < 0.5, ratio  # measured 0.18 (PLMS; 0.27 with the PRK warm-up)
