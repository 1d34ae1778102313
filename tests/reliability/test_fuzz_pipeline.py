"""Fuzzing ``Pipeline.__call__`` arguments (hypothesis): valid arguments (counts, step counts, seeds, guidance,
class labels, eta, output types, latents) give images of the right shape, dtype and range; a call with any invalid
argument is refused with ValueError / TypeError before the model runs (the runner counts its calls).

Each bug this fuzzing found has its own test after the random ones, named after what it checks (the comments
give the bug's label, e.g. S1 or M4). A newly found bug's signature goes into ``_reliability.KNOWN_BUGS`` while it is
open, pinned by a strict xfail, so the random tests keep looking for others; it is empty now.
"""

from __future__ import annotations

import numpy as np
import pytest
from _reliability import FUZZ, MAX_EXAMPLES, NOT_FINITE, CountingRunner, assert_clean_refusal
from hypothesis import event, given, settings
from hypothesis import strategies as st

from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.schedulers import SCHEDULER_NAMES


@pytest.fixture(scope="module")
def pipes(diffusers_bundle, cond_run_bundle):
    pipes = {"uncond": Pipeline.from_bundle(diffusers_bundle), "cond": Pipeline.from_bundle(cond_run_bundle)}
    assert not pipes["uncond"].model.conditional
    assert pipes["cond"].model.num_classes == 10 and pipes["cond"].model.null_class_label == 10
    return pipes


def _counting(base: Pipeline, scheduler=None) -> Pipeline:
    return Pipeline(CountingRunner(base.runner), base.model, base.scheduler_config, scheduler=scheduler)


def _text_not(*valid):
    return st.text(max_size=6).filter(lambda s: s not in valid)


NON_NUMBERS = st.text(max_size=3) | st.lists(st.floats(0, 2), min_size=1, max_size=2) | st.just(1j)
STEPS_INVALID = (
    st.integers(-5, 0)
    | st.integers(1001, 10**30)
    | st.floats(allow_nan=True)
    | st.text(max_size=3)
    | st.booleans()
    | st.none()
    | st.sampled_from([2**63, np.int64(0), np.int64(-3), np.uint64(5000)])
)
UINT64 = st.integers(0, 2**64 - 1)  # seeds >= 2**64: BUG P2


@st.composite
def pipeline_calls(draw, conditional: bool):
    """(scheduler, kwargs, names of invalid arguments): each argument valid (mostly) or invalid."""
    invalid = []

    def arg(name, valid, bad, p_bad=8):
        if draw(st.integers(0, p_bad - 1), label=f"{name} invalid?") == 0:
            invalid.append(name)
            return draw(bad, label=name)
        return draw(valid, label=name)

    names = sorted(SCHEDULER_NAMES)
    scheduler = arg(
        "scheduler",
        st.none() | st.sampled_from(names) | st.sampled_from(names).map(str.upper),
        _text_not(*names).filter(lambda s: s.lower() not in names) | st.integers(),
        p_bad=10,
    )
    n_ok = st.integers(1, 3)
    n = arg(
        "num_images",
        n_ok | n_ok.map(np.int64),
        st.integers(-3, 0) | st.floats() | st.text(max_size=3) | st.booleans() | st.none(),
        p_bad=10,
    )
    n_ctx = int(n) if "num_images" not in invalid else 1
    kw = {"num_images": n}
    # PNDM's Runge-Kutta warm-up (the default skip_prk_steps=False) needs 4 steps, as in diffusers
    low = 4 if isinstance(scheduler, str) and scheduler.lower() == "pndm" else 1
    kw["num_inference_steps"] = arg(
        "num_inference_steps", st.integers(low, low + 2) | st.integers(low, low + 2).map(np.int32), STEPS_INVALID
    )
    kw["seed"] = arg(
        "seed",
        st.none()
        | UINT64
        | st.lists(UINT64, min_size=n_ctx, max_size=n_ctx)
        | st.lists(st.integers(0, 2**32), min_size=n_ctx, max_size=n_ctx).map(tuple)
        | st.lists(UINT64, min_size=n_ctx, max_size=n_ctx).map(lambda s: np.array(s, np.uint64)),
        st.integers(max_value=-1)
        | st.floats(allow_nan=True)
        | st.text(max_size=3)
        | st.booleans()
        | st.lists(UINT64, max_size=5).filter(lambda s: len(s) != n_ctx)
        | st.lists(UINT64, min_size=n_ctx - 1, max_size=n_ctx - 1).flatmap(
            lambda s: (st.integers(max_value=-1) | st.floats() | st.text(max_size=2)).map(lambda bad: [*s, bad])
        ),
    )
    if conditional:
        kw["guidance_scale"] = arg(
            "guidance_scale",
            st.none() | st.floats(0, 20) | st.integers(0, 20),
            st.floats(max_value=-1e-6) | NOT_FINITE | NON_NUMBERS,
        )
        label = st.integers(0, 10)
        kw["class_labels"] = arg(
            "class_labels",
            st.none()
            | label
            | st.lists(label, min_size=n_ctx, max_size=n_ctx)
            | st.lists(label, min_size=n_ctx, max_size=n_ctx).map(lambda s: np.array(s, np.int64)),
            st.integers(max_value=-1)
            | st.integers(min_value=11)
            | st.floats()
            | st.text(max_size=3)
            | st.booleans()
            | st.lists(label, max_size=5).filter(lambda s: len(s) != n_ctx)
            | st.lists(st.integers(-3, 20), min_size=n_ctx, max_size=n_ctx).filter(lambda s: min(s) < 0 or max(s) > 10)
            | st.lists(label, min_size=1, max_size=2).map(lambda s: [s]),
        )
    else:
        kw["guidance_scale"] = arg(
            "guidance_scale", st.none(), st.floats(allow_nan=True) | st.integers() | NON_NUMBERS, p_bad=10
        )
        kw["class_labels"] = arg(
            "class_labels",
            st.none(),
            st.integers() | st.lists(st.integers(0, 9), max_size=3) | st.text(max_size=2),
            p_bad=10,
        )
    ddim = isinstance(scheduler, str) and scheduler.lower() == "ddim"
    kw["eta"] = arg(
        "eta",
        st.sampled_from([0.0, 0]) | (st.floats(0, 1) if ddim else st.nothing()),
        st.floats(max_value=-1e-9)
        | NOT_FINITE
        | st.none()
        | NON_NUMBERS
        | (st.nothing() if ddim else st.floats(1e-6, 1)),
    )
    outputs = ["np", "uint8", "pil", "latent"]
    kw["output_type"] = arg(
        "output_type", st.sampled_from(outputs), _text_not(*outputs) | st.none() | st.integers(), p_bad=10
    )
    shape = (n_ctx, 1, 8, 8)
    good_latents = st.tuples(st.integers(0, 2**16), st.sampled_from([np.float32, np.float64, np.float16])).map(
        lambda a: np.random.default_rng(a[0]).standard_normal(shape).astype(a[1])
    )
    bad_shapes = [(n_ctx + 1, 1, 8, 8), (n_ctx, 1, 8), (n_ctx, 3, 8, 8), (n_ctx, 1, 4, 4), (), (n_ctx, 1, 8, 8, 1)]
    kw["latents"] = arg(
        "latents",
        st.none() | good_latents | good_latents.map(np.ndarray.tolist),
        st.sampled_from(bad_shapes).map(lambda s: np.zeros(s, np.float32))
        | st.sampled_from([np.int32, np.bool_, np.complex64, object]).map(lambda d: np.zeros(shape, d))
        | st.text(max_size=3)
        | st.just(0.0),
    )
    return scheduler, kw, invalid


def _check_images(out, output_type, n, model):
    h, w = model.sample_size
    c = model.in_channels
    if output_type == "pil":
        assert isinstance(out, list) and len(out) == n and all(im.size == (w, h) for im in out)
        return
    expected = {
        "np": ((n, h, w, c), np.float32),
        "uint8": ((n, h, w, c), np.uint8),
        "latent": ((n, c, h, w), np.float32),
    }[output_type]
    assert isinstance(out, np.ndarray) and (out.shape, out.dtype) == expected, (out.shape, out.dtype, expected)
    assert np.isfinite(out).all()
    if output_type == "np":
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_random_pipeline_arguments(pipes, kind):
    """Valid arguments give images; any invalid one is refused with ValueError/TypeError before the model runs."""
    base = pipes[kind]

    @settings(FUZZ, max_examples=2 * MAX_EXAMPLES)
    @given(call=pipeline_calls(kind == "cond"))
    def check(call):
        scheduler, kw, invalid = call
        pipe = None
        try:
            pipe = _counting(base, scheduler)
            out = pipe(**kw)
        except Exception as e:  # noqa: BLE001 - classifying every exception is the point
            if not invalid:
                raise AssertionError(f"valid call refused: scheduler={scheduler!r}, {kw}: {e!r}") from e
            assert_clean_refusal(e, f"scheduler={scheduler!r}, {kw}")
            calls = pipe.runner.calls if pipe is not None else 0
            assert calls == 0, f"{invalid} refused only after {calls} model calls: {e}"
            return
        assert not invalid, f"invalid {invalid} accepted: scheduler={scheduler!r}, {kw}"
        event(f"sampled with {scheduler}")
        _check_images(out, kw["output_type"], int(kw["num_images"]), base.model)

    check()


@pytest.mark.parametrize("scheduler", [None, *sorted(SCHEDULER_NAMES)])
@pytest.mark.parametrize("steps", [0, -1, 1001, 10**6, 10**30])
def test_out_of_range_step_counts_are_refused_before_any_work(pipes, scheduler, steps):
    pipe = _counting(pipes["cond"], scheduler)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_images=2, num_inference_steps=steps, seed=0, class_labels=3, guidance_scale=2.0)
    assert pipe.runner.calls == 0


# -- bugs found (pipeline) -----------------------------------------------------------------------------------------
def test_huge_num_images_is_refused_before_any_work(pipes):
    pipe = _counting(pipes["uncond"])
    with pytest.raises(ValueError, match="num_images"):
        pipe(num_images=10**13, num_inference_steps=1, seed=0)
    assert pipe.runner.calls == 0


@pytest.mark.parametrize("seed", [2**64, 2**70, [0, 2**64]], ids=["2**64", "2**70", "list"])
def test_seeds_beyond_64_bits_are_refused(pipes, seed):
    with pytest.raises(ValueError, match="seed"):
        pipes["uncond"](num_images=2, num_inference_steps=1, seed=seed)


@pytest.mark.parametrize(
    "name, value",
    [
        ("eta", "x"),
        ("eta", [0.0]),
        ("eta", np.zeros(2)),
        ("eta", 1j),
        ("guidance_scale", "x"),
        ("guidance_scale", [2.0]),
        ("guidance_scale", np.ones(2)),
        ("guidance_scale", 1j),
    ],
)
def test_wrongly_typed_eta_and_guidance_errors_name_the_argument(pipes, name, value):
    with pytest.raises((ValueError, TypeError), match=name):
        pipes["cond"](num_inference_steps=1, seed=0, **{name: value})


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_latents_are_refused_with_value_error(pipes, value):
    latents = np.zeros((1, 1, 8, 8), np.float32)
    latents[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="latents"):
        pipes["uncond"](num_inference_steps=1, seed=0, latents=latents)
