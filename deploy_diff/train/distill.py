"""Distil a trained run into a few-step sampler: the student is an ordinary run folder that ``deploy-diff export``
and the runtime take unchanged, and its ``scheduler_config.json`` is the few-step sampler.

Two methods, both starting from the teacher's EMA weights (see docs/benchmarks.md#distillation for the
measurements behind the default and the settings):

- ``"progressive"`` (the default) -- progressive distillation (Salimans & Ho 2022): rounds that halve the step
  count, from ``target_steps * 2**rounds`` DDIM steps down to ``target_steps``; in each round a v-prediction
  student matches two DDIM steps of its teacher (the original teacher, then the previous round's student) with
  one, and each round has its own warmup and cosine learning-rate schedule. Sampled by DDIM
  (``timestep_spacing="trailing"``, whose grids nest when halving) at ``target_steps``: its bundle samples in
  ``target_steps`` evaluations by default; other step counts are off the trained grid.
- ``"consistency"`` -- latent-consistency-model style consistency distillation (Song et al. 2023; Luo et al.
  2023). Timesteps live on the skipping grid of ``LCMScheduler`` (``original_inference_steps`` points,
  ``k = T / original_inference_steps`` apart). For x_t on the grid the teacher takes one DDIM step to t - k; the
  student's consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) at (x_t, t) regresses the EMA
  student's at (x_{t-k}, t - k). c_skip, c_out and the grid are the runtime ``LCMScheduler``'s own, which samples
  the one student in any number of steps from 1 to ``original_inference_steps``. The student predicts x0.

Class-conditional teachers give class-conditional students: labels are drawn with the teacher's label dropout,
so the null label is distilled too and classifier-free guidance works on the student as on the teacher.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime._fileio import sha256_file
from ..runtime.schedulers.sigmas import spaced_timesteps
from .checkpoint import CheckpointError, find_checkpoint
from .objective import lr_at
from .trainer import Trainer
from .unet import UNet

__all__ = ["DEFAULT_METHOD", "METHODS", "Distiller", "ddim_step", "distill", "progressive_v_target", "x0_and_eps"]

METHODS = ("consistency", "progressive")
DEFAULT_METHOD = "progressive"
#: what the student predicts, per method (measured on digits: docs/benchmarks.md#distillation). Progressive: v, whose
#: x0 = sqrt(abar) x - sqrt(1 - abar) v stays well conditioned where epsilon's does not; consistency: x0 itself (the
#: consistency function is an x0 estimate; a v student leaks noise into it at mid noise levels)
STUDENT_PREDICTION_TYPES = {"progressive": "v_prediction", "consistency": "sample"}
#: optimizer steps in total when ``steps`` is not given (the default digits run distils in ~6 min on 2 cores)
DEFAULT_STEPS = {"consistency": 2000, "progressive": 3000}
#: per-method optimizer settings (the teacher's others carry over)
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "consistency": {"lr": 5e-4, "warmup_steps": 50, "ema_decay": 0.95, "min_lr_ratio": 0.1},
    "progressive": {"lr": 5e-4, "warmup_steps": 20, "ema_decay": 0.99, "min_lr_ratio": 0.1},
}
ORIGINAL_INFERENCE_STEPS = 50  # the consistency grid: LCMScheduler's default skipping grid
PROGRESSIVE_ROUNDS = 4  # target_steps * 16 -> ... -> target_steps


def x0_and_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, prediction_type: str):
    """(x0, epsilon) of a model output of ``prediction_type`` at x_t = a x0 + s eps (a, s broadcastable)."""
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x - s * out, a * out + s * x
    x0 = out
    return x0, (x - a * x0) / s.clamp_min(1e-12)


def ddim_step(out, x, a, s, a_next, s_next, prediction_type: str) -> torch.Tensor:
    """One deterministic DDIM step x_t -> x_next = a_next x0 + s_next eps (the runtime DDIMScheduler's, eta 0)."""
    x0, eps = x0_and_eps(out, x, a, s, prediction_type)
    return a_next * x0 + s_next * eps


def progressive_v_target(x_t, x_next, a, s, a_next, s_next) -> torch.Tensor:
    """The v whose single DDIM step from x_t lands on x_next (Salimans & Ho 2022, eq. 8, then v of that x0)."""
    ratio = s_next / s
    x0 = (x_next - ratio * x_t) / (a_next - ratio * a)
    eps = (x_t - a * x0) / s
    return a * eps - s * x0


class Distiller(Trainer):
    """Train a few-step student of the run in ``teacher_dir`` into ``out_dir`` (see the module docstring).

    Checkpoints, resume, SIGTERM/Ctrl-C, metrics, the loss plot and sample grids are the :class:`Trainer`'s; the
    checkpoint's ``config.json`` adds ``distill`` (method, teacher path and weights sha256, target steps) and
    ``sampling`` (``default_inference_steps``, ``max_inference_steps``, which export writes into the manifest).
    """

    def __init__(
        self,
        teacher_dir: str | Path,
        out_dir: str | Path,
        *,
        method: str | None = None,
        steps: int | None = None,
        target_steps: int = 4,
        resume: bool = False,
        progress: bool = True,
        save_every: int = 500,
        log: Callable[[str], None] | None = None,
    ):
        if method is not None and method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}; got {method!r}")
        if isinstance(target_steps, bool) or not isinstance(target_steps, int) or target_steps < 1:
            raise ValueError(f"target_steps must be an int >= 1; got {target_steps!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an int >= 1 (optimizer steps in total); got {steps!r}")
        teacher_dir = Path(teacher_dir)
        try:
            teacher = find_checkpoint(teacher_dir)
        except CheckpointError as e:
            raise CheckpointError(f"the teacher must be a training run folder: {e}") from None
        teacher_sha = sha256_file(teacher.path / "ema.safetensors")
        if teacher.meta.get("distill"):
            raise ValueError(
                f"{teacher_dir} is itself a distilled run ({teacher.meta['distill'].get('method')}); distil the "
                "original teacher instead"
            )
        if resume:
            saved = find_checkpoint(out_dir)  # CheckpointError names what is missing
            info = saved.meta.get("distill")
            if not isinstance(info, dict):
                raise ValueError(f"resume=True: {out_dir} is a training run, not a distillation run")
            if info.get("teacher_sha256") != teacher_sha:
                raise ValueError(
                    f"resume=True: {out_dir} was distilled from a teacher with weights sha256 "
                    f"{info.get('teacher_sha256')}, but {teacher_dir} has {teacher_sha}; pass the same teacher"
                )
            if method is not None and method != info.get("method"):
                raise ValueError(
                    f"resume=True: {out_dir} was distilled with method={info.get('method')!r}, not {method!r}"
                )
            if target_steps != info.get("target_steps"):
                raise ValueError(
                    f"resume=True: {out_dir} was distilled with target_steps={info.get('target_steps')}, not "
                    f"{target_steps}"
                )
            method = info["method"]
            steps = steps if steps is not None else saved.train_config.steps
        method = method or DEFAULT_METHOD
        if method == "progressive" and steps is not None and steps < PROGRESSIVE_ROUNDS:
            raise ValueError(f"progressive distillation runs {PROGRESSIVE_ROUNDS} rounds: steps must be >= 4")
        self.method = method
        self.target_steps = target_steps
        self.teacher_info = {
            "method": method,
            "teacher": str(teacher_dir.resolve()),
            "teacher_sha256": teacher_sha,
            "teacher_step": teacher.step,
            "teacher_prediction_type": teacher.train_config.prediction_type,
            "target_steps": target_steps,
        }
        tcfg = teacher.train_config
        student_cfg = dataclasses.replace(
            tcfg,
            **METHOD_SETTINGS[method],
            steps=steps or DEFAULT_STEPS[method],
            prediction_type=STUDENT_PREDICTION_TYPES[method],
            sample_steps=target_steps,
            sample_every=500,
            save_every=save_every,
            mixed_precision="no",
        )
        super().__init__(teacher.model_config, student_cfg, out_dir, resume=resume, progress=progress, log=log)
        self.teacher = UNet(teacher.model_config).to(self.device).eval().requires_grad_(False)
        self.teacher.load_state_dict(teacher.ema_state)
        self.teacher_prediction_type = tcfg.prediction_type
        if self.ckpt is None:  # a new student starts from the teacher's EMA weights
            self.model.load_state_dict(teacher.ema_state)
            self.ema.load_state_dict(teacher.ema_state)
        T = self.cfg.num_train_timesteps
        if method == "consistency":
            from ..runtime.schedulers import LCMScheduler

            self.lcm = LCMScheduler.from_config(self.scheduler_config())
            self.grid = torch.as_tensor(np.sort(self.lcm.origin_timesteps()), dtype=torch.long)
            self.skip = T // ORIGINAL_INFERENCE_STEPS
            scalings = [self.lcm.get_scalings_for_boundary_condition_discrete(t) for t in range(T)]
            self.c_skip = torch.tensor([c for c, _ in scalings], dtype=torch.float32, device=self.device)
            self.c_out = torch.tensor([c for _, c in scalings], dtype=torch.float32, device=self.device)
        else:
            self.round_teacher: UNet | None = None  # the previous round's student (rounds after the first)
            if self.ckpt is not None:
                self._restore_round_teacher()

    # -- what the run folder says --------------------------------------------------------------------------
    def scheduler_config(self) -> dict[str, Any]:
        base = {
            key: self.noise_scheduler.config[key]
            for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        }
        base["rescale_betas_zero_snr"] = self.cfg.rescale_betas_zero_snr
        common = {"prediction_type": self.cfg.prediction_type, "clip_sample": False, "set_alpha_to_one": True}
        if self.method == "consistency":
            return {
                "_class_name": "LCMScheduler",
                **base,
                **common,
                "original_inference_steps": ORIGINAL_INFERENCE_STEPS,
                "timestep_spacing": "leading",
                "steps_offset": 0,
            }
        return {"_class_name": "DDIMScheduler", **base, **common, "timestep_spacing": "trailing", "steps_offset": 0}

    def sampling_defaults(self) -> dict[str, int | None]:
        return {
            "default_inference_steps": self.target_steps,
            "max_inference_steps": ORIGINAL_INFERENCE_STEPS if self.method == "consistency" else None,
        }

    def sampler(self) -> tuple[Any, int]:
        from ..runtime.schedulers import load_scheduler

        return load_scheduler(self.scheduler_config()), self.target_steps

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "distill": self.teacher_info, "sampling": self.sampling_defaults()}

    # -- progressive rounds --------------------------------------------------------------------------------
    @property
    def steps_per_round(self) -> int:
        return max(1, self.cfg.steps // PROGRESSIVE_ROUNDS)

    def _round(self, step: int) -> int:
        return min(PROGRESSIVE_ROUNDS - 1, step // self.steps_per_round)

    def _trainer_state(self) -> dict[str, Any]:
        state = super()._trainer_state()
        if self.method == "progressive" and self.round_teacher is not None:
            state["round_teacher"] = self.round_teacher.state_dict()
        return state

    def _restore_round_teacher(self) -> None:
        from .checkpoint import read_trainer_state

        saved = read_trainer_state(self.ckpt).get("round_teacher")
        if self._round(max(self.step - 1, 0)) == 0:
            return  # still in (or at the end of) the first round: the teacher is the original one
        if saved is None:
            raise CheckpointError(f"{self.ckpt.path}: a progressive run past round 1 must hold its round teacher")
        self.round_teacher = copy.deepcopy(self.teacher)
        self.round_teacher.load_state_dict(saved)

    def learning_rate(self, step: int) -> float:
        """Consistency: warmup and cosine decay over the run. Progressive: the same within each round (every round
        trains a new student from the previous one and needs the full rate, the last round most of all)."""
        if self.method != "progressive":
            return super().learning_rate(step)
        per_round = dataclasses.replace(self.cfg, steps=self.steps_per_round)
        return lr_at(step - self._round(step) * self.steps_per_round, per_round)

    def _start_round_if_due(self) -> None:
        if self.step == 0 or self.step % self.steps_per_round or self._round(self.step) == self._round(self.step - 1):
            return
        # a new round: the student so far (its EMA) becomes the teacher, and the student starts from it
        self.round_teacher = copy.deepcopy(self.ema).eval().requires_grad_(False)
        self.model.load_state_dict(self.ema.state_dict())

    # -- the objectives ------------------------------------------------------------------------------------
    def _draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of real images and (conditional models) labels with the teacher's label dropout."""
        cfg, g = self.cfg, self.gen
        idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=g)
        x0 = self.data.images[idx]
        if cfg.hflip:
            from .data import random_flip

            x0 = random_flip(x0, g)
        labels = None
        if self.model_config.num_classes:
            labels = self.data.labels[idx].clone()
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
            labels[drop] = self.model_config.num_classes
            labels = labels.to(self.device)
        return x0.to(self.device), labels

    def _ab(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) as [B, 1, 1, 1]; t = -1 means the clean image (1, 0)."""
        valid = t >= 0
        idx = t.clamp_min(0)
        a = torch.where(valid, self.sqrt_abar[idx], torch.ones_like(self.sqrt_abar[idx]))
        s = torch.where(valid, self.sqrt_one_minus_abar[idx], torch.zeros_like(self.sqrt_abar[idx]))
        return a[:, None, None, None], s[:, None, None, None]

    def _teacher_step(self, model, pt: str, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, labels):
        """One deterministic DDIM step x_t -> x_{t_next} of ``model`` (prediction type ``pt``)."""
        return ddim_step(model(x, t.float(), labels), x, *self._ab(t), *self._ab(t_next), pt)

    def compute_loss(self) -> torch.Tensor:
        if self.method == "consistency":
            return self._consistency_loss()
        return self._progressive_loss()

    def _consistency_loss(self) -> torch.Tensor:
        g = self.gen
        x0, labels = self._draw()
        n = torch.randint(0, len(self.grid), (x0.shape[0],), generator=g)
        t = self.grid[n].to(self.device)
        t_prev = (t - self.skip).clamp_min(0)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        a, s = self._ab(t)
        x_t = a * x0 + s * noise
        model = self.ddp or self.model
        with torch.no_grad():
            x_prev = self._teacher_step(self.teacher, self.teacher_prediction_type, x_t, t, t_prev, labels)
            target = self._consistency(self.ema, x_prev, t_prev, labels)
        pred = self._consistency(model, x_t, t, labels)
        return F.mse_loss(pred, target)

    def consistency_function(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0 for the student's output ``out`` at (x, t): exactly what
        ``LCMScheduler.step`` returns as ``denoised`` for that model output."""
        a, s = self._ab(t)
        x0 = x0_and_eps(out, x, a, s, self.cfg.prediction_type)[0]
        return self.c_skip[t][:, None, None, None] * x + self.c_out[t][:, None, None, None] * x0

    def _consistency(self, model, x: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
        return self.consistency_function(model(x, t.float(), labels), x, t)

    def _progressive_loss(self) -> torch.Tensor:
        g = self.gen
        r = self._round(self.step)
        n_student = self.target_steps * 2 ** (PROGRESSIVE_ROUNDS - 1 - r)
        T = self.cfg.num_train_timesteps
        ts_student = torch.as_tensor(spaced_timesteps(T, n_student, "trailing", 0)[:n_student].copy())
        ts_teacher = torch.as_tensor(spaced_timesteps(T, 2 * n_student, "trailing", 0)[: 2 * n_student].copy())
        x0, labels = self._draw()
        i = torch.randint(0, n_student, (x0.shape[0],), generator=g)
        t = ts_student[i].to(self.device)
        t_mid = ts_teacher[2 * i + 1].to(self.device)
        t_next = torch.where(i + 1 < n_student, ts_student[(i + 1).clamp_max(n_student - 1)], -1).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        a, s = self._ab(t)
        x_t = a * x0 + s * noise
        teacher, pt = (
            (self.teacher, self.teacher_prediction_type) if r == 0 else (self.round_teacher, self.cfg.prediction_type)
        )
        with torch.no_grad():
            x_mid = self._teacher_step(teacher, pt, x_t, t, t_mid, labels)
            x_next = self._teacher_step(teacher, pt, x_mid, t_mid, t_next, labels)
            v_target = progressive_v_target(x_t, x_next, a, s, *self._ab(t_next))
        pred = (self.ddp or self.model)(x_t, t.float(), labels)
        return F.mse_loss(pred, v_target)

    def train_step(self) -> float:
        if self.method == "progressive":
            self._start_round_if_due()
        return super().train_step()


def distill(
    teacher_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str | None = None,
    steps: int | None = None,
    target_steps: int = 4,
    resume: bool = False,
    progress: bool = True,
    save_every: int = 500,
) -> dict[str, Any]:
    """Distil the run in ``teacher_dir`` into a few-step student run in ``out_dir``; return the final metrics
    (``step``, ``seconds``, ``interrupted``, ``final_loss``, ``method``, ``default_inference_steps``).

    ``method``: ``"progressive"`` (default) or ``"consistency"``; ``steps``: optimizer steps in total (default
    :data:`DEFAULT_STEPS`); ``target_steps``: the student's default number of model evaluations; ``resume``
    continues the run in ``out_dir`` (refused for another teacher, method or target); ``save_every``: checkpoint
    interval in optimizer steps (0: only at the end). See ``deploy-diff distill``.
    """
    distiller = Distiller(
        teacher_dir,
        out_dir,
        method=method,
        steps=steps,
        target_steps=target_steps,
        resume=resume,
        progress=progress,
        save_every=save_every,
    )
    result = distiller.train()
    return {**result, "method": distiller.method, **distiller.sampling_defaults()}
