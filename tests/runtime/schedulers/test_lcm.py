"""LCMScheduler against diffusers: timesteps of the skipping grid, every prev_sample and denoised output of full
loops (noise from matched generators), custom timesteps and strength, the errors, configs, and the helpers."""

import warnings

import diffusers
import numpy as np
import pytest
import torch
from _parity import fake_model, rel_err, run_parity
from _scheduler_checks import (
    assert_diffusers_config_round_trip,
    assert_loop_matches_diffusers,
    assert_step_after_the_last_raises,
)
from _sweep import case_id, sample_cases

from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.sampling import sample
from deploy_diff.runtime.schedulers import (
    SCHEDULER_CLASSES,
    DDPMScheduler,
    LCMScheduler,
    load_scheduler,
    scheduler_from_name,
)

SHAPE = (2, 3, 8, 8)


#: every prev_sample and denoised output, for every config (the DDPM/DDIM tolerance; worst measured over 1500 cases
#: of LCM_SPACE: 2.5e-6, and 3.7e-5 with squaredcos_cap_v2 or zero terminal SNR, where DDPM/DDIM allow 1e-2: an
#: LCM step restarts from the consistency output, so diffusers' float32 schedule errors do not build up)
TOL = 1e-4


class Recording:
    """Wraps a scheduler for _parity.run_parity and keeps every step's denoised output."""

    def __init__(self, scheduler):
        self._s, self.denoised = scheduler, []

    def __getattr__(self, name):
        return getattr(self._s, name)

    def step(self, *args, **kwargs):
        out = self._s.step(*args, **kwargs)
        self.denoised.append(out.denoised)
        return out


def parity(ours, theirs, steps, seed=0):
    """run_parity over both (timesteps equal), plus every denoised output: the worst relative error of either."""
    a, b = Recording(ours), Recording(theirs)
    worst = run_parity(a, b, steps, seed=seed)
    assert len(a.denoised) == len(b.denoised) == len(ours.timesteps)
    return max([worst] + [rel_err(x, y) for x, y in zip(a.denoised, b.denoised)])


LCM_SPACE = {
    "beta_schedule": ["scaled_linear", "linear", "squaredcos_cap_v2"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "original_inference_steps": [50, 20, 100, 1000, 7],
    "timestep_spacing": ["leading", "trailing", "linspace"],  # in the config, unused (as in diffusers)
    "timestep_scaling": [10.0, 1.0, 0.1],
    "clip_sample": [False, True],
    "thresholding": [False, True],
    "rescale_betas_zero_snr": [False, True],
    "steps": [1, 2, 3, 4, 5, 6, 7, 8, 15, 50],
    "seed": [0, 1, 2],
}


def _valid(cfg):
    if cfg["steps"] > cfg["original_inference_steps"]:
        return False  # refused by both (test_errors_equal_diffusers)
    # zero terminal SNR, epsilon, no clipping: no x_0 at t = T - 1, the grid's top when original steps divide T
    zero_snr_top = cfg["rescale_betas_zero_snr"] and 1000 % cfg["original_inference_steps"] == 0
    return not (zero_snr_top and cfg["prediction_type"] == "epsilon" and not cfg["clip_sample"])


@pytest.mark.parametrize("cfg", sample_cases(LCM_SPACE, 36, seed=12, valid=_valid), ids=case_id)
def test_lcm_parity(cfg):
    cfg = dict(cfg)
    steps, seed = cfg.pop("steps"), cfg.pop("seed")
    err = parity(LCMScheduler(**cfg), diffusers.LCMScheduler(**cfg), steps, seed=seed)
    assert err <= TOL, (cfg, steps, err)


@pytest.mark.parametrize(
    "T,o,strength",
    [(1000, 50, 1.0), (1000, 7, 1.0), (1000, 1000, 1.0), (1000, 50, 0.5), (1000, 30, 0.35), (777, 13, 1.0)],
)
def test_timesteps_and_grid_equal_diffusers(T, o, strength):
    ours = LCMScheduler(num_train_timesteps=T, original_inference_steps=o)
    theirs = diffusers.LCMScheduler(num_train_timesteps=T, original_inference_steps=o)
    grid = ours.origin_timesteps(strength=strength)
    m = int(o * strength)
    assert grid.dtype == np.int64 and len(grid) == m and grid[0] == T // o - 1
    for n in sorted({n for n in (1, 2, 3, 4, 8, m // 2) if 1 <= n <= m} | {m}):
        ours.set_timesteps(n, strength=strength)
        theirs.set_timesteps(n, strength=strength)
        assert ours.timesteps.dtype == np.int64
        np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    # n = the grid's length takes the whole grid: diffusers' lcm_origin_timesteps, reversed
    np.testing.assert_array_equal(theirs.timesteps.numpy(), grid[::-1])
    # original_inference_steps given to set_timesteps wins over the config's
    ours.set_timesteps(4, original_inference_steps=10)
    theirs.set_timesteps(4, original_inference_steps=10)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    np.testing.assert_array_equal(ours.origin_timesteps(10), np.arange(1, 11) * (T // 10) - 1)


def _loop(ours, theirs, x, y, seed=5, start=0):
    """Step both (timesteps set) from index ``start`` with matched generators: the worst relative error of every
    prev_sample but the last, and the last (prev_sample, denoised) of each."""
    g_o, g_t = TorchGenerator(seed), torch.Generator().manual_seed(seed)
    worst, outs = 0.0, None
    ts = list(zip(ours.timesteps[start:], theirs.timesteps[start:]))
    assert ts
    for k, (to, tt) in enumerate(ts):
        po, do = ours.step(fake_model(x, float(to)), to, x, generator=g_o, return_dict=False)
        mt = torch.from_numpy(fake_model(y.numpy(), float(tt)))
        pt, dt = theirs.step(mt, tt, y, generator=g_t, return_dict=False)
        worst = max(worst, rel_err(do, dt))
        if k < len(ts) - 1:
            worst = max(worst, rel_err(po, pt))
        x, y, outs = po, pt, (po, do, pt, dt)
    return worst, outs


def _latents():
    x = TorchGenerator(0).randn(SHAPE)
    return x, torch.from_numpy(x.copy())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_strength_schedule_matches_diffusers(prediction_type):
    cfg = {"prediction_type": prediction_type}
    ours, theirs = LCMScheduler(**cfg), diffusers.LCMScheduler(**cfg)
    ours.set_timesteps(4, strength=0.6)
    theirs.set_timesteps(4, strength=0.6)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    worst, (po, do, pt, dt) = _loop(ours, theirs, *_latents())
    assert worst <= 1e-4 and rel_err(po, pt) <= 1e-4
    assert po is do  # the last step returns the consistency output itself


def test_custom_timesteps_match_diffusers():
    ts = [999, 759, 499, 259]  # on the default grid (k = 20)
    ours, theirs = LCMScheduler(), diffusers.LCMScheduler()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the grid, starting at T - 1: no warning
        ours.set_timesteps(timesteps=ts)
    theirs.set_timesteps(timesteps=ts)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.custom_timesteps and ours.num_inference_steps == 4
    worst, (po, _, pt, _) = _loop(ours, theirs, *_latents())
    assert worst <= 1e-4 and rel_err(po, pt) <= 1e-4


def test_custom_timesteps_with_strength_end_on_the_denoised_sample():
    """diffusers keeps num_inference_steps = len(custom timesteps) after the strength cut, so its last step still
    adds noise (its pipelines return ``denoised``, not prev_sample); ours ends on denoised, like its pipeline's
    image. Every other output agrees."""
    ts = [999, 879, 759, 639, 499, 379, 259, 139]
    ours, theirs = LCMScheduler(), diffusers.LCMScheduler()
    with pytest.warns(UserWarning, match=r"\[879, 759, 639\] are not on the skipping grid"):  # of strength 0.5
        ours.set_timesteps(timesteps=ts, strength=0.5)
    theirs.set_timesteps(timesteps=ts, strength=0.5)
    np.testing.assert_array_equal(ours.timesteps, [499, 379, 259, 139])
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.num_inference_steps == theirs.num_inference_steps == 8
    worst, (po, do, pt, dt) = _loop(ours, theirs, *_latents())
    assert worst <= 1e-4
    assert po is do and rel_err(po, dt) <= 1e-4
    assert rel_err(pt, dt) > 1e-2  # diffusers noised its last prev_sample


def test_custom_timesteps_warn_as_diffusers_logs():
    s = LCMScheduler()
    with pytest.warns(UserWarning, match="start at 900"):
        s.set_timesteps(timesteps=[900, 759])
    with pytest.warns(UserWarning, match=r"\[500\] are not on the skipping grid"):
        s.set_timesteps(timesteps=[999, 500, 259])
    with pytest.warns(UserWarning) as record:
        s.set_timesteps(timesteps=[999, 499, 0], original_inference_steps=2)
    assert [str(w.message).split(":")[0] for w in record] == [
        "the custom timesteps [0] are not on the skipping grid of original_inference_steps=2",
        "3 custom timesteps are more than original_inference_steps=2",
    ]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "got neither"),
        ({"num_inference_steps": 4, "timesteps": [999, 499]}, "got both"),
        ({"num_inference_steps": 51}, "at most 50 steps"),
        ({"num_inference_steps": 30, "strength": 0.5}, "at most 25 steps"),
        ({"num_inference_steps": 6, "original_inference_steps": 5}, "at most 5 steps"),
        ({"num_inference_steps": 4, "original_inference_steps": 1001}, "past num_train_timesteps=1000"),
        ({"num_inference_steps": 1001}, r"outside \[1, num_train_timesteps=1000\]"),
        ({"timesteps": [999, 999, 500]}, "strictly descending"),
        ({"timesteps": [500, 999]}, "strictly descending"),
        ({"timesteps": [1000, 500]}, r"in \[0, num_train_timesteps=1000\)"),
    ],
)
def test_errors_equal_diffusers(kwargs, match):
    with pytest.raises(ValueError):
        diffusers.LCMScheduler().set_timesteps(**kwargs)
    with pytest.raises(ValueError, match=match):
        LCMScheduler().set_timesteps(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match,theirs",
    [
        ({"num_inference_steps": 0}, "outside", ZeroDivisionError),
        ({"num_inference_steps": 4, "original_inference_steps": 0}, "original_inference_steps", ZeroDivisionError),
        ({"timesteps": []}, "non-empty", IndexError),
        ({"timesteps": [999, 500, 259], "strength": 0.2}, "keeps none", None),  # diffusers: empty timesteps
        ({"num_inference_steps": 4, "strength": 1.5}, "strength", None),  # diffusers: timesteps past T - 1
        ({"num_inference_steps": 4, "strength": 0.0}, "strength", ValueError),
    ],
)
@pytest.mark.filterwarnings("ignore:the custom timesteps:UserWarning")
def test_refusals_where_diffusers_fails_otherwise(kwargs, match, theirs):
    """Documented differences (docs/parity.md): a clear ValueError where diffusers fails with another error, or
    builds a schedule it cannot step (no timesteps, or timesteps past num_train_timesteps - 1)."""
    with pytest.raises(ValueError, match=match):
        LCMScheduler().set_timesteps(**kwargs)
    d = diffusers.LCMScheduler()
    if theirs is not None:
        with pytest.raises(theirs):
            d.set_timesteps(**kwargs)
    else:
        d.set_timesteps(**kwargs)
        t = d.timesteps.numpy()
        assert t.size == 0 or t.max() >= 1000


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"original_inference_steps": 0}, "original_inference_steps"),
        ({"original_inference_steps": 2.5}, "original_inference_steps"),
        ({"timestep_scaling": 0.0}, "timestep_scaling"),
        ({"timestep_scaling": float("nan")}, "timestep_scaling"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LCMScheduler(**kwargs)


def test_zero_snr_epsilon_without_clipping_is_refused_where_diffusers_is_not_finite():
    cfg = dict(rescale_betas_zero_snr=True)
    ours, theirs = LCMScheduler(**cfg), diffusers.LCMScheduler(**cfg)
    ours.set_timesteps(2)
    theirs.set_timesteps(2)
    assert ours.timesteps[0] == 999
    x = np.full((1, 1, 4, 4), 0.5, np.float32)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ours.step(x * 0.1, ours.timesteps[0], x, generator=TorchGenerator(0))
    out = theirs.step(torch.from_numpy(x * 0.1), theirs.timesteps[0], torch.from_numpy(x)).denoised
    assert not torch.isfinite(out).all()


def test_step_index_begin_index_and_img2img_match_diffusers():
    ours, theirs = LCMScheduler(), diffusers.LCMScheduler()
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    assert ours.step_index is None and ours.begin_index is None
    start = 2
    ours.set_begin_index(start)
    theirs.set_begin_index(start)
    x0 = TorchGenerator(0).randn(SHAPE)
    noise = TorchGenerator(1).randn(SHAPE)
    x = ours.add_noise(x0, noise, ours.timesteps[start : start + 1])
    y = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), theirs.timesteps[start : start + 1])
    assert rel_err(x, y) <= 1e-6
    gens = (TorchGenerator(7), torch.Generator().manual_seed(7))
    assert_loop_matches_diffusers(ours, theirs, x, y, start, generators=gens)
    assert ours.step_index == theirs.step_index == 6
    ours.set_timesteps(3)  # a new schedule resets both indices, as in diffusers
    assert ours.step_index is None and ours.begin_index is None
    assert_step_after_the_last_raises(ours, x, match="past the last")


def test_step_outputs_and_scalings():
    s, d = LCMScheduler(timestep_scaling=3.0), diffusers.LCMScheduler(timestep_scaling=3.0)
    for t in (0, 1, 19, 500, 999):
        assert s.get_scalings_for_boundary_condition_discrete(t) == d.get_scalings_for_boundary_condition_discrete(t)
    ts = np.array([[0, 19], [500, 999]])
    c_skip, c_out = s.get_scalings_for_boundary_condition_discrete(ts)
    assert c_skip.dtype == c_out.dtype == np.float64 and c_skip.shape == ts.shape
    want = np.array([s.get_scalings_for_boundary_condition_discrete(int(t)) for t in ts.ravel()]).T
    np.testing.assert_allclose(np.stack([c_skip.ravel(), c_out.ravel()]), want, rtol=1e-15)
    assert (c_skip[0, 0], c_out[0, 0]) == (1.0, 0.0)  # the boundary condition f(x, 0) = x

    s.set_timesteps(2)
    assert s.scale_model_input(np.ones(2, np.float32), 999).tolist() == [1.0, 1.0] and s.init_noise_sigma == 1.0
    x = TorchGenerator(0).randn((1, 2, 4, 4))
    prev, denoised = s.step(fake_model(x, 999), s.timesteps[0], x, generator=TorchGenerator(1), return_dict=False)
    assert prev.dtype == denoised.dtype == np.float32 and not np.array_equal(prev, denoised)
    out = s.step(fake_model(prev, 499), s.timesteps[1], prev)
    assert out.prev_sample is out.denoised is out.pred_original_sample  # the last step adds no noise


@pytest.mark.parametrize("src", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_lcm_by_name_from_another_config_equals_diffusers(src, tmp_path):
    getattr(diffusers, src)(beta_schedule="scaled_linear", prediction_type="v_prediction").save_config(tmp_path)
    for config, their_config in (
        (tmp_path, diffusers.LCMScheduler.load_config(tmp_path)),  # from a file: every saved value carries over
        (
            SCHEDULER_CLASSES[src](beta_schedule="scaled_linear", prediction_type="v_prediction").config,
            getattr(diffusers, src)(beta_schedule="scaled_linear", prediction_type="v_prediction").config,
        ),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = scheduler_from_name("lcm", config)
        theirs = diffusers.LCMScheduler.from_config(their_config)
        assert isinstance(ours, LCMScheduler)
        for key, value in ours.config.items():
            assert value == theirs.config[key], (key, value, theirs.config[key])
        assert parity(ours, theirs, 4) <= 1e-4


def test_config_round_trip_and_load_scheduler(tmp_path):
    ours = LCMScheduler(
        beta_schedule="linear", prediction_type="v_prediction", original_inference_steps=20, timestep_scaling=5.0
    )
    assert_diffusers_config_round_trip(ours, diffusers.LCMScheduler, tmp_path / "a")
    s = load_scheduler(tmp_path / "a")
    assert type(s) is LCMScheduler and s.config == ours.config
    assert load_scheduler({**ours.config, "_class_name": "LCMScheduler"}).config == ours.config
    # a beta schedule diffusers lacks is saved as trained_betas and loads in diffusers' LCMScheduler
    own = LCMScheduler(beta_schedule="cosine", prediction_type="v_prediction")
    own.save_config(tmp_path / "b")
    assert parity(own, diffusers.LCMScheduler.from_pretrained(tmp_path / "b"), 4) <= 1e-4
    # an LCM config switched to DDPM drops the LCM-only keys silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DDPMScheduler.from_config(tmp_path / "a")


def test_sample_equals_the_diffusers_pipeline_loop():
    """sample() with an LCM scheduler: latents, per-step noise and the last denoised output as diffusers' loop."""

    def runner(x, t, labels):
        return fake_model(x, float(t[0]))

    ours = sample(runner, LCMScheduler(), SHAPE, num_inference_steps=4, generator=TorchGenerator(3))
    theirs = diffusers.LCMScheduler()
    theirs.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(SHAPE, generator=g)
    for t in theirs.timesteps:
        mt = torch.from_numpy(fake_model(y.numpy(), float(t)))
        y, denoised = theirs.step(mt, t, y, generator=g, return_dict=False)
    assert rel_err(ours, denoised) <= 1e-4
