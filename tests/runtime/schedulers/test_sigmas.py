"""The pure functions of the scheduler core (schedulers/sigmas.py, base.dynamic_threshold) against independent
references: scipy for the beta quantiles (scipy is a dev dependency only), NumPy's quantile for thresholding,
float64 formulas for the denoised-and-slope step."""

import numpy as np
import pytest
import torch

from deploy_diff.runtime.schedulers.base import dynamic_threshold
from deploy_diff.runtime.schedulers.sigmas import (
    beta_ppf,
    beta_sigmas,
    betainc,
    denoised_and_slope,
    exponential_sigmas,
    karras_sigmas,
    multistep_spaced_timesteps,
    sigma_ramp,
    spaced_timesteps,
    torch_linspace_f32,
)


def test_beta_ppf_without_scipy_equals_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    q = np.concatenate([[0.0, 1e-9, 1e-6, 0.5, 1 - 1e-6, 1.0], np.linspace(0, 1, 101)])
    for a, b in [(0.6, 0.6), (2.0, 5.0), (0.5, 3.0)]:
        np.testing.assert_allclose(beta_ppf(q, a, b), scipy_stats.beta.ppf(q, a, b), atol=1e-12)
        x = np.linspace(0, 1, 57)
        np.testing.assert_allclose(betainc(a, b, x), scipy_stats.beta.cdf(x, a, b), atol=1e-13)


def test_sigma_lists_as_diffusers_writes_them():
    scipy_stats = pytest.importorskip("scipy.stats")
    lo, hi, n = 0.03, 14.6, 9
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    want = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    np.testing.assert_allclose(karras_sigmas(lo, hi, n), want, rtol=1e-15)
    np.testing.assert_allclose(exponential_sigmas(lo, hi, n), np.exp(np.linspace(np.log(hi), np.log(lo), n)))
    ppf = np.array([scipy_stats.beta.ppf(u, 0.6, 0.6) for u in 1 - np.linspace(0, 1, n)])
    np.testing.assert_allclose(beta_sigmas(lo, hi, n), lo + ppf * (hi - lo), rtol=1e-12)
    for kind in ("karras", "exponential", "beta"):
        s = sigma_ramp(kind, lo, hi, n)
        assert s[0] == pytest.approx(hi) and s[-1] == pytest.approx(lo) and np.all(np.diff(s) < 0)
        with pytest.raises(ValueError, match=f"use_{kind}_sigmas needs 0 < sigma_min"):
            sigma_ramp(kind, 0.0, hi, n)


def test_spacings():
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "leading", 1), [751, 501, 251, 1])
    np.testing.assert_array_equal(multistep_spaced_timesteps(1000, 4, "linspace", 0), [999, 749, 500, 250])
    assert multistep_spaced_timesteps(1000, 61, "trailing", 0)[-1] == -1  # kept as diffusers keeps it
    with pytest.raises(ValueError, match="timestep_spacing='middle'"):
        spaced_timesteps(1000, 4, "middle", 0)
    for n in (1, 2, 7, 1000, 1001):
        np.testing.assert_array_equal(
            torch_linspace_f32(1e-4, 0.02, n), torch.linspace(1e-4, 0.02, n, dtype=torch.float32).numpy()
        )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sigma, sigma_hat", [(3.0, 3.0), (0.5, 0.61), (40.0, 44.0)])
def test_denoised_and_slope_equals_its_definition(prediction_type, sigma, sigma_hat):
    """x_0 as diffusers forms it, and the slope (x - x_0) / sigma_hat (k-diffusion's to_d), in float64."""
    rng = np.random.default_rng(0)
    x, m = rng.standard_normal((2, 3, 4, 4)) * sigma, rng.standard_normal((2, 3, 4, 4))
    x0, d = denoised_and_slope(x, m, prediction_type, sigma, sigma_hat)
    want_x0 = {
        "epsilon": x - sigma_hat * m,
        "sample": m,
        "v_prediction": m * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1),
    }[prediction_type]
    np.testing.assert_allclose(x0, want_x0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d, (x - want_x0) / sigma_hat, rtol=1e-9, atol=1e-9 * sigma)
    x0c, dc = denoised_and_slope(x, m, prediction_type, sigma, sigma_hat, clip_range=1.0)
    np.testing.assert_allclose(x0c, np.clip(want_x0, -1, 1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dc, (x - np.clip(want_x0, -1, 1)) / sigma_hat, rtol=1e-12)


def _threshold_reference(x, ratio, max_value):
    """Imagen's dynamic thresholding with np.quantile (diffusers' _threshold_sample with torch.quantile)."""
    flat = x.reshape(x.shape[0], -1)
    s = np.quantile(np.abs(flat), ratio, axis=1)
    s = np.clip(s, 1, max_value).astype(flat.dtype)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x.shape)


def test_dynamic_threshold_equals_np_quantile_bit_for_bit():
    rng = np.random.default_rng(8)
    for smv, ratio in [(1.0, 0.995), (2.5, 0.9), (10.0, 0.995), (3.0, 1.0), (0.5, 0.995)]:
        for shape, scale in [((2, 3, 8, 8), 3.0), ((1, 4, 16, 16), 0.5), ((3, 1, 5, 7), 6.0)]:
            for dtype in (np.float32, np.float64):
                x = (rng.standard_normal(shape) * scale).astype(dtype)
                got = dynamic_threshold(x, ratio, smv)
                assert got.dtype == dtype
                np.testing.assert_array_equal(got, _threshold_reference(x, ratio, smv))
