"""Fuzzing scheduler options (hypothesis): an invalid value of any option raises ValueError, a value of the wrong
type raises ValueError or TypeError (naming the option), unknown config keys only warn and are ignored, and keys that
belong to other scheduler classes (or to diffusers' bookkeeping) are ignored silently. A huge ``num_train_timesteps``
is refused at once instead of hanging or allocating petabytes.

Each bug this fuzzing found has its own test after the random ones, named after what it checks (the comments
give the bug's label, e.g. S1 or M4). A newly found bug's signature goes into ``_reliability.KNOWN_BUGS`` while it is
open, pinned by a strict xfail, so the random tests keep looking for others; it is empty now.
"""

from __future__ import annotations

import re
import signal
import string
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from _reliability import FUZZ, NAMES, NOT_FINITE, VALID_STRINGS
from hypothesis import event, given
from hypothesis import strategies as st

from deploy_diff.runtime.schedulers import SCHEDULER_CLASSES

RANGE_SCHEDULES = ("linear", "scaled_linear", "quadratic", "sigmoid", "iddpm_linear")  # use beta_start/beta_end
# an unknown string must give ValueError; other types are tested in test_wrongly_typed_values_raise_value_or_type_error
NOT_A_CHOICE = st.text(max_size=12).filter(lambda s: s not in VALID_STRINGS) | st.sampled_from(
    ["karras_seed", "Linear", "EPSILON", "linear ", "dpmsolver+++"]
)
NOT_POSITIVE = st.floats(max_value=0.0) | st.just(float("nan"))
BETA_OUT_OF_RANGE = st.floats(max_value=-1e-12) | st.floats(min_value=1.0) | NOT_FINITE
INVALID_VALUES = {
    "num_train_timesteps": (
        st.integers(max_value=0)
        | st.floats(allow_nan=True)
        | st.text(max_size=4)
        | st.none()
        | st.booleans()
        | st.just([1000])
    ),
    "beta_start": BETA_OUT_OF_RANGE,
    "beta_end": BETA_OUT_OF_RANGE,
    "beta_schedule": NOT_A_CHOICE,
    "prediction_type": NOT_A_CHOICE,
    "timestep_spacing": NOT_A_CHOICE,
    "algorithm_type": NOT_A_CHOICE,
    "solver_type": NOT_A_CHOICE,
    "final_sigmas_type": NOT_A_CHOICE,
    "variance_type": NOT_A_CHOICE,
    "interpolation_type": NOT_A_CHOICE,
    "timestep_type": NOT_A_CHOICE,
    "steps_offset": st.integers(max_value=-1) | st.floats(allow_nan=True) | st.text(max_size=3) | st.none(),
    "clip_sample_range": NOT_POSITIVE,
    "sample_max_value": NOT_POSITIVE,
    "dynamic_thresholding_ratio": NOT_POSITIVE | st.floats(min_value=1.0, exclude_min=True),
    "solver_order": st.integers().filter(lambda n: n not in (1, 2, 3)) | st.sampled_from([1.5, 2.5]),
    "sigma_min": NOT_POSITIVE,
    "sigma_max": NOT_POSITIVE,
    "lambda_min_clipped": st.just(float("nan")) | st.text(max_size=3),
    "disable_corrector": st.text(min_size=1, max_size=3) | st.integers() | st.none(),
    "trained_betas": st.none(),  # drawn in check(): it depends on num_train_timesteps
}


@pytest.mark.parametrize("name", NAMES)
def test_invalid_values_raise_value_error(name):
    cls = SCHEDULER_CLASSES[name]
    keys = sorted(k for k in INVALID_VALUES if k in cls._init_parameters())
    assert {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"} <= set(keys)

    @FUZZ
    @given(key=st.sampled_from(keys), data=st.data())
    def check(key, data):
        cfg = {key: data.draw(INVALID_VALUES[key], label=key)}
        if key in ("beta_start", "beta_end"):  # only these schedules read them
            cfg["beta_schedule"] = data.draw(st.sampled_from(RANGE_SCHEDULES))
        if key == "trained_betas":
            T = data.draw(st.integers(1, 20))
            good = st.floats(0.0, 0.5)
            cfg = {
                "num_train_timesteps": T,
                "trained_betas": data.draw(
                    st.lists(good, max_size=25).filter(lambda b: len(b) != T)
                    | st.lists(good, min_size=T - 1, max_size=T - 1).flatmap(
                        lambda b: st.sampled_from([float("nan"), -0.1, 1.0, 2.0]).map(lambda bad: [*b, bad])
                    )
                ),
            }
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError) as info:
                cls(**cfg).set_timesteps(1)  # 1 step is valid for any valid config: only the bad value can fail
        assert str(info.value).strip()

    check()


NOT_A_NUMBER = (
    st.text(max_size=5)
    | st.lists(st.floats(0, 1), max_size=2)
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)
    | st.none()
)
NOT_A_STRING = (
    st.integers()
    | st.floats()
    | st.none()
    | st.lists(st.text(max_size=3), max_size=2)
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)
)
NUMBER_OPTIONS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "clip_sample_range",
    "sample_max_value",
    "dynamic_thresholding_ratio",
    "steps_offset",
    "solver_order",
    "sigma_min",
    "sigma_max",
)
CHOICE_OPTIONS = (
    "beta_schedule",
    "prediction_type",
    "timestep_spacing",
    "algorithm_type",
    "solver_type",
    "final_sigmas_type",
    "interpolation_type",
    "timestep_type",
)


@pytest.mark.parametrize("name", NAMES)
def test_wrongly_typed_values_raise_value_or_type_error(name):
    cls = SCHEDULER_CLASSES[name]
    keys = [k for k in NUMBER_OPTIONS + CHOICE_OPTIONS if k in cls._init_parameters()]

    @FUZZ
    @given(key=st.sampled_from(keys), data=st.data())
    def check(key, data):
        value = data.draw(NOT_A_NUMBER if key in NUMBER_OPTIONS else NOT_A_STRING, label=key)
        if value is None and key in ("sigma_min", "sigma_max"):
            return  # None is their default
        cfg = {key: value, "beta_schedule": "linear"} if key != "beta_schedule" else {key: value}
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            with pytest.raises((ValueError, TypeError)) as info:
                cls(**cfg).set_timesteps(1)
        assert str(info.value).strip()
        event(f"{type(info.value).__name__}")

    check()


JSON_LEAVES = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=10)
JSON_SMALL = st.recursive(
    JSON_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6
)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_config_keys_warn_and_are_ignored(name):
    cls = SCHEDULER_CLASSES[name]

    @FUZZ
    @given(
        key=st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=12).map(lambda k: f"fuzz_{k}"),
        value=JSON_SMALL,
    )
    def check(key, value):
        with pytest.warns(UserWarning, match=re.escape(key)):
            s = cls.from_config({"num_train_timesteps": 100, key: value, "_class_name": "SomethingElse"})
        assert key not in s.config and s.config["num_train_timesteps"] == 100
        s.set_timesteps(4)  # PNDM's Runge-Kutta warm-up needs 4 steps, as in diffusers

    check()


@pytest.mark.parametrize("name", NAMES)
def test_other_schedulers_keys_are_ignored_silently(name):
    """A config written by any other scheduler class (or by diffusers' bookkeeping) loads without a warning."""
    cls = SCHEDULER_CLASSES[name]
    own = set(cls._init_parameters())
    foreign = sorted(
        ({k for c in SCHEDULER_CLASSES.values() for k in c._init_parameters()} | {"sigma_data", "s_churn"}) - own
        | {"_class_name", "_diffusers_version"}
    )

    @FUZZ
    @given(keys=st.lists(st.sampled_from(foreign), min_size=1, max_size=4, unique=True), value=JSON_SMALL)
    def check(keys, value):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            s = cls.from_config({"num_train_timesteps": 100, **{k: value for k in keys}})
        assert not set(keys) & set(s.config)
        s.set_timesteps(4)

    check()


# -- bugs found ------------------------------------------------------------------------------------------------------
class _Hang(Exception):
    pass


@contextmanager
def _time_limit(seconds: float):
    if not hasattr(signal, "setitimer"):
        pytest.skip("needs signal.setitimer")

    def on_alarm(signum, frame):
        raise _Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "T, schedule",
    [
        pytest.param(10**15, "linear"),
        pytest.param(2**63, "linear"),
        pytest.param(2**64, "cosine"),
        pytest.param(10**12, "squaredcos_cap_v2"),
    ],
)
def test_huge_num_train_timesteps_is_refused(T, schedule):
    with _time_limit(1.0), pytest.raises(ValueError, match="num_train_timesteps"):
        SCHEDULER_CLASSES["DDPMScheduler"](num_train_timesteps=T, beta_schedule=schedule)


@pytest.mark.parametrize(
    "name, key, value",
    [
        *[
            ("DDPMScheduler", k, "0.5")
            for k in ("beta_start", "beta_end", "clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value")
        ],
        ("DPMSolverMultistepScheduler", "algorithm_type", ["dpmsolver++"]),
        ("DPMSolverMultistepScheduler", "solver_type", ["midpoint"]),
    ],
)
def test_wrongly_typed_option_errors_name_the_option(name, key, value):
    with pytest.raises((ValueError, TypeError), match=key):
        SCHEDULER_CLASSES[name](**{key: value})
