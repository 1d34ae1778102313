"""``deploy-diff inspect``: verify a bundle's files and print its manifest (no torch)."""

from __future__ import annotations

import argparse
import json

from ._common import add_command

NAME = "inspect"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, NAME, help="verify a bundle and print its manifest")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    p.set_defaults(func=run)


def _io(entries: dict) -> str:
    return ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in entries.items())


def _tail(bundle) -> list[str]:
    """Source, scheduler, export facts and files: the lines every kind of bundle shows."""
    m = bundle.manifest
    lines = []
    src = m["model"].get("source") or {}
    if src:
        lines.append("source      " + ", ".join(f"{k}={v}" for k, v in src.items() if v is not None))
    sched = bundle.scheduler_config()
    lines.append(
        f"scheduler   {sched.get('_class_name', 'DDPMScheduler')} (T={sched.get('num_train_timesteps')}, "
        f"beta_schedule={sched.get('beta_schedule')}, spacing={sched.get('timestep_spacing', 'leading')})"
    )
    return lines


def _footer(bundle) -> list[str]:
    m = bundle.manifest
    ex = m.get("export", {})
    lines = [
        f"export      opset {ex.get('opset')}, torch {ex.get('torch_version')}, "
        f"onnx {ex.get('onnx_version')}, "
        f"onnxruntime {ex.get('onnxruntime_version')}, {ex.get('created')}, "
        f"{ex.get('seconds', {}).get('total_s', float('nan')):.1f} s",
        "files",
    ]
    for name, entry in m["files"].items():
        lines.append(f"  {name:<40} {entry['bytes']:>12,d} B  sha256 {entry['sha256'][:16]}")
    return lines


def format_text_to_image(bundle) -> str:
    """A text-to-image bundle's manifest as aligned ``key  value`` lines: the model, tokenizer, each component's
    graphs, interface and validation."""
    m = bundle.manifest
    model = bundle.model
    ex = m.get("export", {})
    h, w = model.sample_size
    f = model.vae_scale_factor
    lines = [
        f"bundle      {bundle.path}  (format {m['format']} v{m['format_version']}, files verified)",
        f"pipeline    {bundle.pipeline}: {' -> '.join(bundle.components)}",
        f"model       latents {model.in_channels}x{h}x{w} -> images {model.image_channels}x{h * f}x{w * f} "
        f"(VAE factor {f}, scaling_factor {model.scaling_factor:g}), prediction_type={model.prediction_type}",
        f"tokenizer   {model.tokenizer_file}, {model.model_max_length} tokens, pad {model.pad_token!r} "
        f"(id {model.pad_token_id}), text width {model.text_hidden_size}",
    ]
    for component in bundle.components:
        info = bundle.graphs[component]
        lines.append(f"{component:<11} {', '.join(f'{p} {name}' for p, name in info.files.items())}")
        lines.append(f"  inputs    {_io(info.inputs)}")
        lines.append(f"  outputs   {_io(info.outputs)}")
        for precision, report in (ex.get("validation", {}).get(component) or {}).items():
            lines.append(
                f"  validated {precision}: max error {report['max_error']:.2e} (tolerance {report['tolerance']:g})"
            )
        why = (ex.get("fp16_skipped") or {}).get(component)
        if why:
            lines.append(f"  no fp16   {why}")
    return "\n".join(lines + _tail(bundle) + _footer(bundle))


def format_manifest(bundle) -> str:
    """The manifest of a loaded bundle as aligned ``key  value`` lines."""
    if bundle.pipeline != "unet":
        return format_text_to_image(bundle)
    m = bundle.manifest
    model = bundle.model
    ex = m.get("export", {})
    lines = [
        f"bundle      {bundle.path}  (format {m['format']} v{m['format_version']}, files verified)",
        f"model       {model.in_channels}x{model.sample_size[0]}x{model.sample_size[1]} -> "
        f"{model.out_channels} channels, prediction_type={model.prediction_type}",
        "classes     "
        + (
            f"{model.num_classes}, null label "
            + (str(model.null_class_label) if model.null_class_label is not None else "none (guidance unavailable)")
            if model.conditional
            else "unconditional"
        ),
        f"batch       {'static ' + str(model.static_batch) if model.static_batch else 'dynamic'}",
        "inputs      " + ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in m["model"]["inputs"].items()),
        "outputs     " + ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in m["model"]["outputs"].items()),
    ]
    lines += _tail(bundle)
    for precision, report in ex.get("validation", {}).items():
        lines.append(
            f"validation  {precision}: max error {report['max_error']:.2e} (tolerance {report['tolerance']:g})"
        )
    return "\n".join(lines + _footer(bundle))


def run(args: argparse.Namespace) -> int:
    from ..runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle, verify=not args.no_verify)
    if args.json:
        print(json.dumps(bundle.manifest, indent=2))
    else:
        print(format_manifest(bundle))
    return 0
