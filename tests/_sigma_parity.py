"""Tolerances shared by the Euler / Euler ancestral / Heun parity tests (sigma-space schedulers).

diffusers keeps its schedule in float32, so its own arrays are inexact where the schedule is extreme
(docs/parity.md):

* sigma_max > 1e3 (squaredcos_cap_v2, zero terminal SNR, our `cosine`): the first steps cancel a sample of
  size ~4 sigma_max, so float32 rounding alone is ~1e-2 at sigma_max ~ 2e4, and proportionally more above
  (tolerance 1e-2 * max(1, sigma_max / 1e4));
* sigma_min < 5e-3 (our `karras` schedule, sigma_min = 0.002): 1 - abar_0 ~ 4e-6 keeps fewer than 3 digits
  in float32, so diffusers' smallest sigmas are ~0.5% off.

Elsewhere every prev_sample agrees to 1e-4 (worst over Euler's full cross product of 38400 cases: 8.7e-5).
Timesteps of Karras / exponential / beta sigmas are mapped back through diffusers' float32 alphas_cumprod;
the atol per category below is ~2x the worst measured over Euler's and Heun's full cross products (n in
{1, 2, 7, 10, 50}, every spacing and offset): 9.0e-3 normally, 0.164 with sigma_min < 5e-3, 0.107 with
sigma_max > 1e3, 0.50 with both (our `karras` schedule with zero terminal SNR).

``case_config`` and ``sigma_parity_error`` build and run one sweep case the same way for the three schedulers.
"""

from __future__ import annotations

from _parity import run_parity

CONVERSION_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
#: the ``sigmas`` axis of the Euler and Heun sweeps: no conversion, or one of the sigma lists
CONVERSIONS = {
    None: {},
    "karras": {"use_karras_sigmas": True},
    "exp": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}


def schedule_extremes(ours) -> tuple[bool, bool, float]:
    """(sigma_max > 1e3, sigma_min < 5e-3, sigma_max) of our float64 training sigmas."""
    s = ours._train_sigmas()
    return bool(s.max() > 1e3), bool(s.min() < 5e-3), float(s.max())


def sample_tolerance(ours) -> float:
    big, tiny, smax = schedule_extremes(ours)
    if big:
        return 1e-2 * max(1.0, smax / 1e4)
    if tiny:
        return 1e-2
    return 1e-4


def timestep_atol(cfg: dict, ours) -> float:
    big, tiny, _ = schedule_extremes(ours)
    if any(cfg.get(k) for k in CONVERSION_KEYS):
        return {(False, False): 2e-2, (False, True): 3e-1, (True, False): 2e-1, (True, True): 1.0}[(big, tiny)]
    if cfg.get("timestep_type") == "continuous" and cfg.get("prediction_type") == "v_prediction":
        return 5e-4 if not (big or tiny) else 5e-3  # 0.25 * log(sigma): float32 vs float64 sigmas
    return 0.0  # the spaced schedules are computed with diffusers' own NumPy calls: exact


def case_config(case: dict, keys) -> dict:
    """The scheduler config of a sweep case: the values of ``keys``, plus the conversion its ``sigmas`` names."""
    return {**{k: case[k] for k in keys}, **CONVERSIONS[case["sigmas"]]}


def sigma_parity_error(ours_cls, diffusers_cls, cfg: dict, steps: int, step_kwargs=None, no_generator=False):
    """Ours built from ``cfg`` and diffusers' twin from the config ours saves for it (trained_betas for our own
    schedules), run through ``steps`` steps by _parity.run_parity (timesteps within ``timestep_atol``; both
    wrapped in NoGenerator when ``no_generator``): (ours, the worst relative error of a prev_sample)."""
    ours = ours_cls(**cfg)
    theirs = diffusers_cls.from_config(ours.diffusers_config())
    a, b = (NoGenerator(ours), NoGenerator(theirs)) if no_generator else (ours, theirs)
    return ours, run_parity(a, b, steps, step_kwargs=step_kwargs, timestep_atol=timestep_atol(cfg, ours))


class NoGenerator:
    """Wraps a scheduler whose step() takes no generator (Heun) so that _parity.run_parity can drive it."""

    def __init__(self, scheduler):
        self._s = scheduler

    def __getattr__(self, name):
        return getattr(self._s, name)

    def step(self, *args, generator=None, **kwargs):
        return self._s.step(*args, **kwargs)
