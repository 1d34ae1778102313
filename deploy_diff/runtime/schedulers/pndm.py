"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

F-PNDM starts with three pseudo Runge-Kutta steps (PRK, four model calls each) and continues with pseudo linear
multistep steps (PLMS, one call each, Adams-Bashforth over the last four model outputs). With
``skip_prk_steps=True`` (what Stable Diffusion's configs ship) PLMS runs alone and starts with a second-order
step that evaluates the model twice at the first interval (crowsonkb's PLMS sampler), hence the repeated
second timestep. Every step moves the sample with the transfer of eq. (9) of the paper, a DDIM step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import BaseScheduler, SchedulerOutput, check_choice, register_to_config

#: diffusers' PNDM converts v to epsilon and refuses everything else
PNDM_PREDICTION_TYPES = ("epsilon", "v_prediction")

#: Adams-Bashforth weights of the PLMS combination by the number of stored outputs, newest first
_PLMS_WEIGHTS = {
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
#: PRK: the weight a phase's model output has in the Runge-Kutta average (1/6, 1/3, 1/3, 1/6)
_PRK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


class PNDMScheduler(BaseScheduler):
    """diffusers' ``PNDMScheduler`` in NumPy: same constructor arguments and defaults, the same ``timesteps``
    (the PRK half steps when ``skip_prk_steps=False``, PLMS's repeated timestep) and the same state, stepped
    call by call as diffusers does it:

    * ``counter``: steps taken since ``set_timesteps``; ``step`` runs a PRK step while ``counter`` is below
      ``len(prk_timesteps)``, a PLMS step after;
    * ``ets``: the last model outputs (at most four; copies, so a runner may reuse its output buffer);
    * ``cur_sample``: the sample a PRK group, or PLMS's second-order start, restarts from;
    * ``cur_model_output``: the running Runge-Kutta average of a PRK group.

    The coefficients of every step are computed once in ``set_timesteps`` (float64) for a loop that passes
    ``timesteps[counter]``; a loop entering mid-schedule (img2img) gets diffusers' numbers for the timesteps it
    passes, computed at the step. Deterministic: ``step`` takes no generator. Where ours differs from diffusers
    (refused step counts and prediction types, a timestep -1): docs/parity.md.
    """

    pndm_order = 4

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, skip_prk_steps: bool = False,
                 set_alpha_to_one: bool = False, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0):  # fmt: skip
        self._init_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        check_choice("prediction_type", prediction_type, PNDM_PREDICTION_TYPES)
        self._validate_common()
        for key, value in (("skip_prk_steps", skip_prk_steps), ("set_alpha_to_one", set_alpha_to_one)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{key} must be True or False; got {value!r}")
        self._skip_prk = bool(skip_prk_steps)
        self._v_prediction = prediction_type == "v_prediction"
        # abar after the last step: 1 (a clean image) or abar_0
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].astype(np.int64)
        self.prk_timesteps = np.zeros(0, dtype=np.int64)
        self.plms_timesteps = np.zeros(0, dtype=np.int64)
        self._reset_state()
        self._plan: list[tuple[int, float, float]] = []
        self._schedule: frozenset[int] = frozenset()

    def _reset_state(self) -> None:
        self.counter = 0
        self.ets: list[np.ndarray] = []
        self.cur_sample: np.ndarray | None = None
        self.cur_model_output: np.ndarray | int = 0

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """PNDM needs no input scaling; returns ``sample`` unchanged."""
        return sample

    # -- schedule ----------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps spaced by ``timestep_spacing`` (diffusers' rule), lay out the
        PRK and PLMS timesteps, reset the state and compute every step's coefficients.

        ``len(timesteps)`` is n + 9 with the PRK warm-up (12 PRK calls, then n - 3 PLMS steps; n >= 4) and
        n + 1 with ``skip_prk_steps`` (n = 1: one step). Raises ValueError for n outside [1, T], for fewer
        than 4 spaced timesteps with the PRK warm-up, and for a ``steps_offset`` that pushes a timestep past T - 1.
        """
        n = self._check_num_inference_steps(num_inference_steps)
        c = self.config
        T = c["num_train_timesteps"]
        base = self._spaced_timesteps(n)[::-1]  # ascending, as diffusers' ``_timesteps``
        if base.max() >= T:
            raise ValueError(
                f"steps_offset={c['steps_offset']} pushes timestep {base.max()} past num_train_timesteps={T}"
            )
        if self._skip_prk:
            prk = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
        else:
            order = self.pndm_order
            if len(base) < order:
                raise ValueError(
                    f"PNDM's Runge-Kutta warm-up (skip_prk_steps=False) takes {order - 1} steps and needs "
                    f"num_inference_steps >= {order}; got {n} (diffusers fails there with a broadcast error). Use "
                    "skip_prk_steps=True (PLMS alone, as Stable Diffusion's configs do) or more steps"
                )
            half = np.tile(np.array([0, T // n // 2]), order)
            prk = np.array(base[-order:]).repeat(2) + half
            prk = prk[:-1].repeat(2)[1:-1][::-1].astype(np.int64)
            plms = base[:-3][::-1].astype(np.int64)
        self.num_inference_steps = n
        self.prk_timesteps = prk
        self.plms_timesteps = plms
        self.timesteps = np.concatenate([prk, plms]).astype(np.int64)
        self._schedule = frozenset(int(t) for t in self.timesteps)
        self._plan = []
        for i, t in enumerate(self.timesteps.tolist()):
            self._plan.append((t, *self._coefficients(*self._step_timesteps(i, t))))
        self._reset_state()

    def _step_timesteps(self, counter: int, timestep: int) -> tuple[int, int]:
        """(t, t_prev) of the transfer the step with this ``counter`` and ``timestep`` makes, by diffusers' rule."""
        T, n = self.config["num_train_timesteps"], self.num_inference_steps
        assert n is not None
        if self._uses_prk(counter):
            prev = timestep - (0 if counter % 2 else T // n // 2)
            return int(self.prk_timesteps[counter // 4 * 4]), prev
        if counter == 1:  # PLMS's second-order start: redo the first interval from the saved sample
            return timestep + T // n, timestep
        return timestep, timestep - T // n

    def _uses_prk(self, counter: int) -> bool:
        return not self._skip_prk and counter < len(self.prk_timesteps)

    def _alpha_cumprod(self, t: int) -> float:
        """abar_t; ``final_alpha_cumprod`` for t < 0 (past the end: the last timestep's previous one, or
        trailing spacing's timestep -1)."""
        if t >= self.config["num_train_timesteps"]:
            raise ValueError(f"timestep {t} is past num_train_timesteps={self.config['num_train_timesteps']}")
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def _coefficients(self, t: int, prev: int) -> tuple[float, float]:
        """(a, b) with x_prev = a * x + b * model_output: eq. (9) of the paper (diffusers' ``_get_prev_sample``),
        with v-prediction's epsilon = sqrt(abar_t) v + sqrt(1 - abar_t) x folded in."""
        a_t, a_prev = self._alpha_cumprod(t), self._alpha_cumprod(prev)
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        sample_coeff = math.sqrt(a_prev / a_t)
        denom = a_t * math.sqrt(b_prev) + math.sqrt(a_t * b_t * a_prev)
        # denom = 0 only where abar_t = abar_prev = 1 (zero betas up to t): x_t is x_0 there, nothing to remove
        eps_coeff = (a_prev - a_t) / denom if denom > 0 else 0.0
        if self._v_prediction:
            return sample_coeff - eps_coeff * math.sqrt(b_t), -eps_coeff * math.sqrt(a_t)
        return sample_coeff, -eps_coeff

    def _step_coefficients(self, timestep: Any) -> tuple[float, float]:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        counter = self.counter
        try:
            t = int(timestep)
            whole = t == timestep
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise self._not_in_schedule(timestep)
        if counter >= len(self._plan):
            raise ValueError(
                f"step() called {counter + 1} times for {len(self._plan)} timesteps: the schedule is over; call "
                "set_timesteps again for a new loop"
            )
        planned = self._plan[counter]
        if planned[0] == t:
            return planned[1], planned[2]
        if t not in self._schedule:
            raise self._not_in_schedule(timestep)
        return self._coefficients(*self._step_timesteps(counter, t))  # a loop entering mid-schedule

    def _not_in_schedule(self, timestep: Any) -> ValueError:
        return ValueError(f"timestep {timestep!r} is not one of this scheduler's timesteps {self.timesteps.tolist()}")

    # -- step ----------------------------------------------------------------------------------------------------
    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One PNDM step: a PRK step while ``counter < len(prk_timesteps)`` (and PRK is on), a PLMS step after.

        Args:
            model_output: float[B, C, H, W], the model's epsilon or v at ``timestep``.
            timestep: ``timesteps[counter]`` in a plain loop (another timestep of the schedule is taken as
                diffusers takes it).
            sample: float[B, C, H, W], the sample the model saw.
        Returns:
            ``SchedulerOutput(prev_sample)`` in the sample's dtype (``pred_original_sample`` is None, as in
            diffusers), or ``(prev_sample,)`` with ``return_dict=False``.
        """
        if self._uses_prk(self.counter):
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def step_prk(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """A pseudo Runge-Kutta step (phase ``counter % 4`` of a group of four model calls): phases 0-2 move
        the group's start sample by the current output to the next evaluation point; phase 3 moves it by the
        Runge-Kutta average (1/6, 1/3, 1/3, 1/6) to the group's end."""
        self._check_step_inputs(model_output, sample)
        if not self._uses_prk(self.counter):
            raise ValueError(
                f"step_prk: the PRK warm-up is over or off (counter={self.counter}, "
                f"{len(self.prk_timesteps)} PRK timesteps, skip_prk_steps={self._skip_prk})"
            )
        a, b = self._step_coefficients(timestep)
        phase = self.counter % 4
        w = _PRK_WEIGHTS[phase]
        if phase == 0:
            stored = np.array(model_output, copy=True)
            self.ets.append(stored)
            self.cur_model_output = stored * w
            self.cur_sample = sample
            direction = stored
        elif phase < 3:
            self.cur_model_output = self.cur_model_output + model_output * w
            direction = model_output
        else:
            direction = self.cur_model_output + model_output * w
            self.cur_model_output = 0
        start = self.cur_sample if self.cur_sample is not None else sample
        prev = start * a
        prev += direction * b
        self.counter += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def step_plms(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """A pseudo linear multistep step: the Adams-Bashforth combination of the last (up to four) model
        outputs moves the sample one interval; with ``skip_prk_steps`` the first two calls make a second-order
        (Heun-like) start over the first interval."""
        self._check_step_inputs(model_output, sample)
        if not self._skip_prk and len(self.ets) < 3:
            raise ValueError(
                "step_plms: with skip_prk_steps=False PLMS runs only after the 12 PRK calls of the warm-up "
                f"(counter={self.counter}); call step(), which runs them first"
            )
        a, b = self._step_coefficients(timestep)
        counter = self.counter
        if counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(np.array(model_output, copy=True))
        ets = self.ets
        if len(ets) == 1 and counter == 0:
            self.cur_sample = sample
            prev = sample * a
            prev += model_output * b
        elif len(ets) == 1 and counter == 1:
            start, self.cur_sample = self.cur_sample, None
            assert start is not None
            prev = start * a
            prev += (model_output + ets[-1]) * (b / 2)
        else:
            prev = sample * a
            term = None
            for w, e in zip(_PLMS_WEIGHTS[len(ets)], reversed(ets)):
                if term is None:
                    term = e * (w * b)
                else:
                    np.multiply(e, w * b, out=term)
                prev += term
        self.counter += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
