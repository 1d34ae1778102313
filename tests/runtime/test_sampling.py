"""The one sampling loop, driven by a NumPy stand-in runner, against diffusers' pipeline loop."""

import inspect

import diffusers
import numpy as np
import pytest
import torch

from deploy_diff.runtime._numeric import relative_error
from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.sampling import NonFiniteError, sample
from deploy_diff.runtime.schedulers import SCHEDULER_NAMES, DDIMScheduler, DDPMScheduler, scheduler_from_name

SHAPE = (2, 3, 8, 8)


PATTERN = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)


def runner(x, t, labels):
    """A stand-in model that treats every image alike (its output does not depend on batch position)."""
    assert x.dtype == np.float32 and t.dtype == np.float32 and t.shape == (x.shape[0],)
    pattern = PATTERN[:, : x.shape[1]]
    out = 0.5 * np.tanh(x) + 0.3 * np.sin(pattern + t[:, None, None, None] * np.float32(0.01))
    if labels is not None:
        assert labels.dtype == np.int64 and labels.shape == (x.shape[0],)
        out = out + np.float32(0.05) * labels[:, None, None, None].astype(np.float32)
    return out


def diffusers_loop(scheduler, shape, steps, seed, **step_kwargs):
    """What diffusers' DDPMPipeline / DDIMPipeline do, with the same fake model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = torch.from_numpy(runner(inp.numpy(), np.full((shape[0],), float(t), np.float32), None))
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = g
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("name,eta", [("DDPMScheduler", 0.0), ("DDIMScheduler", 0.0), ("DDIMScheduler", 1.0)])
def test_sample_equals_diffusers_pipeline_loop(name, eta, seed):
    ours_cls = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}[name]
    ours = sample(runner, ours_cls(), SHAPE, num_inference_steps=20, generator=TorchGenerator(seed), eta=eta)
    kw = {"eta": eta} if name == "DDIMScheduler" else {}
    theirs = diffusers_loop(getattr(diffusers, name)(), SHAPE, 20, seed, **kw)
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    assert relative_error(ours, theirs) <= 1e-4


@pytest.mark.parametrize("name", sorted(SCHEDULER_NAMES))
def test_every_scheduler_samples_like_the_diffusers_loop(name):
    """init_noise_sigma, scale_model_input and per-step noise of every scheduler, through sample()."""
    ours_sched = scheduler_from_name(name, {"prediction_type": "epsilon"})
    theirs = getattr(diffusers, type(ours_sched).__name__).from_config(dict(ours_sched.config))
    ours = sample(runner, ours_sched, SHAPE, num_inference_steps=12, generator=TorchGenerator(3))
    assert relative_error(ours, diffusers_loop(theirs, SHAPE, 12, 3)) <= 1e-4


def test_per_image_generators_make_images_batch_independent():
    both = sample(runner, DDPMScheduler(), (2, 1, 8, 8), 10, generator=[TorchGenerator(1), TorchGenerator(2)])
    alone = sample(runner, DDPMScheduler(), (1, 1, 8, 8), 10, generator=[TorchGenerator(2)])
    np.testing.assert_allclose(both[1:], alone, atol=1e-6)


def test_guidance_scale_one_equals_conditional_model_alone():
    labels = np.array([3, 5])
    cond = sample(runner, DDIMScheduler(), SHAPE, 10, generator=TorchGenerator(0), class_labels=labels)
    g1 = sample(
        runner,
        DDIMScheduler(),
        SHAPE,
        10,
        generator=TorchGenerator(0),
        class_labels=labels,
        guidance_scale=1.0,
        null_class_label=10,
    )
    np.testing.assert_array_equal(cond, g1)


def test_guidance_is_one_batched_call_with_the_cfg_formula():
    calls = []

    def recording_runner(x, t, labels):
        calls.append(labels.copy())
        return runner(x, t, labels)

    labels, null, g = np.array([3, 5]), 10, 2.5
    got = sample(
        recording_runner,
        DDIMScheduler(clip_sample=False),
        SHAPE,
        4,
        generator=TorchGenerator(0),
        class_labels=labels,
        guidance_scale=g,
        null_class_label=null,
    )
    assert len(calls) == 4 and all(c.tolist() == [3, 5, 10, 10] for c in calls)
    # reference: the same loop written out by hand
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(4)
    x = TorchGenerator(0).randn(SHAPE)
    for t in s.timesteps:
        tt = np.full((2,), t, np.float32)
        cond, uncond = runner(x, tt, labels), runner(x, tt, np.full(2, null))
        x = s.step(uncond + np.float32(g) * (cond - uncond), t, x).prev_sample
    np.testing.assert_allclose(got, x, atol=1e-6)


def test_no_labels_with_null_label_samples_unconditionally():
    seen = []
    sample(
        lambda x, t, lab: (seen.append(lab), runner(x, t, lab))[1],
        DDIMScheduler(),
        SHAPE,
        2,
        generator=TorchGenerator(0),
        null_class_label=10,
    )
    assert all(lab.tolist() == [10, 10] for lab in seen)


def test_learned_variance_output_keeps_conditional_variance_under_guidance():
    def runner2c(x, t, labels):
        eps = runner(x, t, labels)
        return np.concatenate([eps, np.tanh(eps)], axis=1)

    out = sample(
        runner2c,
        DDPMScheduler(variance_type="learned_range"),
        SHAPE,
        3,
        generator=TorchGenerator(0),
        class_labels=[1, 2],
        guidance_scale=2.0,
        null_class_label=10,
    )
    assert out.shape == SHAPE and np.isfinite(out).all()


def test_given_latents_are_scaled_and_used():
    latents = TorchGenerator(4).randn(SHAPE)
    a = sample(runner, DDIMScheduler(), SHAPE, 5, latents=latents)
    b = sample(runner, DDIMScheduler(), SHAPE, 5, generator=TorchGenerator(4))
    np.testing.assert_array_equal(a, b)


def test_callback_sees_every_step():
    seen = []
    sample(runner, DDIMScheduler(), SHAPE, 6, generator=TorchGenerator(0), callback=lambda i, t, x: seen.append(i))
    assert seen == list(range(6))


def test_non_finite_model_output_names_the_step():
    def bad(x, t, labels):
        out = runner(x, t, labels)
        if t[0] < 500:
            out[0, 0, 0, 0] = np.nan
        return out

    with pytest.raises(NonFiniteError, match=r"model output .* at step \d+ \(timestep \d+\)"):
        sample(bad, DDIMScheduler(), SHAPE, 10, generator=TorchGenerator(0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"guidance_scale": 3.0, "class_labels": [1, 2]}, "null class label"),
        ({"guidance_scale": -1.0, "null_class_label": 10}, "guidance_scale"),
        ({"guidance_scale": float("nan"), "null_class_label": 10}, "guidance_scale"),
        ({"class_labels": [1, 2, 3]}, "3 class_labels for a batch of 2"),
        ({"class_labels": [1.5, 2]}, "integers"),
        ({"class_labels": [-1, 2]}, ">= 0"),
        ({"latents": np.zeros((1, 3, 8, 8), np.float32)}, "expected"),
        ({"latents": np.zeros(SHAPE, np.int64)}, "floating point"),
        ({"latents": np.full(SHAPE, np.inf, np.float32)}, "non-finite"),
        ({"eta": 0.5}, "only used by DDIM"),
        ({"eta": -1.0}, "eta"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises((ValueError, FloatingPointError), match=match):
        sample(runner, DDPMScheduler(), SHAPE, 3, generator=TorchGenerator(0), **kwargs)


def test_runner_with_wrong_output_shape_is_named():
    with pytest.raises(ValueError, match="runner returned shape"):
        sample(lambda x, t, lab: x[:, :1], DDIMScheduler(), SHAPE, 2, generator=TorchGenerator(0))


# -- the argument rules (deploy_diff.runtime.arguments), each used by sample() and Pipeline.__call__ ---------------
def test_class_label_rule_returns_one_int64_label_per_image():
    from deploy_diff.runtime.arguments import check_class_labels

    assert check_class_labels(3, 2).tolist() == [3, 3] and check_class_labels(3, 2).dtype == np.int64
    assert check_class_labels(np.array([1, 2], np.uint8), 2).tolist() == [1, 2]
    assert check_class_labels(None, 3, null_class_label=10).tolist() == [10, 10, 10]
    assert check_class_labels(None, 3) is None
    assert check_class_labels(10, 1, num_classes=10, null_class_label=10).tolist() == [10]  # the null label itself
    # what sample() has always taken: whole numbers stored as floats, and a [B, 1] column
    assert check_class_labels(np.array([1.0, 2.0]), 2).tolist() == [1, 2]
    assert check_class_labels(3.0, 2).dtype == np.int64
    assert check_class_labels(np.array([[1], [2]]), 2).tolist() == [1, 2]


def test_sample_takes_whole_float_labels_and_a_label_column():
    def runner(x, t, labels):
        seen.append(labels.copy())
        return np.zeros_like(x)

    seen = []
    for labels in (np.array([1.0, 2.0]), np.array([[1], [2]]), [1, 2]):
        sample(runner, DDIMScheduler(), SHAPE, 1, generator=TorchGenerator(0), class_labels=labels)
    assert all(s.dtype == np.int64 and s.tolist() == [1, 2] for s in seen), seen


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        ([[1, 2]], {}, "integers"),  # nested: not one label per image
        (True, {}, "integers"),
        ([1.5, 2.0], {}, "integers"),  # not a whole number
        ([np.nan, 1.0], {}, "integers"),
        (np.array([2**63, 1], np.uint64), {}, "fit int64"),  # would wrap to a negative int64
        ([1, 2, 3], {"where": "num_images=2"}, "3 class_labels for num_images=2"),
        ([10, 1], {"num_classes": 10}, r"0\.\.9; got \[10, 1\]"),  # 10 is not a null label here
        (1, {"conditional": False}, "unconditional: class_labels must be None"),
        (None, {"conditional": True, "num_classes": 10}, r"pass class_labels \(0\.\.9\)"),
    ],
)
def test_class_label_rule_refusals(labels, kwargs, match):
    from deploy_diff.runtime.arguments import check_class_labels

    with pytest.raises(ValueError, match=match):
        check_class_labels(labels, 2, **kwargs)


def test_step_count_eta_guidance_and_seed_rules():
    from deploy_diff.runtime.arguments import check_eta, check_guidance_scale, check_num_inference_steps, check_seeds

    assert check_num_inference_steps(np.int32(5), 1000) == 5 and type(check_num_inference_steps(5)) is int
    for bad in (0, -1, 2.0, True, "5", None):
        with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
            check_num_inference_steps(bad)
    for bad in (2.0, True, "5", None):  # not an int at all, whatever the range
        with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
            check_num_inference_steps(bad, 1000)
    with pytest.raises(ValueError, match=r"num_inference_steps=0 is outside \[1, num_train_timesteps=1000\]"):
        check_num_inference_steps(0, 1000)  # with the range known, it is named
    with pytest.raises(ValueError, match=r"num_inference_steps=11 is outside \[1, num_train_timesteps=10\]"):
        check_num_inference_steps(11, 10)
    assert check_eta(np.float32(0.5), DDIMScheduler()) == 0.5 and check_eta(0, DDPMScheduler()) == 0.0
    assert check_eta(np.array(0.3)) == 0.3 and type(check_eta(np.array(1))) is float
    for bad in (True, np.array([0.3]), np.array(np.nan), "0.3"):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            check_eta(bad)
    with pytest.raises(ValueError, match="only used by DDIM; DDPMScheduler has no eta"):
        check_eta(0.5, DDPMScheduler())
    assert check_guidance_scale(None, None) is None and check_guidance_scale(2, 10) == 2.0
    with pytest.raises(ValueError, match="this model is unconditional, so pass guidance_scale=None"):
        check_guidance_scale(2.0, None, conditional=False)
    with pytest.raises(ValueError, match="this class-conditional model has no null label"):
        check_guidance_scale(2.0, None, conditional=True)
    assert check_seeds(np.array([1, 2], np.uint64), 2) == [1, 2] and check_seeds(np.array(7), 1) == 7
    with pytest.raises(TypeError, match="each seed must be an int"):
        check_seeds([1, 2.5], 2)
