"""What can be exported: a training run of ours, or a diffusers ``UNet2DModel`` (pipeline folder or bare model
folder). Each loader returns an :class:`ExportSource`: a torch module with the runner signature
``module(sample, timestep[, class_labels]) -> out`` plus the facts the manifest needs.

A diffusers ``StableDiffusionPipeline`` folder is a text-to-image source (:mod:`.text_to_image`);
:func:`diffusers_pipeline_kind` says which kind a folder is and refuses other pipeline classes by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.schedulers import SCHEDULER_CLASSES, DDPMScheduler, load_scheduler

__all__ = [
    "TEXT_TO_IMAGE_CLASS",
    "ExportError",
    "ExportSource",
    "diffusers_pipeline_kind",
    "load_diffusers_source",
    "load_run_source",
]

TEXT_TO_IMAGE_CLASS = "StableDiffusionPipeline"  # the one text-to-image pipeline class exported
# why some well-known pipeline classes are refused (any class other than the above without a UNet2DModel is)
_REFUSED_WHY = {
    "StableDiffusionXLPipeline": "SDXL: two text encoders and added size/crop conditioning",
    "StableDiffusion3Pipeline": "SD3: an MMDiT transformer instead of a UNet, three text encoders",
    "StableDiffusionImg2ImgPipeline": "image-to-image: the VAE encoder and a strength schedule",
    "StableDiffusionInpaintPipeline": "inpainting: a 9-channel UNet and the VAE encoder",
    "StableDiffusionUpscalePipeline": "upscaling: a low-resolution image input and a noise level",
    "LatentConsistencyModelPipeline": "LCM: a guidance-embedding UNet input (timestep_cond)",
}


class ExportError(ValueError):
    """The export cannot go on; the message says why and what was expected."""


@dataclass
class ExportSource:
    module: nn.Module  # forward(sample, timestep[, class_labels]) -> out
    sample_size: tuple[int, int]
    in_channels: int
    out_channels: int
    num_classes: int
    null_class_label: int | None
    prediction_type: str
    scheduler_config: dict[str, Any]  # written as scheduler_config.json
    source: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    # how the model's own sampler is meant to run (a distilled few-step model); written into the manifest
    default_inference_steps: int | None = None
    max_inference_steps: int | None = None

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0


def _check_scheduler_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULER_CLASSES:
        raise ExportError(
            f"{where} names the scheduler {name!r}, which the runtime does not implement; "
            f"supported: {sorted(SCHEDULER_CLASSES)}"
        )
    try:
        load_scheduler(config)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{where} is not a valid {name} config: {e}") from None
    return config


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{what}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{what}: {path} must hold a JSON object")
    return data


class _RunModule(nn.Module):
    def __init__(self, unet: nn.Module, conditional: bool):
        super().__init__()
        self.unet = unet
        self.conditional = conditional

    def forward(self, sample, timestep, class_labels=None):
        return self.unet(sample, timestep, class_labels if self.conditional else None)


def load_run_source(run_dir: str | Path, use_ema: bool = True) -> ExportSource:
    """A training run folder of ours (what ``deploy_diff.train.train`` or ``deploy-diff train --out RUN_DIR``
    writes); EMA weights by default."""
    from ..train.checkpoint import CheckpointError, read_checkpoint
    from ..train.unet import UNet

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a folder; expected a training run folder (what train() writes)")
    try:
        ckpt = read_checkpoint(run_dir)
    except CheckpointError as e:
        intact = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
        hint = f"; earlier checkpoints to export instead: {run_dir}/checkpoints/{intact[-1]}" if intact else ""
        raise ExportError(f"cannot export {run_dir}: {e}{hint}") from None
    config = ckpt.model_config
    unet = UNet(config)
    state = ckpt.ema_state if use_ema and ckpt.ema_state else ckpt.model_state
    try:
        unet.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"{run_dir}: the weights do not fit the model config ({str(e).splitlines()[0]})") from None
    unet.eval()
    sched_path = ckpt.path / "scheduler_config.json"
    scheduler_config = _check_scheduler_config(_read_json(sched_path, "scheduler config"), str(sched_path))
    prediction_type = ckpt.meta.get("prediction_type") or scheduler_config.get("prediction_type", "epsilon")
    sampling = ckpt.meta.get("sampling") or {}  # a distilled run's few-step defaults (deploy_diff.train.distill)
    return ExportSource(
        module=_RunModule(unet, config.num_classes > 0).eval(),
        sample_size=(config.sample_size, config.sample_size),
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_classes=config.num_classes,
        null_class_label=config.null_class_label,
        prediction_type=prediction_type,
        scheduler_config=scheduler_config,
        class_names=ckpt.meta.get("class_names"),
        default_inference_steps=sampling.get("default_inference_steps"),
        max_inference_steps=sampling.get("max_inference_steps"),
        source={
            "kind": "deploy-diff",
            "path": str(run_dir.resolve()),
            "weights": "ema" if state is ckpt.ema_state else "model",
            "step": ckpt.step,
        },
    )


class _DiffusersModule(nn.Module):
    def __init__(self, unet: nn.Module, conditional: bool):
        super().__init__()
        self.unet = unet
        self.conditional = conditional

    def forward(self, sample, timestep, class_labels=None):
        labels = class_labels if self.conditional else None
        return self.unet(sample, timestep, class_labels=labels, return_dict=False)[0]


def diffusers_pipeline_kind(folder: str | Path) -> str:
    """``"text-to-image"`` for a ``StableDiffusionPipeline`` folder, ``"unet"`` for a folder
    :func:`load_diffusers_source` takes (a pipeline around a ``UNet2DModel``, a bare model folder, or anything
    that is neither: its own messages say what is wrong). Any other pipeline class (``model_index.json``'s
    ``_class_name``: SDXL, SD3, image-to-image, ...) is an :class:`ExportError` naming it."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return "unet"
    index = _read_json(index_file, "diffusers pipeline")
    name = index.get("_class_name")
    if name == TEXT_TO_IMAGE_CLASS:
        return "text-to-image"
    unet = index.get("unet")
    if isinstance(unet, list) and unet[-1:] == ["UNet2DModel"]:
        return "unet"
    why = _REFUSED_WHY.get(str(name))
    raise ExportError(
        f"{folder}: model_index.json names the pipeline class {name!r}{f' ({why})' if why else ''}, which "
        f"deploy-diff does not export; it exports {TEXT_TO_IMAGE_CLASS} folders (text-to-image) and pipelines "
        "around a UNet2DModel (DDPMPipeline, DDIMPipeline, ...)"
    )


def load_diffusers_source(folder: str | Path, scheduler_config: str | Path | None = None) -> ExportSource:
    """A diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a bare ``UNet2DModel``
    folder (``config.json`` + weights; then ``scheduler_config`` or diffusers' DDPM default)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; expected a diffusers pipeline or UNet2DModel folder")
    if (folder / "model_index.json").is_file():
        if diffusers_pipeline_kind(folder) == "text-to-image":
            raise ExportError(
                f"{folder} is a {TEXT_TO_IMAGE_CLASS} folder, a text-to-image source: export it with "
                "deploy_diff.export.export_text_to_image(folder, out) or `deploy-diff export --from-diffusers "
                f"{folder} --out BUNDLE`"
            )
        index = _read_json(folder / "model_index.json", "diffusers pipeline")
        unet_dir = folder / "unet"
        if "unet" not in index or not unet_dir.is_dir():
            raise ExportError(f"{folder}: the pipeline has no `unet` (model_index.json lists {sorted(index)})")
        sched_file = Path(scheduler_config) if scheduler_config else folder / "scheduler" / "scheduler_config.json"
    elif (folder / "config.json").is_file():
        unet_dir = folder
        sched_file = Path(scheduler_config) if scheduler_config else None
    else:
        raise ExportError(
            f"{folder} is neither a diffusers pipeline folder (model_index.json) nor a model folder (config.json)"
        )
    unet_config = _read_json(unet_dir / "config.json", "diffusers UNet")
    cls_name = unet_config.get("_class_name")
    if cls_name != "UNet2DModel":
        raise ExportError(
            f"{unet_dir}: the model is a {cls_name!r}; deploy-diff exports UNet2DModel (pixel-space, "
            f"unconditional or class-conditional) only here, and UNet2DConditionModel within a {TEXT_TO_IMAGE_CLASS} "
            "folder (text-to-image)"
        )
    if unet_config.get("class_embed_type") not in (None,):
        raise ExportError(
            f"{unet_dir}: class_embed_type={unet_config['class_embed_type']!r} is not supported; "
            "class-conditional models need num_class_embeds with the default embedding"
        )
    weights = [p for p in unet_dir.iterdir() if p.name.startswith("diffusion_pytorch_model")]
    if not weights:
        raise ExportError(f"{unet_dir} holds no weights (diffusion_pytorch_model.safetensors or .bin)")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ExportError("exporting a diffusers model needs diffusers: pip install 'deploy-diff[diffusers]'") from None
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises many kinds (OSError, EnvironmentError, safetensors errors)
        raise ExportError(
            f"cannot load the UNet from {unet_dir}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    unet.eval()
    if sched_file is not None:
        sched = _check_scheduler_config(_read_json(sched_file, "scheduler config"), str(sched_file))
    else:
        sched = dict(DDPMScheduler().config, _class_name="DDPMScheduler")
    cfg = unet.config
    size = cfg.sample_size
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    num_classes = int(cfg.num_class_embeds or 0)
    return ExportSource(
        module=_DiffusersModule(unet, num_classes > 0).eval(),
        sample_size=size,
        in_channels=int(cfg.in_channels),
        out_channels=int(cfg.out_channels),
        num_classes=num_classes,
        null_class_label=None,
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        scheduler_config=sched,
        source={
            "kind": "diffusers",
            "path": str(folder.resolve()),
            "class": cls_name,
            "diffusers_version": unet_config.get("_diffusers_version"),
        },
    )


def example_inputs(
    src: ExportSource, batch: int, generator: torch.Generator | None = None, num_train_timesteps: int = 1000
) -> tuple[torch.Tensor, ...]:
    """Random (sample, timestep[, class_labels]) for tracing and validation; timesteps are fractional."""
    g = generator or torch.Generator().manual_seed(0)
    h, w = src.sample_size
    x = torch.randn(batch, src.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * (num_train_timesteps - 1)
    if not src.conditional:
        return x, t
    high = src.num_classes + (1 if src.null_class_label is not None else 0)
    return x, t, torch.randint(0, high, (batch,), generator=g)
