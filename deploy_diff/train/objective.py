"""The training objective: the denoising loss per prediction type, the float32 schedule tensors it noises
with (made from the runtime scheduler's float64 arrays, so training and sampling share one forward process),
and the learning-rate schedule. Used by :class:`~deploy_diff.train.trainer.Trainer` and
:class:`~deploy_diff.train.api.DiffusionTrainer`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..runtime.schedulers import DDPMScheduler
    from .config import TrainConfig

__all__ = ["diffusion_loss", "lr_at", "schedule_tensors"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay to
    ``lr * min_lr_ratio`` at ``cfg.steps`` (the schedule is defined over the run's total)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=0.1)  # huber


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    sqrt_abar: torch.Tensor,
    sqrt_one_minus_abar: torch.Tensor,
    prediction_type: str,
    loss_type: str,
    mixed_precision: str = "no",
) -> torch.Tensor:
    """The denoising loss of one batch: noise x0 to x_t with q(x_t | x_0) and regress the target of
    ``prediction_type`` (epsilon: the noise; v_prediction: sqrt(abar) eps - sqrt(1 - abar) x0; sample: x0).

    ``sqrt_abar`` / ``sqrt_one_minus_abar`` are float32[T] tensors made from the runtime scheduler's
    float64 ``alphas_cumprod`` (one source of truth with ``add_noise`` / ``get_velocity``).
    """
    a = sqrt_abar[t][:, None, None, None]
    s = sqrt_one_minus_abar[t][:, None, None, None]
    noisy = a * x0 + s * noise  # the runtime's add_noise
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = a * noise - s * x0  # the runtime's get_velocity
    else:
        target = x0
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    with torch.autocast(x0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred = model(noisy, t.float(), labels)
    return _loss(pred.float()[:, : x0.shape[1]], target, loss_type)


def schedule_tensors(noise_scheduler: DDPMScheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 sqrt(abar) and sqrt(1 - abar) on ``device`` from the runtime scheduler's float64 arrays."""
    abar = noise_scheduler.alphas_cumprod
    return (
        torch.tensor(np.sqrt(abar), dtype=torch.float32, device=device),
        torch.tensor(np.sqrt(1 - abar), dtype=torch.float32, device=device),
    )
