"""Beta (noise) schedules, zero-terminal-SNR rescaling and the Karras beta schedule, all in float64.

One name, one meaning. diffusers' names keep diffusers' meaning, so any diffusers
``scheduler_config.json`` loads unchanged:

============================  =====================================================================
name                          betas (T = num_train_timesteps)
============================  =====================================================================
``linear``                    ``linspace(beta_start, beta_end, T)``
``scaled_linear``             ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (diffusers' name;
                              the DDPM/DDIM reference formulation calls this "quadratic")
``squaredcos_cap_v2``         improved-DDPM cosine through ``betas_for_alpha_bar``, capped at 0.999
``sigmoid``                   ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start``
``laplace`` / ``exp``         diffusers' other ``betas_for_alpha_bar`` transforms
============================  =====================================================================

Schedules of the DDPM/DDIM reference formulation that diffusers does not have get names of their own:

============================  =====================================================================
``quadratic``                 identical to ``scaled_linear``
``cosine``                    the reference cosine exactly: s = 0.008, T + 1 points, alphas_cumprod
                              normalised by its first value, betas clipped to [1e-4, 0.9999]
``iddpm_linear``              improved-DDPM's ``linear`` scaled by 1000 / T (the reference formulation's
                              "scaled linear"; never called ``scaled_linear`` here)
``karras``                    alphas_cumprod = 1 / (1 + sigma_t^2) with Karras sigmas *rising* along t
                              from sigma_min = 0.002 to sigma_max = 80 (rho = 7)
============================  =====================================================================

The reference formulation's literal Karras formula (sigma *falling* along t) is degenerate and refused by
the name ``karras_seed``: see :func:`karras_betas`. Sigma lists for sampling (Karras, exponential, beta)
live in :mod:`.sigmas`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .sigmas import karras_sigmas

__all__ = [
    "DIFFUSERS_SCHEDULES",
    "OWN_SCHEDULES",
    "SCHEDULES",
    "alphas_cumprod_from_betas",
    "betas_for_alpha_bar",
    "get_betas",
    "karras_betas",
    "karras_sigmas",
    "rescale_zero_terminal_snr",
]

#: schedules diffusers knows by name (with the same meaning)
DIFFUSERS_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")
#: schedules of the DDPM/DDIM reference formulation that diffusers does not have
OWN_SCHEDULES = ("cosine", "quadratic", "iddpm_linear", "karras")
SEED_SCHEDULES = OWN_SCHEDULES  # the former name, kept importable
#: every valid ``beta_schedule`` value
SCHEDULES = DIFFUSERS_SCHEDULES + OWN_SCHEDULES

_FALLING_KARRAS_EXPLANATION = (
    "the literal Karras beta formula of the DDPM/DDIM reference formulation is refused: its sigmas fall "
    "from sigma_max=80 at t=0 to sigma_min=0.002 at t=T-1, so alphas_cumprod *rises* along t, every raw "
    "beta is negative, all of them clip to 1e-4 and alphas_cumprod at T-1 is ~0.905 (the model would almost "
    "never see noise). Use beta_schedule='karras', which puts sigma rising along t (0.002 -> 80) with "
    "alphas_cumprod = 1 / (1 + sigma^2)."
)


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine"
) -> np.ndarray:
    """float64[T] betas from a continuous alpha_bar(t) on [0, 1] (diffusers' ``betas_for_alpha_bar``)."""
    if alpha_transform_type == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":

        def alpha_bar(t: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    elif alpha_transform_type == "exp":

        def alpha_bar(t: float) -> float:
            return math.exp(t * -12.0)
    else:
        raise ValueError(f"alpha_transform_type={alpha_transform_type!r}; expected 'cosine', 'laplace' or 'exp'")
    T = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)], dtype=np.float64)


def karras_betas(
    num_train_timesteps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigma_rising: bool = True,
) -> np.ndarray:
    """float64[T] betas whose alphas_cumprod is exactly ``1 / (1 + sigma_t^2)``.

    sigma_t rises along t from ``sigma_min`` (t = 0) to ``sigma_max`` (t = T - 1) on a Karras
    (rho = 7) spacing, so t = T - 1 is almost pure noise (alphas_cumprod ~ 1.6e-4 for sigma_max = 80).
    Betas are ``1 - abar_t / abar_{t-1}`` with ``abar_{-1} = 1``; no clipping is needed (they lie in
    (0, 1) by construction), so alphas_cumprod equals 1 / (1 + sigma^2) to float64 rounding.

    ``sigma_rising=False`` is the reference formulation's literal formula, which is refused (ValueError) with an
    explanation: it is degenerate.
    """
    if not sigma_rising:
        raise ValueError(_FALLING_KARRAS_EXPLANATION)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras schedule needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    sigmas = karras_sigmas(sigma_min, sigma_max, num_train_timesteps, rho)[::-1]
    alphas_cumprod = 1.0 / (1.0 + sigmas**2)
    prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / prev


MAX_TRAIN_TIMESTEPS = 1_000_000  # beyond any trained model; bounds allocations (and Python loops) by config


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1), float64."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    a0, aT = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    if not a0 - aT > 0:
        raise ValueError(
            "rescale_betas_zero_snr needs a schedule whose alphas_cumprod falls from the first to the "
            f"last timestep (here {a0**2:.6g} -> {aT**2:.6g}): use more timesteps or nonzero betas"
        )
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """float64[T] cumulative product of (1 - beta)."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def get_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """float64[T] betas for a schedule name (see the module docstring for the names).

    ``trained_betas``, when given, wins over ``beta_schedule`` (as in diffusers).
    """
    if (
        not isinstance(num_train_timesteps, (int, np.integer))
        or isinstance(num_train_timesteps, bool)
        or not 1 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS
    ):
        raise ValueError(
            f"num_train_timesteps must be an int in [1, {MAX_TRAIN_TIMESTEPS}]; got {num_train_timesteps!r}"
        )
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not np.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64).reshape(-1)
        if betas.size != T:
            raise ValueError(f"trained_betas has {betas.size} values; expected num_train_timesteps={T}")
        if not np.all(np.isfinite(betas)) or np.any(betas < 0) or np.any(betas >= 1):
            raise ValueError("trained_betas must be finite and lie in [0, 1)")
    else:
        if beta_schedule in ("karras_seed", "karras_literal"):
            raise ValueError(f"beta_schedule={beta_schedule!r}: {_FALLING_KARRAS_EXPLANATION}")
        if beta_schedule not in SCHEDULES:
            raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; expected one of {list(SCHEDULES)}")
        needs_range = beta_schedule in ("linear", "scaled_linear", "quadratic", "sigmoid", "iddpm_linear")
        if needs_range and not (0 <= beta_start < 1 and 0 <= beta_end < 1):
            raise ValueError(f"beta_start and beta_end must lie in [0, 1); got {beta_start}, {beta_end}")
        if beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        elif beta_schedule in ("scaled_linear", "quadratic"):
            betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(T)
        elif beta_schedule in ("laplace", "exp"):
            betas = betas_for_alpha_bar(T, alpha_transform_type=beta_schedule)
        elif beta_schedule == "sigmoid":
            x = np.linspace(-6, 6, T, dtype=np.float64)
            betas = 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start
        elif beta_schedule == "cosine":
            s = 0.008
            x = np.linspace(0, T, T + 1, dtype=np.float64)
            abar = np.cos(((x / T) + s) / (1 + s) * math.pi * 0.5) ** 2
            abar = abar / abar[0]
            betas = np.clip(1 - abar[1:] / abar[:-1], 0.0001, 0.9999)
        elif beta_schedule == "iddpm_linear":
            scale = 1000 / T
            betas = np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)
            if betas.max() >= 1:
                raise ValueError(f"iddpm_linear with T={T} scales beta_end to {betas.max():.4g} >= 1")
        else:  # karras
            betas = karras_betas(T)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas
