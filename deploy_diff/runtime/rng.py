"""torch-compatible normal noise without torch.

``TorchGenerator(seed).randn(shape)`` returns what
``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` returns on the CPU (to ~5e-7: torch's
vectorised log/cos/sin differ from NumPy's by an ulp or two), and successive calls continue the stream
exactly as torch's do. This is what lets the runtime reproduce diffusers' images for the same seed.

How torch draws (CPU generator, float32):

* the engine is mt19937 seeded with ``init_genrand(seed & 0xFFFFFFFF)``, the same engine and seeding as
  NumPy's legacy ``RandomState(seed)``, whose ``randint(0, 2**32, dtype=uint64)`` yields its raw outputs;
* 16 values or more: the buffer is filled with uniforms ``(u32 & 0xFFFFFF) * 2**-24``, then Box-Muller in
  float32 runs over each block of 16 (pairs j and j + 8); when the count is not a multiple of 16, 16 fresh
  uniforms are drawn and the last 16 positions are recomputed;
* fewer than 16 values: double precision, one 53-bit uniform per 64-bit draw (two 32-bit outputs), two
  normals per Box-Muller pair, the second cached in the generator for the next small draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["TorchGenerator", "randn_tensor"]

_TWO_PI_F32 = np.float32(2.0 * np.pi)


class TorchGenerator:
    """A NumPy re-implementation of torch's CPU ``Generator`` for ``randn``.

    Args:
        seed: as for ``torch.Generator().manual_seed(seed)``; only the low 32 bits reach the engine.
    """

    def __init__(self, seed: int = 0):
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> TorchGenerator:
        """Reseed (and clear the cached normal), as ``torch.Generator.manual_seed`` does."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}")
        self._seed = int(seed)
        self._mt = np.random.RandomState(int(seed) & 0xFFFFFFFF)
        self._next_normal: float | None = None
        return self

    def initial_seed(self) -> int:
        return self._seed

    # -- raw draws -------------------------------------------------------------------------------
    def _u32(self, n: int) -> np.ndarray:
        """n raw 32-bit outputs of the mt19937 engine, as uint64."""
        return self._mt.randint(0, 2**32, size=n, dtype=np.uint64)

    def _uniform_f32(self, n: int) -> np.ndarray:
        u = (self._u32(n) & np.uint64(0xFFFFFF)).astype(np.float32)
        u *= np.float32(2.0**-24)
        return u

    def _uniform_f64(self) -> float:
        hi, lo = (int(v) for v in self._u32(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    @staticmethod
    def _box_muller_16(u: np.ndarray, out: np.ndarray) -> None:
        """float32[k, 16] uniforms -> normals written into ``out`` float32[k, 16] (torch's
        ``normal_fill_16`` on each row: pairs j and j + 8)."""
        radius = np.log(np.float32(1.0) - u[:, :8])
        radius *= np.float32(-2.0)
        np.sqrt(radius, out=radius)
        theta = u[:, 8:] * _TWO_PI_F32
        np.multiply(radius, np.cos(theta), out=out[:, :8])
        np.multiply(radius, np.sin(theta), out=out[:, 8:])

    def _small_normal(self) -> float:
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        u1 = self._uniform_f64()
        u2 = self._uniform_f64()
        r = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._next_normal = float(r * np.sin(theta))
        return float(r * np.cos(theta))

    # -- public ----------------------------------------------------------------------------------
    def randn(self, shape: int | Sequence[int], dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Standard normals of ``shape`` (the values torch would give), cast to ``dtype``."""
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape must be non-negative; got {shape}")
        n = math.prod(shape)
        if n >= 16:
            data = self._uniform_f32(n)
            full = n - n % 16
            out = np.empty(n, dtype=np.float32)
            self._box_muller_16(data[:full].reshape(-1, 16), out[:full].reshape(-1, 16))
            if full != n:
                # torch recomputes the last 16 positions from 16 fresh uniforms
                self._box_muller_16(self._uniform_f32(16).reshape(1, 16), out[n - 16 :].reshape(1, 16))
        else:
            out = np.array([self._small_normal() for _ in range(n)], dtype=np.float64).astype(np.float32)
        return out.reshape(shape).astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"TorchGenerator(seed={self._seed})"


def _draw(generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    if isinstance(generator, TorchGenerator):
        return generator.randn(shape, dtype=dtype)
    if isinstance(generator, np.random.Generator):
        return generator.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    if isinstance(generator, np.random.RandomState):
        return generator.standard_normal(shape).astype(dtype, copy=False)
    raise TypeError(
        "generator must be a deploy_diff TorchGenerator, a numpy.random.Generator, a list of them (one per "
        f"image), or None; got {type(generator).__name__}"
    )


def randn_tensor(shape: Sequence[int], generator=None, dtype=np.float32) -> np.ndarray:
    """Normal noise drawn as diffusers' ``randn_tensor`` draws it.

    ``generator`` is one generator, a list of them with one per batch entry (each draws its own
    ``(1, *shape[1:])`` slice in order, so an image does not depend on the batch it is in), or None
    (a fresh, unseeded NumPy generator).
    """
    shape = tuple(int(s) for s in shape)
    if generator is None:
        return np.random.default_rng().standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            return _draw(generator[0], shape, dtype)
        if len(generator) != shape[0]:
            raise ValueError(
                f"got a list of {len(generator)} generators for a batch of {shape[0]}; pass one generator per image"
            )
        return np.concatenate([_draw(g, (1,) + shape[1:], dtype) for g in generator], axis=0)
    return _draw(generator, shape, dtype)
