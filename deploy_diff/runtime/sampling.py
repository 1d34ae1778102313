"""The one sampling loop: any runner, any scheduler, classifier-free guidance, diffusers' noise order.

A *runner* is any callable ``runner(sample float32[B, C, H, W], timestep float32[B],
class_labels int64[B] | None) -> float32[B, C_out, H, W]`` (C_out = C, or 2C for a learned variance): the
ONNX Runtime and TensorRT backends, and the torch runner of the training side. Nothing else samples, so
guidance and noise handling are written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .arguments import (
    check_class_labels,
    check_eta,
    check_guidance_scale,
    check_num_inference_steps,
    step_parameters,
)
from .rng import randn_tensor

__all__ = ["NonFiniteError", "sample"]

Runner = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


class NonFiniteError(FloatingPointError, ValueError):
    """A model output or a sample became NaN or infinite (fp16 overflow is the usual cause), or given latents
    hold NaN/inf (then it is bad input, hence also a ValueError)."""


def _check_finite(x: np.ndarray, what: str, step: int, t: Any) -> None:
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise NonFiniteError(
            f"{what} has {bad} non-finite value(s) at step {step} (timestep {t}); "
            "sampling stopped (an fp16 overflow or a broken model are the usual causes)"
        )


def sample(
    runner: Runner,
    scheduler: Any,
    shape: Sequence[int],
    num_inference_steps: int = 50,
    generator=None,
    guidance_scale: float | None = None,
    class_labels: Any = None,
    null_class_label: int | None = None,
    eta: float = 0.0,
    latents: np.ndarray | None = None,
    callback: Callable[[int, Any, np.ndarray], Any] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Run the reverse process; return the final sample float32[B, C, H, W].

    Args:
        runner: the model (see the module docstring).
        scheduler: any scheduler of ``deploy_diff.runtime.schedulers`` (or anything with their interface).
        shape: (B, C, H, W) of the sample.
        num_inference_steps: an int in [1, the scheduler's ``num_train_timesteps``], passed to
            ``scheduler.set_timesteps``.
        generator: ``TorchGenerator`` (diffusers' noise for the same seed), ``numpy.random.Generator``, or a
            list with one per image; draws the initial latents, then the per-step noise of stochastic
            schedulers, in diffusers' order.
        guidance_scale: classifier-free guidance weight; needs ``null_class_label``. ``None`` or 1 runs the
            conditional model alone; otherwise the conditional and null-label halves go through the runner
            in one batch and ``out = uncond + g * (cond - uncond)``.
        class_labels: int64[B] or one int for a class-conditional model. ``None`` with a
            ``null_class_label`` samples unconditionally through the null label.
        null_class_label: the model's "no class" label (models trained with label dropout), else None.
        eta: DDIM's noise weight (>= 0); an error for schedulers without one unless 0.
        latents: float32[B, C, H, W] starting noise instead of drawing it; multiplied by the scheduler's
            ``init_noise_sigma`` like drawn latents.
        callback: called as ``callback(step_index, timestep, sample)`` after every step.
        progress: show a tqdm progress bar (when tqdm is installed).

    Every argument is checked (by the rules of :mod:`.arguments`) before the model is called; a bad one raises
    ``ValueError`` naming it. The step count's range is checked by ``scheduler.set_timesteps``, which runs before
    the first model call.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be (B, C, H, W) with positive sizes; got {shape}")
    batch, channels = shape[0], shape[1]

    # -- arguments (their rules live in .arguments) ------------------------------------------------------
    guidance_scale = check_guidance_scale(guidance_scale, null_class_label)
    labels = check_class_labels(class_labels, batch, null_class_label=null_class_label)
    eta = check_eta(eta, scheduler)
    num_inference_steps = check_num_inference_steps(num_inference_steps)
    use_cfg = guidance_scale is not None and guidance_scale != 1.0 and labels is not None
    if use_cfg:
        assert labels is not None and null_class_label is not None
        model_labels = np.concatenate([labels, np.full((batch,), int(null_class_label), dtype=np.int64)])
    else:
        model_labels = labels

    step_params = step_parameters(scheduler)
    step_kwargs: dict[str, Any] = {}
    if "eta" in step_params:
        step_kwargs["eta"] = eta
    if "generator" in step_params:
        step_kwargs["generator"] = generator

    # -- latents: set_timesteps first (init_noise_sigma of Euler-type schedulers depends on it) ---------
    scheduler.set_timesteps(num_inference_steps)
    if latents is None:
        x = randn_tensor(shape, generator=generator, dtype=np.float32)
    else:
        x = np.asarray(latents)
        if x.shape != shape:
            raise ValueError(f"latents have shape {x.shape}; expected {shape}")
        if x.dtype.kind != "f":
            raise ValueError(f"latents must be floating point; got dtype {x.dtype}")
        x = x.astype(np.float32)
        _check_finite(x, "latents", 0, "start")
    sigma0 = float(scheduler.init_noise_sigma)
    if sigma0 != 1.0:
        x = x * np.float32(sigma0)

    timesteps = np.asarray(scheduler.timesteps)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(timesteps), desc="sampling", unit="step")
        except ImportError:
            bar = None
    model_batch = 2 * batch if use_cfg else batch
    try:
        for i, t in enumerate(timesteps):
            x_in = scheduler.scale_model_input(x, t)
            if use_cfg:
                x_in = np.concatenate([x_in, x_in])
            t_in = np.full((model_batch,), t, dtype=np.float32)
            out = np.asarray(runner(x_in, t_in, model_labels))
            if (
                out.ndim != 4
                or out.shape[0] != model_batch
                or out.shape[2:] != shape[2:]
                or out.shape[1] not in (channels, 2 * channels)
            ):
                raise ValueError(
                    f"runner returned shape {out.shape}; expected ({model_batch}, {channels} or "
                    f"{2 * channels}, {shape[2]}, {shape[3]})"
                )
            _check_finite(out, "model output", i, t)
            if out.dtype != np.float32:
                out = out.astype(np.float32)
            if use_cfg:
                cond, uncond = out[:batch], out[batch:]
                g = np.float32(guidance_scale)
                guided = uncond[:, :channels] + g * (cond[:, :channels] - uncond[:, :channels])
                # a learned variance (channels C..2C) is taken from the conditional half
                out = guided if out.shape[1] == channels else np.concatenate([guided, cond[:, channels:]], axis=1)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
            _check_finite(x, "sample", i, t)
            if callback is not None:
                callback(i, t, x)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return x
