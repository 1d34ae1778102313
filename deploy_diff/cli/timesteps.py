"""``deploy-diff timesteps``: the timesteps (and sigmas) a scheduler would use (no torch)."""

from __future__ import annotations

import argparse
import json

from ._common import add_command

NAME = "timesteps"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, NAME, help="print the timesteps and sigmas a scheduler would use")
    p.add_argument(
        "config",
        nargs="?",
        help="scheduler_config.json or a folder holding one (default: diffusers' defaults for --scheduler)",
    )
    p.add_argument(
        "--scheduler",
        help="ddpm, ddim, dpmsolver++, sde-dpmsolver++, euler, euler_a, heun, unipc, pndm, lcm "
        "(default: the config's _class_name)",
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--set", help="JSON object of config overrides")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the timesteps (and sigmas) a scheduler would use."""
    import numpy as np

    from ..runtime.schedulers import load_scheduler, scheduler_from_name

    try:
        overrides = json.loads(args.set) if args.set else {}
    except json.JSONDecodeError as e:
        raise ValueError(f'--set is not valid JSON ({e}); e.g. \'{{"timestep_spacing": "trailing"}}\'') from None
    if not isinstance(overrides, dict):
        raise ValueError('--set takes a JSON object, e.g. \'{"timestep_spacing": "trailing"}\'')
    if args.config:
        scheduler = (
            scheduler_from_name(args.scheduler, args.config, **overrides)
            if args.scheduler
            else load_scheduler(args.config, **overrides)
        )
    else:
        scheduler = scheduler_from_name(args.scheduler or "ddim", {}, **overrides)
    scheduler.set_timesteps(args.steps)
    out = {
        "scheduler": type(scheduler).__name__,
        "config": dict(scheduler.config),
        "timesteps": np.asarray(scheduler.timesteps).tolist(),
        "init_noise_sigma": float(scheduler.init_noise_sigma),
    }
    if hasattr(scheduler, "sigmas"):
        out["sigmas"] = np.asarray(scheduler.sigmas).tolist()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['scheduler']}, {args.steps} steps, init_noise_sigma = {out['init_noise_sigma']:.6g}")
        print("timesteps:", " ".join(f"{t:g}" for t in out["timesteps"]))
        if "sigmas" in out:
            print("sigmas:   ", " ".join(f"{s:.4g}" for s in out["sigmas"]))
    return 0
