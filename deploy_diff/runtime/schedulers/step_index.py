"""The step index of the sigma-space schedulers (Euler, Euler ancestral, Heun, DPM-Solver, UniPC).

These schedulers keep diffusers' ``_step_index`` / ``_begin_index`` bookkeeping: the first ``step`` (or
``scale_model_input``) looks its timestep up in ``timesteps``, later calls advance by one, and a pipeline may
fix the start with ``set_begin_index`` (img2img). One rule decides the lookup for all five (see
:meth:`StepIndexMixin.index_for_timestep` and :meth:`StepIndexMixin._init_step_index`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

__all__ = ["StepIndexMixin"]


class StepIndexMixin:
    """diffusers' step-index rule, written once.

    * :meth:`index_for_timestep` is diffusers' lookup: where a timestep occurs more than once (Heun's
      interleaved timesteps, Karras timesteps that round to the same integer) the *second* occurrence is
      taken, so that a loop starting mid-schedule (img2img) does not skip a sigma.
    * The first step of a loop given ``timesteps[0]`` starts at index 0. This equals diffusers wherever
      ``timesteps[0]`` occurs once; where it repeats (a repeated first sigma), diffusers' lookup starts at
      index 1, skips the first sigma and fails with IndexError at the last step (see docs/parity.md).
    """

    #: its users are the sigma-space schedulers: they take log(sigma), so they refuse a schedule with sigma = 0 at
    #: t = 0, and they clamp a zero-SNR schedule's last alphas_cumprod to 2**-24 as diffusers' do (BaseScheduler)
    _needs_positive_sigma_min: ClassVar[bool] = True
    _clamps_zero_snr: ClassVar[bool] = True

    timesteps: np.ndarray
    _step_index: int | None
    _begin_index: int | None

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """Position of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``); the second occurrence
        where it occurs more than once. A float schedule compares in its own dtype, as torch does."""
        schedule = self.timesteps if schedule_timesteps is None else np.asarray(schedule_timesteps)
        t = np.asarray(timestep)
        if t.size != 1:
            raise ValueError(f"timestep must be a single value (one entry of scheduler.timesteps); got shape {t.shape}")
        t = t.reshape(())
        if schedule.dtype.kind == "f":
            t = t.astype(schedule.dtype)
        found = np.flatnonzero(schedule == t)
        if found.size == 0:
            shown = schedule.tolist() if schedule.size <= 20 else f"({schedule.size} values)"
            raise ValueError(f"timestep {t.item()!r} is not one of this scheduler's timesteps {shown}")
        return int(found[1] if found.size > 1 else found[0])

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        schedule = self.timesteps
        t = np.asarray(timestep)
        if schedule.size and t.size == 1:
            first = schedule[0]
            value = t.reshape(()).astype(schedule.dtype) if schedule.dtype.kind == "f" else t.reshape(())
            if value == first:  # the start of a loop (also where timesteps[0] repeats)
                self._step_index = 0
                return
        self._step_index = self.index_for_timestep(timestep)

    def _current_index(self, timestep: Any) -> int:
        """The step index for this call: looked up on the first call of a loop; refused past the last step."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        assert i is not None
        n = len(self.timesteps)
        if i >= n:
            raise ValueError(
                f"step() was called past the last of the {n} timesteps (all steps are done); call "
                "set_timesteps() again to start a new loop"
            )
        return i

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        """Schedule indices for ``add_noise`` at ``timesteps`` int/float[B], by diffusers' rule: each one looked
        up in ``timesteps`` unless a begin index was set (then the current step index once stepping started,
        e.g. inpainting, or the begin index before the first step, e.g. img2img)."""
        t = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(v) for v in t]
        start = self._step_index if self._step_index is not None else self._begin_index
        return [start] * t.shape[0]
