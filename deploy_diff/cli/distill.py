"""``deploy-diff distill``: distil a trained run into a few-step student run (torch); see
:mod:`deploy_diff.train.distill`."""

from __future__ import annotations

import argparse

from ._common import add_command

NAME = "distill"

EXAMPLES = """examples:
  deploy-diff distill runs/digits --out runs/digits-fast                 # progressive distillation, 4 steps
  deploy-diff distill runs/digits --out runs/digits-2 --target-steps 2   # a 2-step student
  deploy-diff distill runs/digits --out runs/digits-lcm --method consistency   # LCM sampler, 1..50 steps
  deploy-diff distill runs/digits --out runs/digits-fast --steps 4000 --resume   # continue to 4000 steps
  deploy-diff export runs/digits-fast --out bundles/digits-fast && deploy-diff sample bundles/digits-fast --out g.png
"""

FLAG_WORDS = (
    (r"\bresume=True\b", "--resume"),
    (r"\btarget_steps=", "--target-steps "),
    (r"\bmethod=", "--method "),
    (r"\bpast steps=(\d+): raise steps\b", r"past --steps \1: raise --steps"),
    (r"\banother out_dir\b", "another --out"),
    (r"\bsteps must be\b", "--steps must be"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        NAME,
        help="distil a trained run into a 1-4 step student (torch)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the teacher: a training run folder (its EMA weights are used)")
    p.add_argument("--out", required=True, metavar="RUN_DIR_FAST", help="the student's run folder")
    p.add_argument(
        "--method",
        choices=("progressive", "consistency"),
        help="progressive (default: the best at --target-steps on digits) or consistency (one student for 1..50 steps)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps in total (default: 3000 progressive, 2000 consistency)")
    p.add_argument(
        "--target-steps", type=int, default=4, help="the student's default number of model evaluations (default 4)"
    )
    p.add_argument("--save-every", type=int, default=500, help="checkpoint interval (default 500; 0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue the distillation in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.distill import distill

    result = distill(
        args.run_dir,
        args.out,
        method=args.method,
        steps=args.steps,
        target_steps=args.target_steps,
        resume=args.resume,
        progress=not args.no_progress,
        save_every=args.save_every,
    )
    return 130 if result["interrupted"] else 0
