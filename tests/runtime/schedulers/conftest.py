"""The diffusers oracle of the scheduler tests computes float32 square roots correctly rounded.

diffusers builds its float32 schedule arrays with torch (``alphas_cumprod.sqrt()`` in the zero-terminal-SNR
rescale, ``((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`` for the sigmas). torch's CPU float32 ``sqrt`` is not
correctly rounded on every machine: with torch 2.13 on an AMD EPYC (AVX-512) about 20% of its results are one
unit in the last place off the IEEE result, while on other CPUs they are exact. A one-ulp change in
``alphas_cumprod`` can move a timestep that DPM-Solver or UniPC derive from it, so the same test would pass on one
CI machine and fail on another. The runtime computes the IEEE result (numpy's ``sqrt`` is correctly rounded
everywhere), and here the oracle does too: a float32 ``sqrt`` is taken in float64 and rounded once to float32,
which is the correctly rounded float32 square root (53 >= 2 * 24 + 2 bits, so the double rounding is exact).
On a machine whose torch ``sqrt`` is already exact this changes nothing.
"""

import pytest
import torch

_SQRT = torch.sqrt
_POW = torch.Tensor.__pow__


def _ieee_sqrt(x, *args, **kwargs):
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not args and not kwargs:
        return _SQRT(x.double()).float()
    return _SQRT(x, *args, **kwargs)


def _ieee_pow(self, exponent):
    if isinstance(exponent, float) and exponent == 0.5 and self.dtype == torch.float32:
        return _ieee_sqrt(self)
    return _POW(self, exponent)


@pytest.fixture(autouse=True)
def correctly_rounded_torch_sqrt(monkeypatch):
    monkeypatch.setattr(torch, "sqrt", _ieee_sqrt)
    monkeypatch.setattr(torch.Tensor, "sqrt", _ieee_sqrt)
    monkeypatch.setattr(torch.Tensor, "__pow__", _ieee_pow)


def test_the_oracle_sqrt_is_correctly_rounded():
    import numpy as np

    x = torch.rand(20000, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    want = np.sqrt(x.numpy().astype(np.float64)).astype(np.float32)  # float64 sqrt rounded once
    assert np.array_equal(torch.sqrt(x).numpy(), want)
    assert np.array_equal(x.sqrt().numpy(), want)
    assert np.array_equal((x**0.5).numpy(), want)
    assert np.array_equal(np.sqrt(x.numpy()), want)  # what the runtime computes
