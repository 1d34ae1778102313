"""``deploy-diff schedules``: every beta schedule with its end points and terminal SNR (no torch)."""

from __future__ import annotations

import argparse
import json

from ._common import add_command

NAME = "schedules"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, NAME, help="list the beta schedules with their terminal SNR")
    p.add_argument("-T", "--num-train-timesteps", type=int, default=1000)
    p.add_argument("--beta-start", type=float, default=0.0001)
    p.add_argument("--beta-end", type=float, default=0.02)
    p.add_argument("--rescale-betas-zero-snr", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every beta schedule with its end points and terminal SNR."""
    import numpy as np

    from ..runtime.schedulers.beta_schedules import DIFFUSERS_SCHEDULES, SCHEDULES, alphas_cumprod_from_betas, get_betas

    if args.num_train_timesteps < 1:
        raise ValueError(f"-T/--num-train-timesteps must be >= 1; got {args.num_train_timesteps}")
    if not (0 < args.beta_start < 1 and 0 < args.beta_end < 1):
        raise ValueError(f"--beta-start and --beta-end must lie in (0, 1); got {args.beta_start}, {args.beta_end}")
    rows = []
    for name in SCHEDULES:
        try:
            betas = get_betas(
                name,
                args.num_train_timesteps,
                args.beta_start,
                args.beta_end,
                rescale_betas_zero_snr=args.rescale_betas_zero_snr,
            )
        except ValueError as e:  # e.g. iddpm_linear with a small T
            rows.append({"name": name, "error": str(e)})
            continue
        abar = alphas_cumprod_from_betas(betas)
        with np.errstate(divide="ignore"):
            snr_T = float(abar[-1] / (1 - abar[-1]))
        rows.append(
            {
                "name": name,
                "origin": "diffusers" if name in DIFFUSERS_SCHEDULES else "deploy-diff",
                "beta_first": float(betas[0]),
                "beta_last": float(betas[-1]),
                "alphas_cumprod_first": float(abar[0]),
                "alphas_cumprod_last": float(abar[-1]),
                "snr_last": snr_T,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"T = {args.num_train_timesteps}, beta_start = {args.beta_start}, beta_end = {args.beta_end}"
        + (", rescaled to zero terminal SNR" if args.rescale_betas_zero_snr else "")
    )
    print(
        f"{'name':<18} {'origin':<12} {'beta[0]':>10} {'beta[T-1]':>10} {'abar[0]':>10} {'abar[T-1]':>10} "
        f"{'SNR[T-1]':>10}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<18} refused: {r['error']}")
            continue
        print(
            f"{r['name']:<18} {r['origin']:<12} {r['beta_first']:>10.3e} {r['beta_last']:>10.3e} "
            f"{r['alphas_cumprod_first']:>10.6f} {r['alphas_cumprod_last']:>10.3e} {r['snr_last']:>10.3e}"
        )
    return 0
