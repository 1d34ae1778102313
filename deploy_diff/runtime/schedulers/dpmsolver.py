"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022, arXiv 2206.00927 and 2211.01095), ODE and SDE variants."""

from __future__ import annotations

import math

import numpy as np

from .base import BaseScheduler, SchedulerOutput, check_choice, register_to_config
from .sigmas import (
    SIGMA_RAMPS,
    check_one_sigma_ramp,
    diffusers_float32_alphas_cumprod,  # noqa: F401  (importable from here, as before)
    karras_sigmas,  # noqa: F401  (importable from here, as before)
    lu_sigmas,
    multistep_spaced_timesteps,
    sigma_ramp,
    sigma_to_t,
)
from .step_index import StepIndexMixin

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers only acts on "learned" / "learned_range" (a 2C-channel output); DDPM's fixed types (a DDPM bundle's
# config switched to DPM-Solver) mean a plain C-channel output, as None
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
LEARNED_VARIANCE = ("learned", "learned_range")
# values other diffusers multistep schedulers write into a shared config; diffusers maps them the same way
_ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
_SOLVER_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


# -- phi functions of the exponential integrators, stable at h -> 0 ------------------------------------------
def _f1(x: float) -> float:
    """expm1(x) / x - 1 (-> 0 as x -> 0)."""
    if abs(x) < 1e-3:
        return x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x / 120)))
    return math.expm1(x) / x - 1.0


def _f2(x: float) -> float:
    """(expm1(x) - x) / x^2 - 1/2 (-> 0 as x -> 0)."""
    if abs(x) < 1e-3:
        return x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720)))
    return (math.expm1(x) - x) / (x * x) - 0.5


class DPMSolverMultistepScheduler(StepIndexMixin, BaseScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` in NumPy (same constructor arguments and defaults).

    ``algorithm_type`` ``"dpmsolver++"`` (default) / ``"sde-dpmsolver++"`` solve with the data prediction
    x_0, ``"dpmsolver"`` / ``"sde-dpmsolver"`` with the noise prediction (both deprecated in diffusers); the
    SDE variants draw one noise array of the sample's shape (float32) at *every* step, in diffusers' order.
    Multistep state (previous model outputs, lower-order counter, step index) is reset by
    ``set_timesteps``; the step index follows the rule of :class:`.step_index.StepIndexMixin`.

    Numerics: sigmas, alphas and lambdas are float64 from the float64 schedule; every step's coefficients
    are Python floats (the phi-functions through ``expm1`` and series, exact in the limit h -> 0), so a
    float32 sample stays float32. The integer timesteps of Karras / Lu / exponential / beta sigmas and the
    ``lambda_min_clipped`` cut go through diffusers' float32 ``alphas_cumprod`` (replayed by
    :func:`.sigmas.diffusers_float32_alphas_cumprod`), so they equal diffusers'.

    ``step`` also returns ``pred_original_sample`` (x_0); ``return_dict=False`` returns ``(prev_sample,)``.
    Flow matching (``use_flow_sigmas``, ``prediction_type="flow_prediction"``) is refused with ValueError.
    Deliberate differences from diffusers (repeated noise levels, refused degenerate spacings, learned
    variance channels, ``deis`` aliasing, ``add_noise`` before ``set_timesteps``): see docs/parity.md.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_lu_lambdas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):  # fmt: skip
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        if prediction_type == "flow_prediction" or use_flow_sigmas:
            raise ValueError(
                "flow matching (use_flow_sigmas=True / prediction_type='flow_prediction') is not "
                "supported by deploy-diff's DPMSolverMultistepScheduler; the runtime serves "
                "epsilon / v_prediction / sample UNets"
            )
        self._validate_common()
        # the same aliases diffusers maps (configs of DEIS / UniPC), recorded as the canonical value
        for name, value in (("algorithm_type", algorithm_type), ("solver_type", solver_type)):
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string; got {value!r}")
        if algorithm_type in _ALGORITHM_ALIASES:
            algorithm_type = self._config["algorithm_type"] = _ALGORITHM_ALIASES[algorithm_type]
        if solver_type in _SOLVER_ALIASES:
            solver_type = self._config["solver_type"] = _SOLVER_ALIASES[solver_type]
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={solver_order!r} is not supported; expected one of [1, 2, 3]")
        if algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
            raise ValueError(
                f"final_sigmas_type='zero' is not supported for algorithm_type={algorithm_type!r} "
                "(its noise-prediction update divides by the final sigma); use "
                "final_sigmas_type='sigma_min'"
            )
        if algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError(
                "solver_order=3 is not available for algorithm_type='sde-dpmsolver' (there is no "
                "third-order SDE-DPM-Solver update; diffusers fails at the third step); use "
                "solver_order 1 or 2, or algorithm_type='sde-dpmsolver++'"
            )
        check_one_sigma_ramp(self.config)
        if (
            isinstance(lambda_min_clipped, bool)
            or not isinstance(lambda_min_clipped, (int, float))
            or math.isnan(lambda_min_clipped)
        ):
            raise ValueError(f"lambda_min_clipped must be a number (-inf for no clipping); got {lambda_min_clipped!r}")

        ac = self.alphas_cumprod
        self.alpha_t = np.sqrt(ac)
        self.sigma_t = np.sqrt(1.0 - ac)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.sigmas = self._train_sigmas()
        self._reset_state()

    # -- state ---------------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def scale_model_input(self, sample: np.ndarray, *args, **kwargs) -> np.ndarray:
        """DPM-Solver needs no input scaling; returns ``sample`` unchanged."""
        return sample

    # -- schedule --------------------------------------------------------------------------------------------
    def _sigma_ramp(self, sigmas_asc: np.ndarray, n: int) -> np.ndarray | None:
        """float64[n] descending Karras / Lu / exponential / beta sigmas spanning ``sigmas_asc`` (the
        training sigmas, ascending in t), or None when none is configured (diffusers' precedence)."""
        c = self.config
        if c["use_lu_lambdas"] and not c["use_karras_sigmas"]:
            log_sigmas = np.log(sigmas_asc)
            return lu_sigmas(float(log_sigmas[0]), float(log_sigmas[-1]), n)
        kind = next((SIGMA_RAMPS[k] for k in SIGMA_RAMPS if c[k]), None)
        return None if kind is None else sigma_ramp(kind, float(sigmas_asc[0]), float(sigmas_asc[-1]), n)

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps=None) -> None:
        """Choose the inference timesteps and their sigmas, and reset the multistep state.

        ``num_inference_steps`` spaced by ``timestep_spacing`` (after the ``lambda_min_clipped`` cut) or
        replaced by Karras / Lu / exponential / beta sigmas; or explicit descending integer ``timesteps``.
        Sets ``timesteps`` (int64[n]) and ``sigmas`` (float64[n + 1], the last one the sigma after the final
        step: 0 or sigma at t = 0 per ``final_sigmas_type``).
        """
        c = self.config
        T = c["num_train_timesteps"]
        train = self._train_sigmas()  # float64[T], ascending in t
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        custom_sigmas = [
            k for k in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas") if c[k]
        ]
        if timesteps is not None:
            if custom_sigmas:
                raise ValueError(f"custom timesteps cannot be combined with {custom_sigmas[0]}=True")
            ts = np.asarray(timesteps)
            if ts.ndim != 1 or ts.size == 0 or ts.dtype.kind not in "iuf" or np.any(ts != np.round(ts)):
                raise ValueError(f"timesteps must be a non-empty 1-D list of integers; got {timesteps!r}")
            ts = ts.astype(np.int64)
            if np.any(np.diff(ts) >= 0) or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must be strictly descending integers in [0, {T}); got {ts.tolist()}")
            sigmas = train[ts]
        else:
            n = self._check_num_inference_steps(num_inference_steps)
            if custom_sigmas:  # the spacing (and lambda_min_clipped) play no part here, as in diffusers
                # the timesteps through diffusers' float32 arrays (equal to its own), the values in float64
                ac32 = self._alphas_cumprod_f32()
                sig32 = ((np.float32(1) - ac32) / ac32) ** np.float32(0.5)
                log32 = np.log(sig32)
                t_frac = sigma_to_t(self._sigma_ramp(sig32, n), log32)
                rounded = c["use_karras_sigmas"] or c["use_lu_lambdas"]
                if rounded and c["beta_schedule"] != "squaredcos_cap_v2":
                    t_frac = t_frac.round()
                ts = t_frac.astype(np.int64)  # truncation, as torch's .to(int64)
                sigmas = self._sigma_ramp(train, n)
                # the ends are sigma_max / sigma_min exactly (float64 pow/log round-trips are an ulp off;
                # diffusers' float32 cast lands on them, so a final sigma_min repeats the last one exactly)
                sigmas[0] = train[-1]
                if n > 1:
                    sigmas[-1] = train[0]
            else:
                ts = self._lambda_clipped_timesteps(n)
                # np.interp as diffusers: trailing's occasional extra timestep -1 gets sigma at t = 0
                sigmas = np.interp(ts, np.arange(T), train)
        if c["final_sigmas_type"] == "sigma_min":
            sigma_last = float(train[0])
            if sigma_last == 0:
                raise ValueError(
                    "final_sigmas_type='sigma_min' but sigma at t = 0 is 0 (alphas_cumprod[0] == 1); "
                    "use final_sigmas_type='zero' with a dpmsolver++ algorithm_type"
                )
        else:
            sigma_last = 0.0
        if np.any(sigmas <= 0) or not np.all(np.isfinite(sigmas)):
            raise ValueError(
                "the schedule has a zero or non-finite noise level at timesteps "
                f"{ts[(sigmas <= 0) | ~np.isfinite(sigmas)].tolist()}; DPM-Solver cannot step from it"
            )
        if timesteps is None and not custom_sigmas and len(np.unique(ts)) < len(ts):
            raise ValueError(
                f"num_inference_steps={len(ts)} with timestep_spacing={c['timestep_spacing']!r} gives "
                f"repeated timesteps (only {len(np.unique(ts))} distinct of {len(ts)}, e.g. "
                f"{ts[-5:].tolist()}); diffusers returns NaN or fails here: use fewer steps"
            )
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float64)
        self.timesteps = ts
        self.num_inference_steps = len(ts)
        # per-step float64 scalars: alpha, sigma (VP view) and lambda = log(alpha / sigma) = -log(sigma_VE)
        s = self.sigmas
        alpha = 1.0 / np.sqrt(1.0 + s * s)
        self._alpha = alpha.tolist()
        self._sigma = (s * alpha).tolist()
        with np.errstate(divide="ignore"):
            self._lambda = (-np.log(s)).tolist()  # +inf for a final sigma of 0
        self._reset_state()

    def _lambda_clipped_timesteps(self, n: int) -> np.ndarray:
        """int64 descending timesteps: diffusers' DPM-Solver rule (n + 1 points, the 0 dropped), after the
        ``lambda_min_clipped`` cut."""
        c = self.config
        T = c["num_train_timesteps"]
        lam_min = float(c["lambda_min_clipped"])
        if lam_min == -math.inf:
            last = T
        else:  # diffusers searches its float32 lambda_t; the replica decides the same index
            ac32 = self._alphas_cumprod_f32()
            lam32 = np.log(np.sqrt(ac32)) - np.log(np.sqrt(np.float32(1) - ac32))
            last = T - int(np.searchsorted(lam32[::-1].astype(np.float64), lam_min))
        spacing = c["timestep_spacing"]
        ts = multistep_spaced_timesteps(T, n, spacing, c["steps_offset"], last)
        # trailing: np.arange can give n + 1 entries, the last -1 (e.g. n = 61 of T = 1000); kept as diffusers
        lowest = -1 if spacing == "trailing" else 0
        if ts.size == 0 or ts.min() < lowest or ts.max() >= T:
            raise ValueError(
                f"num_inference_steps={n} with timestep_spacing={spacing!r}, steps_offset="
                f"{c['steps_offset']} and lambda_min_clipped={lam_min} gives timesteps {ts.tolist()} "
                f"outside [0, num_train_timesteps={T})"
            )
        return ts

    # -- step ------------------------------------------------------------------------------------------------
    def _convert_model_output(self, model_output: np.ndarray, sample: np.ndarray, i: int) -> np.ndarray:
        """The quantity the solver integrates: x_0 (DPM-Solver++) or epsilon (DPM-Solver); a new array."""
        c = self.config
        a, s = self._alpha[i], self._sigma[i]
        pt = c["prediction_type"]
        if c["algorithm_type"] in ("dpmsolver++", "sde-dpmsolver++"):
            if pt == "epsilon":
                x0 = sample - s * model_output
                x0 *= 1.0 / a
            elif pt == "sample":
                x0 = model_output.copy()
            else:  # v_prediction: x_0 = alpha * x_t - sigma * v
                x0 = a * sample
                x0 -= s * model_output
            if c["thresholding"]:
                x0 = self._threshold_sample(x0)
            return x0
        if pt == "epsilon":
            eps = model_output.copy()
        elif pt == "sample":
            eps = sample - a * model_output
            eps *= 1.0 / s
        else:  # v_prediction: eps = alpha * v + sigma * x_t
            eps = a * model_output
            eps += s * sample
        if c["thresholding"]:
            x0 = self._threshold_sample((sample - s * eps) * (1.0 / a))
            eps = (sample - a * x0) * (1.0 / s)
        return eps

    def _coefficients(self, i: int, order: int) -> tuple[float, list[float], float]:
        """(c_x, [c_m0, c_m1, c_m2][:order], c_noise) with x_next = c_x x + sum c_mk m_k + c_noise z.

        m0 is the converted output at this step, m1 / m2 those of the previous steps; the D-differences of
        the papers are expanded into these weights. Every coefficient is finite, also for h = 0 or +inf.
        """
        algo = self.config["algorithm_type"]
        heun = self.config["solver_type"] == "heun"
        a_t, s_t, l_t = self._alpha[i + 1], self._sigma[i + 1], self._lambda[i + 1]
        a0, s0, l0 = self._alpha[i], self._sigma[i], self._lambda[i]
        h = l_t - l0
        if h == 0:  # repeated sigma (Karras + sigma_min at the last step): the exact limit is no change
            return 1.0, [0.0] * order, 0.0
        c_noise = 0.0
        mid = order == 2 and not heun  # the midpoint rule only changes the second-order update
        # weights B0, B1, B2 of D0, D1, D2: DPM-Solver++ eqs. (9)-(10) and App. B of DPM-Solver (the
        # bracketed phi terms through expm1 / _f1 / _f2 so that they stay exact for small h)
        if algo == "dpmsolver++":
            c_x = s_t / s0
            em = math.expm1(-h)
            B0 = -a_t * em
            if order > 1:
                B1 = -0.5 * a_t * em if mid else -a_t * _f1(-h)
                B2 = -a_t * _f2(-h) if order == 3 else 0.0
        elif algo == "sde-dpmsolver++":
            em2 = math.expm1(-2.0 * h)  # exp(-2h) - 1
            c_x = s_t / s0 * math.exp(-h)
            B0 = -a_t * em2
            c_noise = s_t * math.sqrt(max(-em2, 0.0))
            if order > 1:
                B1 = -0.5 * a_t * em2 if mid else -a_t * _f1(-2.0 * h)
                B2 = a_t * (-_f2(-2.0 * h) - 1.0) if order == 3 else 0.0
        elif algo == "dpmsolver":
            c_x = a_t / a0
            ep = math.expm1(h)
            B0 = -s_t * ep
            if order > 1:
                B1 = -0.5 * s_t * ep if mid else -s_t * _f1(h)
                B2 = -s_t * _f2(h) if order == 3 else 0.0
        else:  # sde-dpmsolver (no third order: refused at construction)
            c_x = a_t / a0
            ep = math.expm1(h)
            B0 = -2.0 * s_t * ep
            c_noise = s_t * math.sqrt(max(math.expm1(2.0 * h), 0.0))
            if order > 1:
                B1 = -s_t * ep if mid else -2.0 * s_t * _f1(h)
                B2 = 0.0
        if order == 1:
            return c_x, [B0], c_noise
        h0 = l0 - self._lambda[i - 1]
        if h0 == 0:  # the previous output is at the same noise level (trailing's t = 0, -1): no slope to use
            return self._coefficients(i, 1)  # diffusers: NaN / inf here
        u = h / h0  # 1 / r0
        if order == 2:  # D1 = (m0 - m1) / r0
            return c_x, [B0 + B1 * u, -B1 * u], c_noise
        h1 = self._lambda[i - 1] - self._lambda[i - 2]
        if h1 == 0:
            return self._coefficients(i, 2)
        v = h / h1  # 1 / r1
        w = h0 / (h0 + h1)  # r0 / (r0 + r1)
        z = h / (h0 + h1)  # 1 / (r0 + r1)
        # D1 = D1_0 + w (D1_0 - D1_1), D2 = z (D1_0 - D1_1), D1_0 = u (m0 - m1), D1_1 = v (m1 - m2)
        c0 = B0 + B1 * u * (1 + w) + B2 * z * u
        c1 = -B1 * (u + w * (u + v)) - B2 * z * (u + v)
        c2 = B1 * w * v + B2 * z * v
        return c_x, [c0, c1, c2], c_noise

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        generator=None,
        variance_noise: np.ndarray | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep DPM-Solver step from ``timesteps[step_index]`` to the next noise level.

        Args:
            model_output: float32[B, C, H, W] (or [B, 2C, H, W] with ``variance_type`` set: the first C
                channels are used).
            timestep: the current entry of ``timesteps`` (looked up on the first call only).
            sample: float32[B, C, H, W], the current x_t.
            generator: noise source of the SDE variants (``TorchGenerator``, ``numpy.random.Generator`` or a
                list of them, one per image); one float32 draw of the sample's shape per step.
            variance_noise: float[B, C, H, W], the SDE noise itself instead of drawing it.
            return_dict: False returns ``(prev_sample,)`` as diffusers.

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)`` (x_0 of this step); prev_sample has
        the dtype of ``model_output`` / ``sample`` (float32 for float32 inputs). Do not modify
        ``pred_original_sample`` in place: the solver keeps it for the next steps.
        """
        self._check_step_inputs(model_output, sample)
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = self._current_index(timestep)
        n = len(self.timesteps)
        c = self.config
        C = sample.shape[1]
        if (
            c["variance_type"] in LEARNED_VARIANCE
            and model_output.ndim == sample.ndim
            and model_output.shape[1] == 2 * C
        ):
            model_output = model_output[:, :C]
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {model_output.shape}, sample {sample.shape}"
                + (
                    ""
                    if c["variance_type"] in LEARNED_VARIANCE
                    else " (a 2C-channel output needs variance_type='learned_range' or 'learned')"
                )
            )
        out_dtype = np.result_type(model_output.dtype, sample.dtype)
        work = np.float64 if out_dtype == np.float64 else np.float32
        x = sample.astype(work, copy=False)
        mo = model_output.astype(work, copy=False)

        # lower orders at the end stabilise few-step sampling; a final sigma of 0 always takes a first-order step
        final_zero = self._sigma[i + 1] == 0
        lower_final = i == n - 1 and (c["euler_at_final"] or (c["lower_order_final"] and n < 15) or final_zero)
        lower_second = i == n - 2 and c["lower_order_final"] and n < 15

        converted = self._convert_model_output(mo, x, i)
        order_max = c["solver_order"]
        outs = self.model_outputs
        for k in range(order_max - 1):
            outs[k] = outs[k + 1]
        outs[-1] = converted

        noise = None
        if c["algorithm_type"] in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is None:
                noise = self._noise(converted.shape, generator, np.float32)
            else:
                noise = np.asarray(variance_noise)
                if noise.shape != converted.shape:
                    raise ValueError(f"variance_noise has shape {noise.shape}; expected {converted.shape}")
            noise = noise.astype(work, copy=False)

        if order_max == 1 or self.lower_order_nums < 1 or lower_final:
            order = 1
        elif order_max == 2 or self.lower_order_nums < 2 or lower_second:
            order = 2
        else:
            order = 3
        c_x, cms, c_noise = self._coefficients(i, order)
        prev = x * c_x if c_x != 1.0 else x.copy()
        for k, cm in enumerate(cms):
            if cm != 0.0:
                prev += cm * outs[-1 - k]
        if noise is not None and c_noise != 0.0:
            prev += c_noise * noise

        if self.lower_order_nums < order_max:
            self.lower_order_nums += 1
        self._step_index = i + 1

        prev = prev.astype(out_dtype, copy=False)
        if c["algorithm_type"] in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = converted
        else:
            x0 = (x - self._sigma[i] * converted) * (1.0 / self._alpha[i])
        x0 = x0.astype(out_dtype, copy=False)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # -- forward process -------------------------------------------------------------------------------------
    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x_t = alpha_t x_0 + sigma_t noise.

        After ``set_timesteps`` each timestep is looked up in ``timesteps`` and its (possibly Karras) sigma
        used, with diffusers' rule: the begin index if one was set (the current step index once stepping
        started). Before ``set_timesteps``: the training schedule at integer timesteps in [0, T).
        """
        if self.num_inference_steps is None:
            return super().add_noise(original_samples, noise, timesteps)
        x0 = np.asarray(original_samples)
        dtype = x0.dtype if x0.dtype.kind == "f" else np.float32
        t = np.asarray(timesteps).reshape(-1)
        idx = self._noise_indices(t)
        sigma = self.sigmas[idx]
        alpha = 1.0 / np.sqrt(1.0 + sigma * sigma)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = alpha.astype(dtype).reshape(shape)
        s = (sigma * alpha).astype(dtype).reshape(shape)
        return a * x0 + s * np.asarray(noise, dtype=dtype)
