"""Time per scheduler ``step()``: deploy-diff's NumPy schedulers against diffusers' (torch, CPU), same run.

    .venv/bin/python benchmarks/scheduler_step.py [--steps 50] [--repeats 5] [--json out.json]

For each scheduler and shape, both implementations run a full ``set_timesteps(steps)`` loop of
``scale_model_input()`` + ``step()`` calls with a fixed model output; the best of ``repeats`` loops is kept
and divided by the number of timesteps. The printed ratio is ours / diffusers (lower is better; the goal is <= 0.2).
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import time

import diffusers
import numpy as np
import torch

from deploy_diff.runtime import schedulers as ours_mod
from deploy_diff.runtime.rng import TorchGenerator

CASES = [
    ("DDIMScheduler", {}, {"eta": 0.0}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    ("UniPCMultistepScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {}, {}),
]
SHAPES = [(1, 4, 64, 64), (8, 1, 16, 16)]


def time_loop(scheduler, steps, model_output, x, kw, repeats, is_torch):
    """Best per-step time of ``scale_model_input`` + ``step`` over a full loop (stochastic schedulers get a
    seeded generator of their own kind)."""
    kw = dict(kw)
    if "generator" in inspect.signature(scheduler.step).parameters:
        kw["generator"] = torch.Generator().manual_seed(0) if is_torch else TorchGenerator(0)
    best = float("inf")
    for _ in range(repeats):
        scheduler.set_timesteps(steps)
        sample = x
        start = time.perf_counter()
        for t in scheduler.timesteps:
            scheduler.scale_model_input(sample, t)
            sample = scheduler.step(model_output, t, sample, **kw).prev_sample
        best = min(best, time.perf_counter() - start)
    return best / len(scheduler.timesteps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    print(
        f"# {platform.processor() or platform.machine()}, numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), diffusers {diffusers.__version__}"
    )
    print(f"{'scheduler':<30} {'shape':<16} {'ours us/step':>13} {'diffusers us/step':>18} {'ratio':>7}")
    rows = []
    for name, cfg, kw in CASES:
        if not hasattr(ours_mod, name):
            print(f"{name:<30} (not available)")
            continue
        for shape in SHAPES:
            x = TorchGenerator(0).randn(shape)
            eps = TorchGenerator(1).randn(shape) * np.float32(0.1)
            ours = getattr(ours_mod, name)(**cfg)
            theirs = getattr(diffusers, name)(**cfg)
            # warm up both
            time_loop(ours, args.steps, eps, x, kw, 1, False)
            time_loop(theirs, args.steps, torch.from_numpy(eps), torch.from_numpy(x), kw, 1, True)
            t_ours = time_loop(ours, args.steps, eps, x, kw, args.repeats, False)
            t_theirs = time_loop(theirs, args.steps, torch.from_numpy(eps), torch.from_numpy(x), kw, args.repeats, True)
            ratio = t_ours / t_theirs
            rows.append(
                {
                    "scheduler": name,
                    "shape": list(shape),
                    "ours_us": t_ours * 1e6,
                    "diffusers_us": t_theirs * 1e6,
                    "ratio": ratio,
                }
            )
            print(f"{name:<30} {str(shape):<16} {t_ours * 1e6:>13.1f} {t_theirs * 1e6:>18.1f} {ratio:>7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
