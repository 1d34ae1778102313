"""``deploy-diff train``: train a UNet denoiser (torch). The precedence of defaults, ``--config``, a resumed
checkpoint and flags is :func:`deploy_diff.train.config.resolve_train_configs`; this module only maps flags to
config fields."""

from __future__ import annotations

import argparse

from ._common import add_command, int_list

NAME = "train"

EXAMPLES = """examples:
  deploy-diff train --data digits --out runs/digits                      # the default: unconditional 8x8 digits
  deploy-diff train --data digits --num-classes 10 --out runs/digits-cond  # conditional, for guidance
  deploy-diff train --data ./faces --sample-size 32 --channels 3 --steps 20000 --out runs/faces
  deploy-diff train --out runs/digits --steps 6000 --resume              # continue up to 6000 steps in total
  torchrun --nproc_per_node 2 -m deploy_diff.cli train --data digits --out runs/ddp
"""

# flags that set the UNetConfig / TrainConfig field of the same name (argparse does the type checks);
# --channels sets both in_channels and out_channels
MODEL_FLAGS = (
    "sample_size",
    "channels",
    "base_channels",
    "channel_mult",
    "layers_per_block",
    "attention_resolutions",
    "num_heads",
    "dropout",
    "num_classes",
    "gradient_checkpointing",
)
TRAIN_FLAGS = (
    "data",
    "steps",
    "batch_size",
    "lr",
    "warmup_steps",
    "weight_decay",
    "ema_decay",
    "max_grad_norm",
    "mixed_precision",
    "loss_type",
    "prediction_type",
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "rescale_betas_zero_snr",
    "label_dropout",
    "hflip",
    "seed",
    "log_every",
    "save_every",
    "sample_every",
    "keep_last",
    "device",
)

# the library's argument names in its messages -> this command's flags (see _common.error_line)
FLAG_WORDS = (
    (r"\bresume=True\b", "--resume"),
    (r"\(pass model_config=None\)", "(drop the model options)"),
    (r"\banother out_dir\b", "another --out"),
    (r"\bpast steps=(\d+): raise steps\b", r"past --steps \1: raise --steps"),
    (r"\blower lr\b", "lower --lr"),
    (r"^data=(['\"])(.*?)\1: expected", r"--data \2: expected"),
    (r"^config file (.*): unknown key", r"--config \1: unknown key"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        NAME,
        help="train a UNet denoiser (torch)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="'digits' (built in, the default), a folder of images, or a .npy/.npz file")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, loss.png, samples/)")
    p.add_argument("--config", help='JSON file: {"model": {...}, "train": {...}} or one flat object')
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out up to --steps in total")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("model (defaults: the digits model)")
    g.add_argument("--sample-size", type=int)
    g.add_argument("--channels", type=int, help="1 (grayscale) or 3 (RGB)")
    g.add_argument("--base-channels", type=int)
    g.add_argument("--channel-mult", type=int_list, help="e.g. 1,2,2")
    g.add_argument("--layers-per-block", type=int)
    g.add_argument("--attention-resolutions", type=int_list, help="feature-map sizes with self-attention, e.g. 8,4")
    g.add_argument("--num-heads", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--num-classes", type=int, help="0 = unconditional; N > 0 adds a null label for guidance")
    g.add_argument("--gradient-checkpointing", action="store_const", const=True)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="total optimizer steps of the run")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--max-grad-norm", type=float, help="0 disables clipping")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    g.add_argument("--loss-type", choices=["l2", "l1", "huber"])
    g.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"])
    g.add_argument("--num-train-timesteps", type=int)
    g.add_argument(
        "--beta-schedule",
        help="linear, scaled_linear, squaredcos_cap_v2, sigmoid, cosine, quadratic, "
        "iddpm_linear, karras (see `deploy-diff schedules`)",
    )
    g.add_argument("--beta-start", type=float)
    g.add_argument("--beta-end", type=float)
    g.add_argument("--rescale-betas-zero-snr", action="store_const", const=True)
    g.add_argument("--label-dropout", type=float, help="probability of the null label (conditional models)")
    g.add_argument("--hflip", action="store_const", const=True, help="random horizontal flips")
    g.add_argument("--seed", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--save-every", type=int)
    g.add_argument("--sample-every", type=int, help="sample grid PNG interval (0 disables)")
    g.add_argument("--keep-last", type=int, help="older checkpoints kept under checkpoints/")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=run)


def flag_overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    """``(model_overrides, train_overrides)``: the config fields of the flags given on the command line."""
    model: dict = {}
    for flag in MODEL_FLAGS:
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "channels":
            model["in_channels"] = model["out_channels"] = value
        else:
            model[flag] = value
    train = {flag: getattr(args, flag) for flag in TRAIN_FLAGS if getattr(args, flag) is not None}
    return model, train


def run(args: argparse.Namespace) -> int:
    from ..train.config import resolve_train_configs
    from ..train.trainer import train

    model_overrides, train_overrides = flag_overrides(args)
    model_config, train_config = resolve_train_configs(
        args.out,
        config_file=args.config,
        resume=args.resume,
        model_overrides=model_overrides,
        train_overrides=train_overrides,
    )
    result = train(model_config, train_config, args.out, resume=args.resume, progress=not args.no_progress)
    return 130 if result["interrupted"] else 0
