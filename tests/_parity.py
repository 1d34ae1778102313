"""Shared parity harness: drive one of our schedulers and diffusers' twin through the same loop.

Both loops start from the same latents (drawn by torch and by our TorchGenerator from one seed), call the
same deterministic fake model on their own inputs, and draw step noise from matched generators. Every
``prev_sample`` is compared: max|ours - theirs| / max(1, max|theirs|).
"""

from __future__ import annotations

import numpy as np
import torch

from deploy_diff.runtime._numeric import relative_error
from deploy_diff.runtime.rng import TorchGenerator

_PATTERN_CACHE: dict[tuple, np.ndarray] = {}


def _pattern(shape) -> np.ndarray:
    key = tuple(shape)
    if key not in _PATTERN_CACHE:
        _PATTERN_CACHE[key] = np.random.default_rng(1234).standard_normal(shape).astype(np.float32)
    return _PATTERN_CACHE[key]


def fake_model(x: np.ndarray, t: float, out_channels: int | None = None) -> np.ndarray:
    """A deterministic, bounded stand-in for a UNet: depends on the input and on the timestep."""
    x = np.asarray(x, dtype=np.float32)
    base = 0.5 * np.tanh(x) + 0.3 * np.sin(_pattern(x.shape) + np.float32(t) * np.float32(0.01))
    if out_channels is not None and out_channels != x.shape[1]:
        extra = np.tanh(0.5 * _pattern(x.shape) + np.float32(t) * np.float32(1e-3))
        base = np.concatenate([base, extra[:, : out_channels - x.shape[1]]], axis=1)
    return base.astype(np.float32)


def rel_err(ours: np.ndarray, theirs) -> float:
    theirs = theirs.detach().cpu().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    return relative_error(ours, theirs)


def run_parity(
    ours,
    theirs,
    num_inference_steps: int,
    shape=(2, 3, 8, 8),
    seed: int = 0,
    step_kwargs: dict | None = None,
    out_channels: int | None = None,
    check_timesteps: bool = True,
    timestep_atol: float = 0.0,
) -> float:
    """Run both schedulers over a full loop; return the worst relative error over every prev_sample."""
    step_kwargs = step_kwargs or {}
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    t_ours = np.asarray(ours.timesteps)
    t_theirs = theirs.timesteps.cpu().numpy()
    if check_timesteps:
        assert t_ours.shape == t_theirs.shape, (t_ours, t_theirs)
        assert t_ours.dtype.kind == t_theirs.dtype.kind, (t_ours.dtype, t_theirs.dtype)
        np.testing.assert_allclose(t_ours, t_theirs, rtol=0, atol=timestep_atol)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x_t = latents * theirs.init_noise_sigma
    x_o = TorchGenerator(seed).randn(shape) * np.float32(ours.init_noise_sigma)
    g_t = torch.Generator().manual_seed(seed + 1)
    g_o = TorchGenerator(seed + 1)
    worst = 0.0
    for i, (to, tt) in enumerate(zip(t_ours, theirs.timesteps)):
        inp_o = ours.scale_model_input(x_o, to)
        inp_t = theirs.scale_model_input(x_t, tt)
        mo = fake_model(inp_o, float(to), out_channels)
        mt = torch.from_numpy(fake_model(inp_t.numpy(), float(tt), out_channels))
        x_o = ours.step(mo, to, x_o, generator=g_o, **step_kwargs).prev_sample
        x_t = theirs.step(mt, tt, x_t, generator=g_t, **step_kwargs).prev_sample
        assert x_o.dtype == np.float32, f"step {i}: sample dtype became {x_o.dtype}"
        assert np.all(np.isfinite(x_o)), f"step {i} (t={to}): non-finite sample"
        worst = max(worst, rel_err(x_o, x_t))
    return worst
