"""Schedule arrays against independent float64 computations (1e-12) and against diffusers (float32)."""

import math

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar as d_betas_for_alpha_bar
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as d_rescale

from deploy_diff.runtime.schedulers.beta_schedules import (
    DIFFUSERS_SCHEDULES,
    SCHEDULES,
    alphas_cumprod_from_betas,
    get_betas,
    karras_betas,
    karras_sigmas,
    rescale_zero_terminal_snr,
)


def _reference_betas(name, T, b0=1e-4, b1=0.02):
    """Element-by-element float64 reference written independently of schedules.py (plain math)."""
    if name == "linear":
        return [b0 + (b1 - b0) * i / (T - 1) for i in range(T)] if T > 1 else [b0]
    if name in ("scaled_linear", "quadratic"):
        s0, s1 = math.sqrt(b0), math.sqrt(b1)
        return [(s0 + (s1 - s0) * i / (T - 1)) ** 2 for i in range(T)] if T > 1 else [b0]
    if name == "sigmoid":
        return [1 / (1 + math.exp(-(-6 + 12 * i / (T - 1)))) * (b1 - b0) + b0 for i in range(T)]
    if name == "iddpm_linear":
        return [(b0 + (b1 - b0) * i / (T - 1)) * 1000 / T for i in range(T)]
    if name == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    if name == "cosine":  # the DDPM/DDIM reference formulation's cosine, literally
        f = [math.cos(((x / T) + 0.008) / 1.008 * math.pi * 0.5) ** 2 for x in range(T + 1)]
        f = [v / f[0] for v in f]
        return [min(max(1 - f[i + 1] / f[i], 1e-4), 0.9999) for i in range(T)]
    if name == "karras":
        lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
        sig = [(lo + (hi - lo) * i / (T - 1)) ** 7 for i in range(T)]  # rising along t
        abar = [1 / (1 + s * s) for s in sig]
        return [1 - abar[0]] + [1 - abar[i] / abar[i - 1] for i in range(1, T)]
    raise KeyError(name)


@pytest.mark.parametrize("T", [10, 1000, 37])
@pytest.mark.parametrize(
    "name", ["linear", "scaled_linear", "quadratic", "sigmoid", "iddpm_linear", "squaredcos_cap_v2", "cosine", "karras"]
)
def test_betas_equal_independent_float64(name, T):
    if name == "iddpm_linear" and T == 10:
        with pytest.raises(ValueError, match="scales beta_end to 2"):  # 0.02 * 1000 / 10 >= 1
            get_betas(name, T)
        return
    ours = get_betas(name, T)
    assert ours.dtype == np.float64 and ours.shape == (T,)
    np.testing.assert_allclose(ours, _reference_betas(name, T), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_diffusers_names_mean_what_diffusers_means(name):
    import diffusers

    theirs = diffusers.DDPMScheduler(beta_schedule=name).betas.double().numpy()
    np.testing.assert_allclose(get_betas(name, 1000), theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["laplace", "exp"])
def test_alpha_bar_transforms_match_diffusers(kind):
    np.testing.assert_allclose(
        get_betas(kind, 1000), d_betas_for_alpha_bar(1000, alpha_transform_type=kind).numpy(), rtol=1e-6, atol=1e-9
    )


def test_quadratic_is_scaled_linear_and_iddpm_linear_is_not():
    np.testing.assert_array_equal(get_betas("quadratic", 500), get_betas("scaled_linear", 500))
    assert not np.allclose(get_betas("iddpm_linear", 500), get_betas("scaled_linear", 500))
    # iddpm_linear = linear scaled by 1000/T; equal to linear at T = 1000
    np.testing.assert_allclose(get_betas("iddpm_linear", 1000), get_betas("linear", 1000), atol=1e-15)
    np.testing.assert_allclose(get_betas("iddpm_linear", 500), 2 * get_betas("linear", 500), atol=1e-15)


def test_karras_rises_and_has_the_stated_alphas_cumprod():
    T = 1000
    abar = alphas_cumprod_from_betas(get_betas("karras", T))
    sig = karras_sigmas(0.002, 80.0, T)[::-1]
    assert np.all(np.diff(sig) > 0)
    np.testing.assert_allclose(abar, 1 / (1 + sig**2), rtol=1e-12)
    assert abar[-1] == pytest.approx(1 / (1 + 80.0**2), rel=1e-9)
    assert abar[0] == pytest.approx(1 / (1 + 0.002**2), rel=1e-12)


@pytest.mark.parametrize("name", ["karras_seed", "karras_literal"])
def test_seed_karras_literal_is_refused_with_explanation(name):
    with pytest.raises(ValueError, match="degenerate|negative") as e:
        get_betas(name, 1000)
    assert "0.905" in str(e.value) and "karras" in str(e.value)
    with pytest.raises(ValueError, match="0.905"):
        karras_betas(1000, sigma_rising=False)


def test_seed_karras_literal_really_is_degenerate():
    """The claim in the refusal message, checked: the literal formula's betas all clip to 1e-4."""
    T = 1000
    sig = np.concatenate([karras_sigmas(0.002, 80.0, T), [0.0]])
    abar = 1 / (1 + sig**2)
    abar = abar / abar[0]
    raw = 1 - abar[1:] / abar[:-1]
    assert np.all(raw < 0)
    betas = np.clip(raw, 1e-4, 0.9999)
    assert alphas_cumprod_from_betas(betas)[-1] == pytest.approx(0.905, abs=1e-3)


def test_seed_cosine_clips_and_normalises():
    b = get_betas("cosine", 1000)
    assert b.min() >= 1e-4 and b.max() <= 0.9999
    assert b.max() == 0.9999  # the last beta hits the clip


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_rescale_zero_terminal_snr_matches_diffusers_in_float64(name):
    betas = get_betas(name, 1000)
    ours = rescale_zero_terminal_snr(betas)
    theirs = d_rescale(torch.from_numpy(betas.copy())).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    abar = alphas_cumprod_from_betas(ours)
    assert abar[-1] == pytest.approx(0.0, abs=1e-20)
    assert abar[0] == pytest.approx(alphas_cumprod_from_betas(betas)[0], rel=1e-12)


def test_karras_sigmas_match_formula():
    s = karras_sigmas(0.1, 10.0, 5, rho=7.0)
    ramp = np.linspace(0, 1, 5)
    ref = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, ref, rtol=1e-14)
    assert s[0] == pytest.approx(10.0) and s[-1] == pytest.approx(0.1)


def test_trained_betas_win_and_are_checked():
    tb = np.linspace(1e-3, 0.5, 20)
    np.testing.assert_array_equal(get_betas("linear", 20, trained_betas=tb), tb)
    with pytest.raises(ValueError, match="expected num_train_timesteps=10"):
        get_betas("linear", 10, trained_betas=tb)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        get_betas("linear", 3, trained_betas=[0.1, 1.5, 0.2])


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_betas("cosin", 1000)
    for name in SCHEDULES:
        assert name in str(e.value)
    assert set(DIFFUSERS_SCHEDULES) < set(SCHEDULES)


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_num_train_timesteps(T):
    with pytest.raises(ValueError, match="num_train_timesteps"):
        get_betas("linear", T)
