"""Bad input at the runtime API: latents of a non-float dtype or holding NaN/inf, more inference steps than training
timesteps, unknown or invalid scheduler config values (also inside a bundle). Each is refused with a clear error
before the model is called; unknown config keys only warn, as in diffusers.

Each test's docstring says what was tried, what the user sees, and what is kept.
"""

import json
import warnings

import numpy as np
import pytest
from _reliability import CountingRunner, copy_bundle, edit_manifest

from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.sampling import NonFiniteError
from deploy_diff.runtime.schedulers import SCHEDULER_CLASSES, SCHEDULER_NAMES


@pytest.fixture(scope="module")
def counted(cond_run_bundle):
    """A DDIM pipeline on the conditional bundle whose model calls are counted."""
    pipe = Pipeline.from_bundle(cond_run_bundle, scheduler="ddim", num_threads=1)
    runner = CountingRunner(pipe.runner)
    return Pipeline(runner, pipe.model, pipe.scheduler_config, scheduler="ddim"), runner


SHAPE = (2, 1, 8, 8)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_, np.complex64, np.complex128, object, "U1"])
def test_latents_of_a_non_float_dtype_are_refused(counted, dtype):
    """Latents of an integer, bool, complex, object or string dtype raise ValueError `latents must be floating point;
    got dtype ...` before the model is called (complex values are never silently cast to their real part)."""
    pipe, runner = counted
    runner.calls = 0
    latents = np.zeros(SHAPE, dtype=dtype)
    with pytest.raises(ValueError, match=r"latents must be floating point; got dtype"):
        pipe(num_images=2, num_inference_steps=3, latents=latents, class_labels=1)
    assert runner.calls == 0


def _with(value, where=(1, 0, 3, 5), dtype=np.float32):
    x = TorchGenerator(0).randn(SHAPE).astype(dtype)
    x[where] = value
    return x


@pytest.mark.parametrize(
    "latents",
    [
        np.full(SHAPE, np.nan, np.float32),
        _with(np.nan),
        _with(np.inf),
        _with(-np.inf),
        _with(np.nan, dtype=np.float16),
        _with(1e300, dtype=np.float64),  # finite in float64, inf once cast to float32
    ],
    ids=["all-nan", "one-nan", "one-inf", "one-minus-inf", "float16-nan", "float64-overflows-float32"],
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_latents_are_refused(counted, latents):
    """Latents holding NaN or +-inf (also a float64 value that overflows float32) raise NonFiniteError `latents has N
    non-finite value(s)` before the model is called, instead of sampling NaN images."""
    pipe, runner = counted
    runner.calls = 0
    with pytest.raises(NonFiniteError, match=r"latents has \d+ non-finite value"):
        pipe(num_images=2, num_inference_steps=3, latents=latents, class_labels=1)
    assert runner.calls == 0


@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
@pytest.mark.parametrize("steps", [1001, 10**9])
def test_more_steps_than_training_timesteps_are_refused(counted, name, steps):
    """Asking any scheduler for more inference steps than the model's 1000 training timesteps raises ValueError
    `num_inference_steps=N is outside [1, num_train_timesteps=1000]` at once: no model call, no giant allocation."""
    pipe, runner = counted
    runner.calls = 0
    p = Pipeline(runner, pipe.model, pipe.scheduler_config, scheduler=name)
    with pytest.raises(ValueError, match=rf"num_inference_steps={steps} is outside \[1, num_train_timesteps=1000\]"):
        p(num_images=2, num_inference_steps=steps, seed=0, class_labels=1)
    assert runner.calls == 0


@pytest.mark.parametrize("cls", list(SCHEDULER_CLASSES.values()), ids=list(SCHEDULER_CLASSES))
def test_unknown_scheduler_config_keys_only_warn(cls):
    """A scheduler config with keys the class does not know (a newer diffusers' config) loads with a UserWarning naming
    them, as diffusers does, and the scheduler works."""
    with pytest.warns(UserWarning, match="some_future_option"):
        s = cls.from_config(
            {
                "_class_name": cls.__name__,
                "_diffusers_version": "0.99.0",
                "some_future_option": 1,
                "num_train_timesteps": 1000,
            }
        )
    s.set_timesteps(4)
    plain = cls.from_config({"num_train_timesteps": 1000})
    plain.set_timesteps(4)
    np.testing.assert_array_equal(np.asarray(s.timesteps), np.asarray(plain.timesteps))
    assert len(np.unique(np.asarray(s.timesteps))) >= 4  # PNDM's Runge-Kutta warm-up adds 3 more, as in diffusers


@pytest.mark.parametrize("cls", list(SCHEDULER_CLASSES.values()), ids=list(SCHEDULER_CLASSES))
@pytest.mark.parametrize(
    "key, value",
    [
        ("beta_schedule", "nope"),
        ("prediction_type", "x"),
        ("timestep_spacing", "nope"),
        ("num_train_timesteps", 0),
        ("beta_start", -1.0),
    ],
)
def test_invalid_scheduler_config_values_raise(cls, key, value):
    """`Scheduler.from_config({...: bad value})` raises ValueError naming the key (even alongside an unknown key, which
    only warns), never a scheduler that fails or drifts later."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=key):
            cls.from_config({"_class_name": cls.__name__, "some_future_option": 1, key: value})


def test_a_bundle_with_an_invalid_scheduler_config_is_refused_at_load(cond_run_bundle, tmp_path):
    """A bundle whose (re-hashed) scheduler_config.json says prediction_type "x" is refused by Pipeline.from_bundle
    with a ValueError naming prediction_type, not at the first sampling call."""
    from deploy_diff.runtime.bundle import sha256_file

    b = copy_bundle(cond_run_bundle, tmp_path / "b")
    cfg = json.loads((b / "scheduler_config.json").read_text())
    (b / "scheduler_config.json").write_text(json.dumps(dict(cfg, prediction_type="x")))

    def rehash(m):
        m["files"]["scheduler_config.json"].update(
            sha256=sha256_file(b / "scheduler_config.json"), bytes=(b / "scheduler_config.json").stat().st_size
        )

    edit_manifest(b, rehash)
    with pytest.raises(ValueError, match="prediction_type='x'"):
        Pipeline.from_bundle(b, scheduler="ddim")
