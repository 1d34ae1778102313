"""UniPC (Zhao et al. 2023, arXiv:2302.04867): a unified predictor-corrector multistep solver.

Each ``step`` first *corrects* the sample the previous step predicted (UniC, which reuses the model output
just evaluated at that sample, so it costs no extra model call), then *predicts* the next sample (UniP).
Both are B(h) updates in log-SNR time lambda = log(alpha) - log(sigma) on the data prediction x_0
(``predict_x0=True``) or on the noise prediction epsilon.
"""

from __future__ import annotations

import math

import numpy as np

from .base import TIMESTEP_SPACINGS, BaseScheduler, SchedulerOutput, check_choice, register_to_config
from .sigmas import (
    SIGMA_RAMPS,
    check_one_sigma_ramp,
    multistep_spaced_timesteps,
    sigma_ramp,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)
from .sigmas import torch_linspace_f32 as _torch_linspace_f32  # noqa: F401  (importable from here, as before)
from .step_index import StepIndexMixin

__all__ = ["UniPCMultistepScheduler"]

UNIPC_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
SOLVER_TYPES = ("bh1", "bh2")
#: solver types of DPM-Solver that diffusers silently maps to "bh2" (as it does, so configs carried over load)
_SOLVER_TYPE_ALIASES = ("midpoint", "heun", "logrho")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TIME_SHIFT_TYPES = ("exponential", "linear")


def _solve(A: list[list[float]], b: list[float]) -> list[float]:
    """x with A x = b for a small dense system (Gaussian elimination with partial pivoting, float64)."""
    n = len(b)
    M = [list(row) + [rhs] for row, rhs in zip(A, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(M[r][col]))
        if M[pivot][col] == 0.0:
            raise ValueError("UniPC: singular system for the B(h) coefficients (repeated log-SNR values)")
        M[col], M[pivot] = M[pivot], M[col]
        for r in range(col + 1, n):
            f = M[r][col] / M[col][col]
            for c in range(col, n + 1):
                M[r][c] -= f * M[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (M[r][n] - sum(M[r][c] * x[c] for c in range(r + 1, n))) / M[r][r]
    return x


class UniPCMultistepScheduler(StepIndexMixin, BaseScheduler):
    """diffusers' ``UniPCMultistepScheduler`` in NumPy (same constructor arguments and defaults).

    The multistep state follows diffusers exactly: ``model_outputs`` (the converted outputs of the last
    ``solver_order`` steps, oldest first), ``timestep_list``, ``lower_order_nums`` (warm-up counter),
    ``this_order`` (the predictor order of the last step, which is the order of the next step's corrector),
    ``last_sample`` (the corrected sample the last predictor started from), ``step_index`` and
    ``begin_index`` (the rule of :class:`.step_index.StepIndexMixin`). ``set_timesteps`` resets all of it.

    Schedule arrays (``sigmas``, ``alphas_cumprod``, ``alpha_t``, ``sigma_t``, ``lambda_t``) are float64 and the
    per-step coefficients are Python floats, so a float32 sample stays float32 (diffusers keeps float32
    arrays). Timesteps equal diffusers', also for Karras / exponential / beta sigmas, which diffusers maps back
    to timesteps through its float32 ``alphas_cumprod``: they are computed through a replica of it
    (:func:`.sigmas.diffusers_float32_alphas_cumprod`); the sigmas the solver steps with stay float64.

    ``step`` returns ``SchedulerOutput(prev_sample, pred_original_sample)`` and accepts ``generator=`` (ignored:
    UniPC is deterministic) so that every scheduler of this package is driven the same way;
    ``return_dict=False`` gives ``(prev_sample,)`` as diffusers does. ``use_beta_sigmas`` needs no scipy.
    Deliberate differences from diffusers (the limits of a step into sigma = 0 or with h = 0, refused
    degenerate schedules and ``solver_p``, ``add_noise`` before ``set_timesteps``): see docs/parity.md.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 predict_x0: bool = True, solver_type: str = "bh2", lower_order_final: bool = True,
                 disable_corrector: list[int] = [],  # noqa: B006  (diffusers' default, never mutated)
                 solver_p=None, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, final_sigmas_type: str = "zero",
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", sigma_min: float | None = None,
                 sigma_max: float | None = None, shift_terminal: float | None = None):  # fmt: skip
        self._validate(
            solver_order=solver_order,
            prediction_type=prediction_type,
            predict_x0=predict_x0,
            solver_type=solver_type,
            disable_corrector=disable_corrector,
            solver_p=solver_p,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            use_flow_sigmas=use_flow_sigmas,
            flow_shift=flow_shift,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            final_sigmas_type=final_sigmas_type,
            time_shift_type=time_shift_type,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            shift_terminal=shift_terminal,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
        )
        if solver_type in _SOLVER_TYPE_ALIASES:
            self._config["solver_type"] = "bh2"  # as diffusers' register_to_config(solver_type="bh2")
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        ac = self.alphas_cumprod
        # VP schedule: x_t = alpha_t x_0 + sigma_t eps, lambda_t = log(alpha_t / sigma_t) (half log-SNR)
        self.alpha_t = np.sqrt(ac)
        self.sigma_t = np.sqrt(1.0 - ac)
        with np.errstate(divide="ignore"):
            self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = sigmas_from_alphas_cumprod(ac)  # float64[T] before set_timesteps, float64[n + 1] after
        self.init_noise_sigma = 1.0
        self.predict_x0 = bool(predict_x0)
        self.disable_corrector = list(disable_corrector)
        self.solver_p = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self._reset_state()

    # -- validation ----------------------------------------------------------------------------------
    @staticmethod
    def _validate(**c) -> None:
        order = c["solver_order"]
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= 3:
            raise ValueError(f"solver_order={order!r} is not supported; expected 1, 2 or 3")
        check_choice("prediction_type", c["prediction_type"], UNIPC_PREDICTION_TYPES)
        check_choice("solver_type", c["solver_type"], SOLVER_TYPES + _SOLVER_TYPE_ALIASES)
        check_choice("timestep_spacing", c["timestep_spacing"], TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", c["final_sigmas_type"], FINAL_SIGMAS_TYPES)
        check_choice("time_shift_type", c["time_shift_type"], TIME_SHIFT_TYPES)
        off = c["steps_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, np.integer)) or off < 0:
            raise ValueError(f"steps_offset must be a non-negative int; got {off!r}")
        if not 0 < c["dynamic_thresholding_ratio"] <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must lie in (0, 1]; got {c['dynamic_thresholding_ratio']!r}")
        if not c["sample_max_value"] > 0:
            raise ValueError(f"sample_max_value must be > 0; got {c['sample_max_value']!r}")
        if c["solver_p"] is not None:
            raise ValueError(
                "solver_p (another scheduler as UniPC's predictor) is not supported: it cannot be "
                "saved in scheduler_config.json; use solver_type='bh1' or 'bh2' instead"
            )
        dc = c["disable_corrector"]
        if (
            isinstance(dc, (str, bytes))
            or not hasattr(dc, "__iter__")
            or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in dc)
        ):
            raise ValueError(f"disable_corrector must be a list of step indices (ints); got {dc!r}")
        check_one_sigma_ramp(c)
        if c["use_flow_sigmas"] and (c["use_exponential_sigmas"] or c["use_beta_sigmas"]):
            raise ValueError(
                "use_flow_sigmas cannot be combined with use_exponential_sigmas or use_beta_sigmas: "
                "their VP sigmas (> 1) would be read as flow sigmas (diffusers returns NaN)"
            )
        if c["shift_terminal"] is not None and not c["use_flow_sigmas"]:
            raise ValueError("shift_terminal is only supported when use_flow_sigmas=True")
        if c["shift_terminal"] is not None and not 0 <= c["shift_terminal"] < 1:
            raise ValueError(f"shift_terminal must lie in [0, 1); got {c['shift_terminal']!r}")
        if not c["flow_shift"] > 0:
            raise ValueError(f"flow_shift must be > 0; got {c['flow_shift']!r}")
        if c["prediction_type"] == "flow_prediction" and not c["predict_x0"]:
            raise ValueError(
                "prediction_type='flow_prediction' needs predict_x0=True (UniPC's noise-prediction "
                "form is defined for epsilon, sample and v_prediction only)"
            )
        for key in ("sigma_min", "sigma_max"):
            if c[key] is not None and not (isinstance(c[key], (int, float, np.floating)) and c[key] > 0):
                raise ValueError(f"{key} must be None or a number > 0; got {c[key]!r}")
        if c["sigma_min"] is not None and c["sigma_max"] is not None and not c["sigma_min"] < c["sigma_max"]:
            raise ValueError(f"sigma_min={c['sigma_min']} must be < sigma_max={c['sigma_max']}")

    # -- state -----------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        order = self.config["solver_order"]
        self.model_outputs: list[np.ndarray | None] = [None] * order
        self.timestep_list: list = [None] * order
        self.lower_order_nums = 0
        self.last_sample: np.ndarray | None = None
        self.this_order: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._coef_cache: dict[tuple, tuple] = {}

    # -- schedule ----------------------------------------------------------------------------------------
    def _sigma_ramp(self, sigmas_ascending: np.ndarray, n: int) -> np.ndarray:
        """float64[n] descending sigmas of the configured list (Karras / exponential / beta) over the range of
        ``sigmas_ascending`` (or the configured ``sigma_min`` / ``sigma_max``)."""
        c = self.config
        s_min = float(c["sigma_min"]) if c["sigma_min"] is not None else float(sigmas_ascending[0])
        s_max = float(c["sigma_max"]) if c["sigma_max"] is not None else float(sigmas_ascending[-1])
        kind = next(SIGMA_RAMPS[k] for k in SIGMA_RAMPS if c[k])
        return sigma_ramp(kind, s_min, s_max, n)

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        if self.config["time_shift_type"] == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
        return mu / (mu + (1 / t - 1) ** 1.0)

    def set_timesteps(
        self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None
    ) -> None:
        """Choose the inference schedule and reset the multistep state.

        Args:
            num_inference_steps: number of steps n, in [1, num_train_timesteps].
            device: ignored (NumPy); accepted for diffusers' signature.
            sigmas: custom descending flow sigmas in (0, 1] (only with ``use_flow_sigmas``); n = len(sigmas).
            mu: the time-shift parameter; required with ``use_dynamic_shifting``.

        Sets ``timesteps`` int64[n] and ``sigmas`` float64[n + 1] (the last is 0 or sigma_min).
        """
        c = self.config
        T = c["num_train_timesteps"]
        if c["use_dynamic_shifting"] and mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True")
        ramp = c["use_karras_sigmas"] or c["use_exponential_sigmas"] or c["use_beta_sigmas"]
        custom = None
        if sigmas is not None:
            if not c["use_flow_sigmas"] or ramp:
                raise ValueError(
                    "set_timesteps(sigmas=...) is supported only with use_flow_sigmas=True and "
                    "none of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas"
                )
            custom = np.asarray(sigmas, dtype=np.float64).reshape(-1)
            if custom.size == 0 or not np.all(np.isfinite(custom)) or custom.min() <= 0 or custom.max() > 1:
                raise ValueError(f"custom flow sigmas must be a non-empty list of values in (0, 1]; got {sigmas!r}")
            n = custom.size
        else:
            n = self._check_num_inference_steps(num_inference_steps)

        vp_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # float64[T], ascending along t
        final_min = c["final_sigmas_type"] == "sigma_min"
        if ramp:
            # the ramp over float64 sigmas drives the solver; the same ramp over diffusers' float32 sigmas
            # gives the timesteps (see the class docstring)
            ac32 = self._alphas_cumprod_f32()
            sig32 = np.sqrt((np.float32(1) - ac32) / ac32)
            log_sigmas32 = np.log(sig32)
            step_sigmas = self._sigma_ramp(vp_sigmas, n)
            t_sigmas = self._sigma_ramp(sig32, n)
            if c["use_karras_sigmas"] and c["use_flow_sigmas"]:
                step_sigmas = step_sigmas / (step_sigmas + 1)
                t_sigmas = t_sigmas / (t_sigmas + 1)
                timesteps = (t_sigmas * T).astype(np.int64)
            else:
                t = sigma_to_t(t_sigmas, log_sigmas32)
                timesteps = (t.round() if c["use_karras_sigmas"] else t).astype(np.int64)
            last = step_sigmas[-1] if final_min else 0.0
        elif c["use_flow_sigmas"]:
            if custom is None:
                step_sigmas = np.linspace(1, 1 / T, n + 1)[:-1]
            else:
                step_sigmas = custom.copy()
            if c["use_dynamic_shifting"]:
                step_sigmas = self._time_shift(float(mu), step_sigmas)
            else:
                shift = c["flow_shift"]
                step_sigmas = shift * step_sigmas / (1 + (shift - 1) * step_sigmas)
            if c["shift_terminal"] is not None:
                # stretch so that the schedule ends at shift_terminal (LTX-Video)
                one_minus = 1 - step_sigmas
                step_sigmas = 1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))
            if abs(step_sigmas[0] - 1) < 1e-6:
                step_sigmas[0] -= 1e-6  # as diffusers: alpha = 1 - sigma must not be 0 (log alpha)
            timesteps = (step_sigmas * T).astype(np.int64)
            last = step_sigmas[-1] if final_min else 0.0
        else:
            timesteps = multistep_spaced_timesteps(T, n, c["timestep_spacing"], c["steps_offset"])
            if timesteps.max() >= T:
                raise ValueError(
                    f"steps_offset={c['steps_offset']} pushes timestep {timesteps.max()} to or past "
                    f"num_train_timesteps={T}"
                )
            # trailing can give n + 1 timesteps, the last one -1 (np.arange rounds up, e.g. n = 61 with
            # T = 1000); diffusers keeps it and np.interp clamps its sigma to sigma at t = 0: so do we
            step_sigmas = vp_sigmas[np.clip(timesteps, 0, T - 1)]
            last = vp_sigmas[0] if final_min else 0.0

        step_sigmas = np.asarray(step_sigmas, dtype=np.float64)
        if not np.all(np.isfinite(step_sigmas)) or step_sigmas.min() <= 0 or np.any(np.diff(step_sigmas) == 0):
            # (a sigma may rise: the zero-SNR clamp makes sigma at T - 1 smaller than at T - 2 for `linear`,
            # and diffusers steps through that; only a repeated sigma, h = 0, is singular)
            raise ValueError(
                f"num_inference_steps={n} with this configuration repeats a sigma inside the inference schedule "
                f"(timesteps {timesteps.tolist()[:12]}...): UniPC's log-SNR step h would be zero (diffusers "
                "returns NaN). Use fewer steps or another timestep_spacing"
            )
        self.sigmas = np.concatenate([step_sigmas, [float(last)]])
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(timesteps)

        # per-index alpha, sigma, lambda (Python floats) for the coefficient computation
        if c["use_flow_sigmas"]:
            alphas, sigs = 1.0 - self.sigmas, self.sigmas.copy()
        else:
            alphas = 1.0 / np.sqrt(self.sigmas**2 + 1)
            sigs = self.sigmas * alphas
        with np.errstate(divide="ignore"):
            lambdas = np.log(alphas) - np.log(sigs)
        same_schedule = getattr(self, "_lambda_list", None) == lambdas.tolist()
        cache = self._coef_cache
        self._alpha_list = alphas.tolist()
        self._sigma_t_list = sigs.tolist()
        self._lambda_list = lambdas.tolist()
        self._reset_state()
        if same_schedule:
            self._coef_cache = cache  # the coefficients depend on the sigmas only

    # -- conversions -----------------------------------------------------------------------------------------
    def _sigma_to_alpha_sigma_t(self, sigma):
        """(alpha_t, sigma_t) of a sigma: VP alpha = 1 / sqrt(1 + sigma^2), or flow alpha = 1 - sigma."""
        if self.config["use_flow_sigmas"]:
            return 1 - sigma, sigma
        alpha = 1 / np.sqrt(np.asarray(sigma, dtype=np.float64) ** 2 + 1)
        return alpha, sigma * alpha

    def scale_model_input(self, sample: np.ndarray, *args, **kwargs) -> np.ndarray:
        """UniPC needs no input scaling; returns ``sample`` unchanged."""
        return sample

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The model output as the solver needs it at the current step index: x_0 (``predict_x0``, thresholded
        when ``thresholding``) or epsilon. float32[B, C, H, W] in, same out."""
        i = self._step_index
        a, s = self._alpha_list[i], self._sigma_t_list[i]
        pt = self.config["prediction_type"]
        if self.predict_x0:
            if pt == "epsilon":
                x0 = (sample - s * model_output) / a
            elif pt == "sample":
                x0 = model_output
            elif pt == "v_prediction":
                x0 = a * sample - s * model_output
            else:  # flow_prediction: x_0 = x_t - sigma * v with the raw sigma
                x0 = sample - float(self.sigmas[i]) * model_output
            if self.config["thresholding"]:
                x0 = self._threshold_sample(x0)
            return x0
        if pt == "epsilon":
            return model_output
        if pt == "sample":
            return (sample - a * model_output) / s
        return a * model_output + s * sample  # v_prediction

    # -- the B(h) coefficients -------------------------------------------------------------------------------
    def _bh_coefficients(self, kind: str, order: int) -> tuple[float, list[float], float]:
        """Coefficients of one UniP (kind "p") or UniC (kind "c") update at the current step index.

        The update is linear in the sample and in the model outputs, so it is returned as
        ``(c_x, [c_m0, c_m1, ..., c_m{order-1}], c_t)``: x_new = c_x * x + sum_k c_mk * m_k + c_t * m_t, where
        m_0 is the newest stored output, m_k the k-th older one and m_t (corrector only) the output just
        evaluated at the sample being corrected. Computed in float64 and cached per step.
        """
        i = self._step_index
        key = (kind, i, order)
        hit = self._coef_cache.get(key)
        if hit is not None:
            return hit
        lam, alp, sig = self._lambda_list, self._alpha_list, self._sigma_t_list
        # predictor: from s0 = i to t = i + 1; corrector: re-does the step from s0 = i - 1 to t = i
        t, s0 = (i + 1, i) if kind == "p" else (i, i - 1)
        alpha_t, sigma_t, alpha_s0, sigma_s0 = alp[t], sig[t], alp[s0], sig[s0]

        if kind == "p" and sigma_t == 0.0:
            # into sigma = 0: lambda_t = inf, the limit of the first-order update (see the class docstring)
            if self.predict_x0:
                coefs = (0.0, [alpha_t] + [0.0] * (order - 1), 0.0)  # x_t = x_0 prediction
            else:
                coefs = (alpha_t / alpha_s0, [-alpha_t * sigma_s0 / alpha_s0] + [0.0] * (order - 1), 0.0)
            self._coef_cache[key] = coefs
            return coefs
        h = lam[t] - lam[s0]
        if kind == "p" and h == 0.0:
            coefs = (1.0, [0.0] * order, 0.0)  # zero-length step: the limit h -> 0 is the identity
            self._coef_cache[key] = coefs
            return coefs

        # r_k = (lambda_{s_k} - lambda_{s0}) / h for the older points s_k = s0 - k
        rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [1.0]
        hh = -h if self.predict_x0 else h
        h_phi_1 = math.expm1(hh)  # h * phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if self.config["solver_type"] == "bh1" else math.expm1(hh)  # B(h) of eq. (8)
        R, b = [], []
        factorial_i = 1
        for j in range(1, order + 1):
            R.append([rk ** (j - 1) for rk in rks])
            b.append(h_phi_k * factorial_i / B_h)  # phi_{j+1}(h) * j! / B(h), Theorem 3.1
            factorial_i *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i

        if kind == "p":
            if order == 1:
                rhos: list[float] = []
            elif order == 2:
                rhos = [0.5]  # the simplified UniP-2
            else:
                rhos = _solve([row[:-1] for row in R[:-1]], b[:-1])
        else:
            rhos = [0.5] if order == 1 else _solve(R, b)

        P = alpha_t if self.predict_x0 else sigma_t
        c_x = sigma_t / sigma_s0 if self.predict_x0 else alpha_t / alpha_s0
        # x_t = c_x x - P h_phi_1 m_0 - P B(h) [sum_k rho_k (m_k - m_0) / r_k  (+ rho_t (m_t - m_0))]
        c_m = [-P * h_phi_1] + [0.0] * (order - 1)
        for k in range(1, order):
            w = P * B_h * rhos[k - 1] / rks[k - 1]
            c_m[k] -= w
            c_m[0] += w
        c_t = 0.0
        if kind == "c":
            c_t = -P * B_h * rhos[-1]
            c_m[0] -= c_t
        coefs = (c_x, c_m, c_t)
        self._coef_cache[key] = coefs
        return coefs

    @staticmethod
    def _combine(c_x: float, x: np.ndarray, terms) -> np.ndarray:
        """c_x * x + sum(c * m for c, m in terms), skipping zero coefficients, in x's dtype."""
        terms = [(c, m) for c, m in terms if c != 0.0]
        if c_x != 0.0:
            out = np.multiply(x, c_x)
        elif terms:
            c, m = terms.pop(0)
            out = np.multiply(m, c)
        else:
            return np.zeros_like(x)
        if out.dtype != x.dtype:
            out = out.astype(x.dtype)
        scratch = np.empty_like(out) if terms else None
        for c, m in terms:
            np.multiply(m, c, out=scratch, casting="same_kind")
            out += scratch
        return out

    def multistep_uni_p_bh_update(self, model_output: np.ndarray, sample: np.ndarray, order: int) -> np.ndarray:
        """UniP-``order`` from the current step index to the next (``model_outputs`` already holds the
        current converted output as its last entry)."""
        c_x, c_m, _ = self._bh_coefficients("p", order)
        outs = self.model_outputs
        return self._combine(c_x, sample, [(c_m[k], outs[-(k + 1)]) for k in range(order)])

    def multistep_uni_c_bh_update(
        self, this_model_output: np.ndarray, last_sample: np.ndarray, this_sample: np.ndarray, order: int
    ) -> np.ndarray:
        """UniC-``order``: redo the last step from ``last_sample`` using ``this_model_output`` (evaluated at
        ``this_sample``, the predicted sample); ``model_outputs`` still ends with the last step's output."""
        c_x, c_m, c_t = self._bh_coefficients("c", order)
        outs = self.model_outputs
        terms = [(c_m[k], outs[-(k + 1)]) for k in range(order)] + [(c_t, this_model_output)]
        return self._combine(c_x, last_sample, terms)

    # -- stepping ----------------------------------------------------------------------------------------
    def step(
        self, model_output: np.ndarray, timestep, sample: np.ndarray, return_dict: bool = True, *, generator=None
    ) -> SchedulerOutput | tuple:
        """One UniPC step: correct the sample with UniC (skipped on the first step and for indices listed in
        ``disable_corrector``), then predict the next sample with UniP.

        Args:
            model_output: float32[B, C, H, W], the model's output at ``sample``.
            timestep: the current entry of ``timesteps`` (only read on the first step; then the step index
                advances by itself).
            sample: float32[B, C, H, W], the current sample x_t.
            return_dict: False gives ``(prev_sample,)`` as diffusers does.
            generator: ignored (UniPC is deterministic); accepted so every scheduler steps the same way.

        Returns:
            ``SchedulerOutput(prev_sample float32[B, C, H, W], pred_original_sample float32[B, C, H, W])``.
        """
        self._check_step_inputs(model_output, sample)
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = self._current_index(timestep)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {model_output.shape}; expected the sample's {sample.shape}")
        order_cfg = self.config["solver_order"]

        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        m = self.convert_model_output(model_output, sample=sample)
        if self.predict_x0:
            x0 = m
        else:  # x_0 = (x_t - sigma_t eps) / alpha_t, from the sample the output was evaluated at
            x0 = ((sample - self._sigma_t_list[i] * m) / self._alpha_list[i]).astype(sample.dtype, copy=False)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(m, self.last_sample, sample, self.this_order)

        for j in range(order_cfg - 1):
            self.model_outputs[j] = self.model_outputs[j + 1]
            self.timestep_list[j] = self.timestep_list[j + 1]
        self.model_outputs[-1] = m
        self.timestep_list[-1] = timestep

        if self.config["lower_order_final"]:
            this_order = min(order_cfg, self.num_inference_steps - i)
        else:
            this_order = order_cfg
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm-up: no more history than exists
        assert self.this_order > 0

        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(model_output, sample=sample, order=self.this_order)
        if self.lower_order_nums < order_cfg:
            self.lower_order_nums += 1
        self._step_index = i + 1

        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    # -- forward process ---------------------------------------------------------------------------------------
    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x_t = alpha_t * x_0 + sigma_t * noise for timesteps int[B] (or one timestep).

        Before ``set_timesteps``: the training schedule, alpha_t = sqrt(abar_t). After: the inference sigma of
        each timestep's index (or of ``begin_index`` / the current step index when set, as diffusers does).
        """
        if self.num_inference_steps is None:
            if self.config["use_flow_sigmas"]:
                raise ValueError(
                    "add_noise with use_flow_sigmas needs set_timesteps() first (the flow sigmas "
                    "are defined by the inference schedule)"
                )
            return super().add_noise(original_samples, noise, timesteps)
        x0 = np.asarray(original_samples)
        dtype = x0.dtype if x0.dtype.kind == "f" else np.float32
        t = np.asarray(timesteps).reshape(-1)
        idx = self._noise_indices(t)
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[idx])
        shape = (-1,) + (1,) * (x0.ndim - 1)
        alpha = np.asarray(alpha, dtype=dtype).reshape(shape)
        sigma = np.asarray(sigma, dtype=dtype).reshape(shape)
        return alpha * x0 + sigma * np.asarray(noise, dtype=dtype)
