"""The sampling arguments' rules, each written once.

Every public entry point (:func:`deploy_diff.runtime.sampling.sample`, ``Pipeline.__call__``, the CLI) checks its
arguments with these functions; runners and inner helpers take their results as given and check only array
structure. Each function returns the value in the form the caller uses (a Python ``int``, a ``float``, an int64
array) and raises ``ValueError`` (``TypeError`` for a seed that is not an int) with a message that names the library
argument (``class_labels``, ``num_inference_steps``, ``eta``, ...), never a CLI flag: the CLI maps its flags.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

__all__ = [
    "check_class_labels",
    "check_eta",
    "check_guidance_scale",
    "check_num_images",
    "check_num_inference_steps",
    "check_seeds",
    "is_int",
    "is_real",
    "step_parameters",
]

_INT64_MAX = np.iinfo(np.int64).max
SEED_LIMIT = 2**64  # torch.Generator.manual_seed's range: larger seeds would alias smaller ones


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, bools excluded."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A Python or NumPy int or float, bools excluded (complex numbers, strings and arrays are not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_num_images(num_images: Any) -> int:
    """``num_images``: a positive int."""
    if not is_int(num_images) or num_images < 1:
        raise ValueError(f"num_images must be a positive int; got {num_images!r}")
    return int(num_images)


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int | None = None) -> int:
    """``num_inference_steps``: an int >= 1 and, when the scheduler's ``num_train_timesteps`` is given, at most that
    (a schedule cannot have more distinct steps than the model was trained on).

    Without ``num_train_timesteps`` an int below 1 is "not a positive int"; with it, any int outside
    ``[1, num_train_timesteps]`` is named with that range (what ``set_timesteps`` says)."""
    if not is_int(num_inference_steps):
        raise ValueError(f"num_inference_steps must be a positive int; got {num_inference_steps!r}")
    if num_train_timesteps is not None and not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is outside [1, num_train_timesteps="
            f"{num_train_timesteps}]: the model was trained on {num_train_timesteps} timesteps"
        )
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int; got {num_inference_steps!r}")
    return int(num_inference_steps)


def step_parameters(scheduler: Any) -> set[str]:
    """The keyword names ``scheduler.step`` takes (``eta``, ``generator``, ...)."""
    return set(inspect.signature(scheduler.step).parameters)


def check_eta(eta: Any, scheduler: Any = None) -> float:
    """``eta`` (DDIM's noise weight): a finite number >= 0. With ``scheduler``, a non-zero ``eta`` also needs a
    scheduler whose ``step`` takes one (only DDIM does): elsewhere it would be silently ignored."""
    if isinstance(eta, np.ndarray) and eta.ndim == 0 and eta.dtype.kind in "iuf":
        eta = eta.item()  # a 0-d array holding one number (what numpy reductions return) is that number
    if not is_real(eta) or not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0; got {eta!r}")
    if scheduler is not None and eta != 0 and "eta" not in step_parameters(scheduler):
        raise ValueError(f"eta={eta} is only used by DDIM; {type(scheduler).__name__} has no eta")
    return float(eta)


def check_guidance_scale(
    guidance_scale: Any, null_class_label: int | None, conditional: bool | None = None
) -> float | None:
    """``guidance_scale``: None, or a finite number >= 0 for a model with a null class label (classifier-free
    guidance runs the model with the null label for the unconditional half). ``conditional``: whether the model
    is class-conditional, when the caller knows it (it makes the message precise)."""
    if guidance_scale is None:
        return None
    if not is_real(guidance_scale) or not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 or None; got {guidance_scale!r}")
    if conditional is False:
        raise ValueError(
            "guidance_scale needs a class-conditional model trained with label dropout; this model is "
            "unconditional, so pass guidance_scale=None"
        )
    if null_class_label is None:
        model = "this class-conditional model" if conditional else "this model"
        raise ValueError(
            f"guidance_scale needs a null class label (a model trained with label dropout); {model} has "
            "no null label (diffusers' class-conditional UNets have none), so classifier-free guidance "
            "is unavailable: pass guidance_scale=None"
        )
    return float(guidance_scale)


def check_class_labels(
    class_labels: Any,
    batch: int,
    *,
    null_class_label: int | None = None,
    num_classes: int | None = None,
    conditional: bool | None = None,
    where: str | None = None,
) -> np.ndarray | None:
    """``class_labels`` -> the int64[batch] labels the model gets, or None for a model without labels.

    ``class_labels``: one int (every image), one int per image, or None: then the ``null_class_label`` for every
    image (unconditional sampling through the null label) when there is one. Labels are integers >= 0 (whole numbers
    stored as floats, and a [batch, 1] column, are taken as those integers), and at most
    ``num_classes - 1`` (or the null label, when it is ``num_classes``) when ``num_classes`` is given.
    ``conditional``: whether the model takes labels at all, when the caller knows it (None: it is not checked).
    ``where`` names the batch in messages (default ``"a batch of {batch}"``).
    """
    if conditional is False:
        if class_labels is not None:
            raise ValueError("this model is unconditional: class_labels must be None")
        return None
    if class_labels is None:
        if null_class_label is not None:
            return np.full((batch,), int(null_class_label), dtype=np.int64)
        if conditional:
            classes = f" (0..{num_classes - 1})" if num_classes else ""
            raise ValueError(
                f"this class-conditional model has no null label: pass class_labels{classes}, one per image or one int"
            )
        return None
    labels = np.asarray(class_labels)
    if labels.ndim > 1 and labels.size == labels.shape[0]:
        labels = labels.reshape(-1)  # one label per row, e.g. a [B, 1] column
    whole = labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(np.mod(labels, 1) == 0)
    if whole and labels.size and np.all(np.abs(labels) < 2.0**62):
        labels = labels.astype(np.int64)  # whole numbers stored as floats (3.0) are the labels they spell
    if labels.dtype.kind not in "iu" or labels.ndim > 1:
        raise ValueError(
            f"class_labels must be integers: an int or a list of ints, one per image; got {class_labels!r:.200}"
        )
    if labels.ndim == 1 and labels.shape[0] != batch:
        where = where or f"a batch of {batch}"
        raise ValueError(f"got {labels.shape[0]} class_labels for {where}; pass one label per image or a single int")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if num_classes is not None:
            top = num_classes if null_class_label == num_classes else num_classes - 1
            if low < 0 or high > top:
                null = f" (or {null_class_label}, the null label)" if null_class_label is not None else ""
                raise ValueError(f"class_labels must lie in 0..{num_classes - 1}{null}; got {labels.tolist()}")
        elif low < 0 or high > _INT64_MAX:
            raise ValueError(f"class_labels must be >= 0 (and fit int64); got {labels.tolist()}")
    return np.broadcast_to(labels.astype(np.int64), (batch,)).copy()


def _seed(seed: Any, what: str) -> int:
    if not is_int(seed):
        raise TypeError(f"{what} must be an int (or a list of ints, one per image); got {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{what} must lie in [0, 2**64); got {seed}")
    return int(seed)


def check_seeds(seed: Any, num_images: int) -> int | list[int] | None:
    """``seed``: None (a random seed), one int in [0, 2**64) for the batch, or a sequence of ``num_images`` such ints
    (one generator per image). Returns None, an int or a list of ints."""
    if seed is None:
        return None
    if isinstance(seed, np.ndarray) and seed.ndim == 0:
        seed = seed[()]
    if isinstance(seed, (list, tuple, np.ndarray)):
        seeds = [_seed(s, "each seed") for s in seed]
        if len(seeds) != num_images:
            raise ValueError(f"got {len(seeds)} seeds for num_images={num_images}; pass one int or one seed per image")
        return seeds
    return _seed(seed, "seed")
