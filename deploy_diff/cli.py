"""``deploy-diff``: the command line. Each subcommand imports its room lazily, so ``deploy-diff --help``
and the runtime commands never import torch.

Errors print one readable line and exit non-zero (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence


def _cmd_schedules(args: argparse.Namespace) -> int:
    """Print every beta schedule with its end points and terminal SNR."""
    import numpy as np

    from .runtime.schedules import DIFFUSERS_SCHEDULES, SCHEDULES, alphas_cumprod_from_betas, get_betas

    rows = []
    for name in SCHEDULES:
        try:
            betas = get_betas(name, args.num_train_timesteps, args.beta_start, args.beta_end,
                              rescale_betas_zero_snr=args.rescale_betas_zero_snr)
        except ValueError as e:  # e.g. iddpm_linear with a small T
            rows.append({"name": name, "error": str(e)})
            continue
        abar = alphas_cumprod_from_betas(betas)
        with np.errstate(divide="ignore"):
            snr_T = float(abar[-1] / (1 - abar[-1]))
        rows.append({"name": name, "origin": "diffusers" if name in DIFFUSERS_SCHEDULES else "deploy-diff",
                     "beta_first": float(betas[0]), "beta_last": float(betas[-1]),
                     "alphas_cumprod_first": float(abar[0]), "alphas_cumprod_last": float(abar[-1]),
                     "snr_last": snr_T})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"T = {args.num_train_timesteps}, beta_start = {args.beta_start}, beta_end = {args.beta_end}"
          + (", rescaled to zero terminal SNR" if args.rescale_betas_zero_snr else ""))
    print(f"{'name':<18} {'origin':<12} {'beta[0]':>10} {'beta[T-1]':>10} {'abar[0]':>10} {'abar[T-1]':>10} "
          f"{'SNR[T-1]':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<18} refused: {r['error']}")
            continue
        print(f"{r['name']:<18} {r['origin']:<12} {r['beta_first']:>10.3e} {r['beta_last']:>10.3e} "
              f"{r['alphas_cumprod_first']:>10.6f} {r['alphas_cumprod_last']:>10.3e} {r['snr_last']:>10.3e}")
    return 0


def _cmd_timesteps(args: argparse.Namespace) -> int:
    """Print the timesteps (and sigmas) a scheduler would use."""
    import numpy as np

    from .runtime.schedulers import load_scheduler, scheduler_from_name

    overrides = json.loads(args.set) if args.set else {}
    if not isinstance(overrides, dict):
        raise ValueError("--set takes a JSON object, e.g. '{\"timestep_spacing\": \"trailing\"}'")
    if args.config:
        scheduler = (scheduler_from_name(args.scheduler, args.config, **overrides) if args.scheduler
                     else load_scheduler(args.config, **overrides))
    else:
        scheduler = scheduler_from_name(args.scheduler or "ddim", {}, **overrides)
    scheduler.set_timesteps(args.steps)
    out = {"scheduler": type(scheduler).__name__, "config": dict(scheduler.config),
           "timesteps": np.asarray(scheduler.timesteps).tolist(),
           "init_noise_sigma": float(scheduler.init_noise_sigma)}
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="deploy-diff",
        description="Train a diffusion UNet in PyTorch, export it, and sample it without torch.")
    parser.add_argument("--version", action="version", version=f"deploy-diff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("schedules", help="list the beta schedules with their terminal SNR")
    p.add_argument("-T", "--num-train-timesteps", type=int, default=1000)
    p.add_argument("--beta-start", type=float, default=0.0001)
    p.add_argument("--beta-end", type=float, default=0.02)
    p.add_argument("--rescale-betas-zero-snr", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_schedules)

    p = sub.add_parser("timesteps", help="print the timesteps and sigmas a scheduler would use")
    p.add_argument("config", nargs="?", help="scheduler_config.json or a folder holding one (default: diffusers' "
                                             "defaults for --scheduler)")
    p.add_argument("--scheduler", help="ddpm, ddim, dpmsolver++, sde-dpmsolver++, euler, euler_a, heun, unipc "
                                       "(default: the config's _class_name)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--set", help="JSON object of config overrides")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_timesteps)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("deploy-diff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one readable line unless --debug
        if args.debug:
            raise
        print(f"deploy-diff {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
