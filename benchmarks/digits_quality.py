"""Quality of a digits run: Frechet distance to real digits in a small classifier's feature space.

    .venv/bin/python benchmarks/digits_quality.py RUN_DIR [--num-images 540] [--steps 50] [--scheduler ddim]
        [--guidance 2.0] [--json out.json]

Samples ``--num-images`` digits from the run's EMA weights (torch runner through the runtime's sampling
loop), then prints the distance, the real-data floor (real test split vs real train split, same feature
space) and their ratio; for a conditional run also the classifier's agreement with the requested class.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from deploy_diff.analysis.quality import DigitsQuality
from deploy_diff.runtime.images import to_images
from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.sampling import sample
from deploy_diff.runtime.schedulers import scheduler_from_name
from deploy_diff.train.checkpoint import find_checkpoint
from deploy_diff.train.runner import TorchRunner
from deploy_diff.train.unet import UNet


def generate(
    run_dir: str,
    num_images: int,
    steps: int,
    scheduler_name: str,
    guidance: float | None,
    seed: int = 0,
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    ck = find_checkpoint(run_dir)
    model = UNet(ck.model_config).eval()
    model.load_state_dict(ck.ema_state)
    runner = TorchRunner(model)
    cfg = ck.model_config
    labels = np.arange(num_images) % cfg.num_classes if cfg.num_classes else None
    out = []
    start = time.perf_counter()
    for i in range(0, num_images, batch):
        n = min(batch, num_images - i)
        scheduler = scheduler_from_name(scheduler_name, ck.path / "scheduler_config.json")
        x = sample(
            runner,
            scheduler,
            (n, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            steps,
            generator=TorchGenerator(seed + i),
            class_labels=None if labels is None else labels[i : i + n],
            null_class_label=cfg.null_class_label,
            guidance_scale=guidance if cfg.num_classes else None,
        )
        out.append(to_images(x, "np"))
    return np.concatenate(out), labels, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--num-images", type=int, default=540)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (conditional runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    quality = DigitsQuality()
    images, labels, seconds = generate(
        args.run_dir, args.num_images, args.steps, args.scheduler, args.guidance, args.seed
    )
    result = quality.score(images, labels)
    result.update(
        {
            "run_dir": args.run_dir,
            "scheduler": args.scheduler,
            "steps": args.steps,
            "guidance": args.guidance,
            "sampling_seconds": seconds,
            "torch_threads": torch.get_num_threads(),
        }
    )
    print(
        f"Frechet distance {result['fd']:.3f}  real-data floor {result['floor']:.3f}  "
        f"ratio {result['ratio']:.2f}  ({result['num_images']} images, {args.scheduler} {args.steps} steps)"
    )
    if "class_agreement" in result:
        print(
            f"class agreement {result['class_agreement']:.3f} (classifier test accuracy "
            f"{result['classifier_test_accuracy']:.3f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
