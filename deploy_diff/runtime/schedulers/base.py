"""What every NumPy scheduler shares: config handling, the beta schedule, noising, thresholding.

A scheduler's constructor keyword arguments *are* its config (as in diffusers): ``@register_to_config``
records them, ``save_config(dir)`` writes them to ``scheduler_config.json`` and ``from_config`` reads
them back, tolerating diffusers' extra keys (``_class_name``, ``_diffusers_version``, keys of other
scheduler classes).

Conventions: schedule arrays and per-step coefficients are float64; samples and model outputs keep their
own dtype (coefficients are applied as Python floats, so a float32 sample stays float32).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .._fileio import atomic_write_text
from ..arguments import check_num_inference_steps
from ..rng import randn_tensor
from .beta_schedules import alphas_cumprod_from_betas, get_betas, rescale_zero_terminal_snr
from .sigmas import (
    ZERO_SNR_ALPHA_CUMPROD,
    diffusers_float32_alphas_cumprod,
    sigma_to_t,  # noqa: F401  (importable from here, as before)
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)

CONFIG_NAME = "scheduler_config.json"

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Config keys that belong to some diffusers scheduler (or pipeline bookkeeping): a config of another class
# carries them, so they are ignored silently; anything else warns.
_KNOWN_FOREIGN_KEYS = {
    "skip_prk_steps",
    "interpolation_type",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_flow_sigmas",
    "flow_shift",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "invert_sigmas",
    "shift_terminal",
    "time_shift_type",
    "lambda_min_clipped",
    "variance_type",
    "euler_at_final",
    "use_lu_lambdas",
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "predict_x0",
    "disable_corrector",
    "solver_p",
    "final_sigmas_type",
    "timestep_type",
    "rescale_betas_zero_snr",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "solver_order",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "use_karras_sigmas",
    "steps_offset",
    "timestep_spacing",
    "trained_betas",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "rho",
    "s_noise",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "sde_type",
    "time_shift",
    "stochastic_sampling",
    "original_inference_steps",
    "timestep_scaling",
}


@dataclass
class SchedulerOutput:
    """Result of ``step``: ``prev_sample`` (x_{t-1}, the next sample of the loop) and, where the algorithm
    defines one, ``pred_original_sample`` (the model's estimate of x_0)."""

    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None

    def __iter__(self):  # allows ``prev, x0 = scheduler.step(...)``
        yield self.prev_sample
        yield self.pred_original_sample


class SchedulerConfig(dict):
    """The constructor kwargs of a scheduler (a plain dict), remembering which were left at their default.

    diffusers keeps that list (``_use_default_values``) so that ``Other.from_config(s.config)`` takes
    ``Other``'s own defaults for them; ``from_config`` does the same with ours.
    """

    def __init__(self, values: dict[str, Any], use_default_values: list[str] | None = None):
        super().__init__(values)
        self.use_default_values = list(use_default_values or [])


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def register_to_config(init):
    """Decorator for a scheduler's ``__init__``: records its keyword arguments as ``self.config``."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if args:
            raise TypeError(f"{type(self).__name__} takes keyword arguments only")
        unknown = set(kwargs) - set(signature.parameters)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {sorted(unknown)}; "
                f"expected some of {sorted(p for p in signature.parameters if p != 'self')}"
            )
        bound = signature.bind(self, **kwargs)
        bound.apply_defaults()
        values = {k: _jsonable(v) for k, v in bound.arguments.items() if k != "self"}
        self._config = SchedulerConfig(values, [k for k in values if k not in kwargs])
        init(self, **kwargs)

    return wrapper


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``scheduler_config.json`` from a folder or a file path; clear errors for missing/bad JSON."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no scheduler config at {p} (expected a folder holding {CONFIG_NAME} or a JSON file)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a JSON object; got {type(data).__name__}")
    return data


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}")


def dynamic_threshold(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Imagen, Saharia et al. 2022) of a predicted x_0 float[B, ...].

    Per image, s = clip(quantile(|x|, ``ratio``), 1, ``max_value``), and x is clipped to [-s, s] and divided by s.
    The quantile is np.quantile's / torch.quantile's linear interpolation, taken from one ``np.partition`` (the
    general ``np.quantile`` costs more than a whole step at small sizes) and interpolated in the array's dtype
    as np.quantile does, so the result is bit-identical to it. float16 is computed in float32.
    """
    batch = sample.shape[0]
    dtype = sample.dtype
    flat = sample.reshape(batch, -1)
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float32)
    if max_value == 1:  # s = clip(q, 1, 1) = 1 for every image: plain clipping
        return np.clip(flat, -1, 1).reshape(sample.shape).astype(dtype, copy=False)
    mag = np.abs(flat)
    n = mag.shape[1]
    pos = float(ratio) * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    part = np.partition(mag, (lo, hi) if hi != lo else lo, axis=1)
    v_lo, v_hi = part[:, lo], part[:, hi]
    diff = v_hi - v_lo  # np.quantile's two-sided lerp
    q = v_hi - diff * flat.dtype.type(1 - frac) if frac >= 0.5 else v_lo + diff * flat.dtype.type(frac)
    s = np.clip(q, 1, max_value).astype(flat.dtype, copy=False)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(sample.shape).astype(dtype, copy=False)


MIN_ALPHAS_CUMPROD = 1e-30  # sigma_max 1e15; diffusers' own schedules end at 1e-5 .. 1e-18 (linear, T=4000)


class BaseScheduler:
    """Shared machinery. Subclasses define ``__init__`` (decorated with ``@register_to_config``),
    ``set_timesteps`` and ``step``."""

    order: ClassVar[int] = 1
    #: beta schedules that diffusers' class of the same name accepts by name; others are saved as
    #: ``trained_betas`` so diffusers reproduces them exactly
    _diffusers_beta_schedules: ClassVar[tuple[str, ...]] = ("linear", "scaled_linear", "squaredcos_cap_v2")
    #: sigma-space schedulers take log(sigma): they refuse a schedule with sigma = 0 at t = 0 (beta_start = 0)
    _needs_positive_sigma_min: ClassVar[bool] = False
    #: sigma-space schedulers clamp a zero-SNR schedule's last alphas_cumprod to 2**-24, as diffusers' do
    _clamps_zero_snr: ClassVar[bool] = False
    _config: SchedulerConfig

    # -- config ------------------------------------------------------------------------------------
    @property
    def config(self) -> SchedulerConfig:
        """The constructor kwargs (a dict); ``type(s)(**s.config)`` rebuilds the scheduler."""
        return self._config

    @classmethod
    def _init_parameters(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def extract_init_dict(cls, config: Any) -> dict[str, Any]:
        """The kwargs of ``cls`` found in ``config`` (dict, path, or another scheduler's config)."""
        if isinstance(config, (str, os.PathLike)):
            config = read_config_file(config)
        elif hasattr(config, "config") and not isinstance(config, dict):
            config = config.config  # a scheduler instance (ours or diffusers')
        if not isinstance(config, dict):
            raise TypeError(
                f"config must be a dict, a scheduler, or a path to {CONFIG_NAME}; got {type(config).__name__}"
            )
        used_defaults = set(getattr(config, "use_default_values", None) or config.get("_use_default_values") or [])
        params = cls._init_parameters()
        init: dict[str, Any] = {}
        unknown = []
        for key, value in config.items():
            if key.startswith("_") or key in used_defaults:
                continue
            if key in params:
                init[key] = value
            elif key not in _KNOWN_FOREIGN_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: config keys {sorted(unknown)} are not expected and will be ignored",
                UserWarning,
                stacklevel=3,
            )
        return init

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any):
        """Build from a config dict, a scheduler, a folder holding ``scheduler_config.json``, or a JSON path.

        As diffusers' ``from_config``: keys of other scheduler classes are ignored, unknown keys warn,
        ``kwargs`` override the config. A config read from disk keeps every value it holds (so a DDPM
        bundle's ``leading`` spacing carries over to DPM-Solver++); an in-memory config drops the values
        that were only defaults of its own class.
        """
        init = cls.extract_init_dict(config)
        init.update(kwargs)
        return cls(**init)

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write ``scheduler_config.json`` (atomically) into ``save_directory``; return its path.

        The file loads in diffusers' class of the same name; a beta schedule diffusers does not know is
        written as ``trained_betas`` (the un-rescaled betas) so diffusers reproduces it exactly.
        """
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"save_config expects a folder; {out} is a file")
        data: dict[str, Any] = {"_class_name": type(self).__name__}
        data.update(self.diffusers_config())
        path = out / CONFIG_NAME
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
        return path

    def diffusers_config(self) -> dict[str, Any]:
        """The config as diffusers' class of the same name reads it (see ``save_config``)."""
        data = dict(self.config)
        schedule = data.get("beta_schedule")
        if data.get("trained_betas") is None and schedule not in self._diffusers_beta_schedules:
            data["trained_betas"] = self._raw_betas.tolist()
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(dict(self.config), default=str)})"

    # -- schedule ----------------------------------------------------------------------------------
    def _init_betas(
        self,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        trained_betas,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        """Set float64 ``betas``, ``alphas``, ``alphas_cumprod`` (and ``_raw_betas`` before rescaling)."""
        self._raw_betas = get_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        self.betas = rescale_zero_terminal_snr(self._raw_betas) if rescale_betas_zero_snr else self._raw_betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        if self._needs_positive_sigma_min and self.alphas_cumprod[0] >= 1.0:
            raise ValueError(
                f"{type(self).__name__} works in log-sigma space and needs sigma > 0 at every training "
                "timestep; beta_start=0 makes sigma at t = 0 exactly 0. Use beta_start > 0 (DDPM and "
                "DDIM accept 0)"
            )
        if self.alphas_cumprod[-1] >= 1.0:
            raise ValueError(
                "this schedule adds no noise at all (every beta is 0, alphas_cumprod stays 1): no model "
                "can be sampled from it; check beta_start / beta_end"
            )
        if not rescale_betas_zero_snr and not self.alphas_cumprod[-1] >= MIN_ALPHAS_CUMPROD:
            sigma_max = math.sqrt((1 - self.alphas_cumprod[-1]) / max(self.alphas_cumprod[-1], 1e-300))
            raise ValueError(
                f"this schedule's alphas_cumprod underflows to {self.alphas_cumprod[-1]:.3g} at the last "
                f"training timestep (sigma_max {sigma_max:.3g}): no sampler stays finite there. Use fewer "
                "timesteps, smaller betas, or rescale_betas_zero_snr=True for a zero terminal SNR"
            )
        if rescale_betas_zero_snr and self._clamps_zero_snr:
            # as diffusers' sigma-space schedulers: abar_{T-1} = 0 would make the first sigma infinite
            self.alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        self._ac32: np.ndarray | None = None
        self.num_inference_steps: int | None = None

    def _train_sigmas(self) -> np.ndarray:
        """float64[T] sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0 .. T-1 (ascending in t)."""
        return sigmas_from_alphas_cumprod(self.alphas_cumprod)

    def _alphas_cumprod_f32(self) -> np.ndarray:
        """float32[T] alphas_cumprod as diffusers holds it (cached; see :func:`diffusers_float32_alphas_cumprod`)."""
        if self._ac32 is None:
            c = self.config
            linspace = None
            if c["trained_betas"] is None and c["beta_schedule"] in ("linear", "scaled_linear"):
                linspace = (c["beta_start"], c["beta_end"], c["beta_schedule"] == "scaled_linear")
            self._ac32 = diffusers_float32_alphas_cumprod(
                self._raw_betas, c.get("rescale_betas_zero_snr", False), linspace
            )
        return self._ac32

    def _check_num_inference_steps(self, num_inference_steps: Any) -> int:
        return check_num_inference_steps(num_inference_steps, self.config["num_train_timesteps"])

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """int64[n] descending timesteps for ``timestep_spacing`` (diffusers' DDPM/DDIM rule)."""
        c = self.config
        return spaced_timesteps(c["num_train_timesteps"], num_inference_steps, c["timestep_spacing"], c["steps_offset"])

    def _validate_common(self) -> None:
        c = self.config
        check_choice("prediction_type", c["prediction_type"], PREDICTION_TYPES)
        if "timestep_spacing" in c:
            check_choice("timestep_spacing", c["timestep_spacing"], TIMESTEP_SPACINGS)
        if "steps_offset" in c and (not isinstance(c["steps_offset"], (int, np.integer)) or c["steps_offset"] < 0):
            raise ValueError(f"steps_offset must be a non-negative int; got {c['steps_offset']!r}")
        for key in ("dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value"):
            if key in c and (isinstance(c[key], bool) or not isinstance(c[key], (int, float, np.integer, np.floating))):
                raise ValueError(f"{key} must be a number; got {c[key]!r}")
        for key in ("dynamic_thresholding_ratio",):
            if key in c and not 0 < c[key] <= 1:
                raise ValueError(f"{key} must lie in (0, 1]; got {c[key]!r}")
        for key in ("clip_sample_range", "sample_max_value"):
            if key in c and not c[key] > 0:
                raise ValueError(f"{key} must be > 0; got {c[key]!r}")

    def __len__(self) -> int:
        return int(self.config["num_train_timesteps"])

    # -- step index (diffusers' API of the stateful schedulers) -------------------------------------
    @property
    def step_index(self) -> int | None:
        """Index of the current timestep into ``timesteps``; None until the first step. +1 per step."""
        return self.__dict__.get("_step_index")

    @property
    def begin_index(self) -> int | None:
        """The first index, when a pipeline set one with ``set_begin_index`` (e.g. img2img)."""
        return self.__dict__.get("_begin_index")

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]`` instead of looking the first timestep up."""
        n = len(self.timesteps) if self.num_inference_steps is not None else None
        if (
            isinstance(begin_index, bool)
            or not isinstance(begin_index, (int, np.integer))
            or begin_index < 0
            or (n is not None and begin_index >= n)
        ):
            raise ValueError(
                f"begin_index must be an int in [0, {n if n is not None else 'len(timesteps)'}); got {begin_index!r}"
            )
        self._begin_index = int(begin_index)

    # -- helpers for steps ---------------------------------------------------------------------------
    def _threshold_sample(self, sample: np.ndarray) -> np.ndarray:
        """Dynamic thresholding of a predicted x_0 with this config (see :func:`dynamic_threshold`)."""
        return dynamic_threshold(sample, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"])

    def _clip_or_threshold(self, x0: np.ndarray, inplace: bool = False) -> np.ndarray:
        """Apply ``thresholding`` or ``clip_sample`` to a predicted x_0 (in place when ``inplace``)."""
        c = self._config
        if c.get("thresholding"):
            return self._threshold_sample(x0)
        if c.get("clip_sample"):
            r = c["clip_sample_range"]
            return np.clip(x0, -r, r, out=x0 if inplace else None)
        return x0

    def _check_x0(self, x0: np.ndarray, t: int, a_t: float) -> None:
        """At a zero-SNR timestep (alphas_cumprod = 0) epsilon prediction cannot give x_0: refuse clearly
        where diffusers would return inf/NaN (it stays finite only when clipping catches the infinities)."""
        if a_t == 0.0 and not np.isfinite(x0).all():
            raise ValueError(
                f"timestep {t} has alphas_cumprod = 0 (zero terminal SNR), where prediction_type="
                f"{self.config['prediction_type']!r} cannot recover x_0; use prediction_type='v_prediction', "
                "clip_sample=True, or a timestep_spacing that skips the last timestep ('leading')"
            )

    @staticmethod
    def _noise(shape, generator, dtype) -> np.ndarray:
        return randn_tensor(shape, generator=generator, dtype=dtype)

    @staticmethod
    def _check_step_inputs(model_output: np.ndarray, sample: np.ndarray) -> None:
        if not isinstance(sample, np.ndarray) or not isinstance(model_output, np.ndarray):
            raise TypeError(
                "step() takes NumPy arrays for model_output and sample; got "
                f"{type(model_output).__name__} and {type(sample).__name__}"
            )

    # -- forward process (training uses these same arrays) -------------------------------------------
    def _per_sample(self, values: np.ndarray, timesteps, ndim: int, dtype) -> np.ndarray:
        t = np.asarray(timesteps)
        if t.dtype.kind not in "iu":
            if not np.all(np.equal(np.mod(t, 1), 0)):
                raise ValueError("add_noise/get_velocity take integer timesteps in [0, num_train_timesteps)")
            t = t.astype(np.int64)
        T = len(values)
        if t.size and (t.min() < 0 or t.max() >= T):
            raise ValueError(f"timesteps must lie in [0, {T}); got min {t.min()}, max {t.max()}")
        v = values[t.reshape(-1)].astype(dtype)
        return v.reshape(v.shape + (1,) * (ndim - 1))

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * noise; timesteps int[B] (one per batch entry)."""
        x0 = np.asarray(original_samples)
        dtype = x0.dtype if x0.dtype.kind == "f" else np.float32
        a = self._per_sample(np.sqrt(self.alphas_cumprod), timesteps, x0.ndim, dtype)
        s = self._per_sample(np.sqrt(1.0 - self.alphas_cumprod), timesteps, x0.ndim, dtype)
        return a * x0 + s * np.asarray(noise, dtype=dtype)

    def get_velocity(self, sample: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x_0 (the v-prediction target)."""
        x0 = np.asarray(sample)
        dtype = x0.dtype if x0.dtype.kind == "f" else np.float32
        a = self._per_sample(np.sqrt(self.alphas_cumprod), timesteps, x0.ndim, dtype)
        s = self._per_sample(np.sqrt(1.0 - self.alphas_cumprod), timesteps, x0.ndim, dtype)
        return a * np.asarray(noise, dtype=dtype) - s * x0
