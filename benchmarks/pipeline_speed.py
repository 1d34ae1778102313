"""End-to-end sampling speed: the torch-free runtime against diffusers' pipeline on torch, same run.

    .venv/bin/python benchmarks/pipeline_speed.py [--models digits,cifar] [--steps 50] [--batch 1,8]
        [--repeats 3] [--threads 2] [--json benchmarks/results/pipeline_speed.json]

For each model (random weights in the layout named; speed does not depend on the values):
  digits  UNet2DModel 1x8x8, block_out_channels (32, 64), one layer per block, attention at 4x4 (the size of
          the digits model `deploy-diff train` makes)
  cifar   UNet2DModel 3x32x32, the google/ddpm-cifar10-32 layout: (128, 256, 256, 256), 2 layers per block,
          attention at 16x16, 35.7M parameters
it saves a diffusers pipeline folder, exports it with `export_bundle`, then times DDIM (50 steps) with
diffusers' DDIMPipeline and with our Pipeline at each batch size, checks the images are equal (max abs on
[0, 1]) and prints the speedup, the share of our time spent in the model, and cold start / peak RSS of a
fresh process (import + load + one step). Run it on a quiet machine: the numbers are minima over repeats.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from _unet_layouts import CIFAR, DIGITS  # benchmarks/ is sys.path[0] when run as a script

from deploy_diff.analysis.bench import cold_start, diffusers_baseline, time_call, time_pipeline
from deploy_diff.export import export_bundle, load_diffusers_source
from deploy_diff.runtime import Pipeline
from deploy_diff.runtime._fileio import atomic_write_text
from deploy_diff.runtime.bundle import load_bundle

MODELS = {"digits": DIGITS, "cifar": CIFAR}

OUT_SCALE = {"digits": 0.2, "cifar": 0.02}


def build(name: str, root: Path) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**MODELS[name]).eval()
    # Random weights make DDIM's 50-step trajectory chaotic: on the CIFAR layout even diffusers' scheduler against
    # ours, both driving the same torch UNet, end 7e-3 apart (1e-7 of float32 rounding, amplified), so "equal
    # outputs" would mean nothing. A small output layer (eps std 0.007 on CIFAR, 0.07 on digits) keeps the
    # trajectory well-posed; the speed does not depend on the values.
    with torch.no_grad():
        unet.conv_out.weight.mul_(OUT_SCALE[name])
        unet.conv_out.bias.mul_(OUT_SCALE[name])
    params = sum(p.numel() for p in unet.parameters())
    folder = root / name
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    manifest = export_bundle(load_diffusers_source(folder), root / f"{name}-bundle", log=None)
    secs = manifest["export"]["seconds"]["total_s"]
    err = manifest["export"]["validation"]["fp32"]["max_error"]
    print(
        f"{name}: {params / 1e6:.2f}M parameters, exported + validated in {secs:.1f} s (max error {err:.1e})",
        flush=True,
    )
    return root / f"{name}-bundle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,cifar")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and ONNX Runtime alike")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bundle_dir = build(name, Path(tmp))
            bundle = load_bundle(bundle_dir)
            pipe = Pipeline.from_bundle(bundle, scheduler="ddim", num_threads=args.threads)
            baseline = diffusers_baseline(bundle, "ddim", args.threads)
            print(
                f"{'model':<7} {'batch':>5} {'diffusers s':>12} {'ours s':>9} {'speedup':>8} {'model %':>8} "
                f"{'max|diff|':>10}",
                flush=True,
            )
            for batch in batches:
                ours, images = time_pipeline(pipe, batch, args.steps, repeats=args.repeats)
                best, runs, ref = time_call(lambda b=batch, f=baseline: f(b, args.steps, 0), repeats=args.repeats)
                diff = float(abs(ref - images).max())
                row = {
                    "model": name,
                    "batch": batch,
                    "steps": args.steps,
                    "diffusers_s": best,
                    "ours_s": ours.seconds,
                    "speedup": best / ours.seconds,
                    "model_share": ours.model_seconds / ours.seconds,
                    "max_abs_diff": diff,
                    "threads": args.threads,
                }
                results.append(row)
                print(
                    f"{name:<7} {batch:>5} {best:>12.3f} {ours.seconds:>9.3f} {row['speedup']:>7.2f}x "
                    f"{100 * row['model_share']:>7.0f}% {diff:>10.1e}",
                    flush=True,
                )
            if not args.no_cold_start:
                cs = cold_start(bundle, repeats=args.repeats, threads=args.threads)
                o, d = cs["ours"], cs.get("diffusers")
                print(
                    f"{name} cold start: ours {o['seconds']:.2f} s / {o['peak_rss_bytes'] / 2**20:.0f} MiB"
                    + (
                        f", diffusers {d['seconds']:.2f} s / {d['peak_rss_bytes'] / 2**20:.0f} MiB: "
                        f"{cs['speedup']:.1f}x faster, {cs['rss_ratio']:.1f}x smaller"
                        if d
                        else ""
                    ),
                    flush=True,
                )
                results.append({"model": name, "cold_start": cs})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
