"""Read and verify a bundle: the folder ``deploy-diff export`` writes and the runtime samples from.

```
bundle/                    a pixel-space UNet ("pipeline": "unet")
  deploy_diff.json         the manifest (below)
  unet.onnx [unet.onnx.data]   fp32 graph (external data only above 2 GB)
  unet.fp16.onnx           optional fp16 graph (float32 inputs and output)
  scheduler_config.json    diffusers-compatible
  engines/*.plan           optional TensorRT engines (each with a .json saying how it was built)

bundle/                    a Stable Diffusion text-to-image pipeline ("pipeline": "text-to-image")
  deploy_diff.json
  text_encoder.onnx        input_ids int64[batch, seq] -> last_hidden_state float32[batch, seq, hidden]
  unet.onnx                sample, timestep, encoder_hidden_states -> out
  vae_decoder.onnx         latent_sample float32[batch, C, h, w] -> sample float32[batch, 3, f*h, f*w]
  *.fp16.onnx              optional fp16 graphs (float32 inputs and outputs)
  tokenizer.json           the tokenizers library's serialisation of the pipeline's tokenizer
  scheduler_config.json
```

Manifest format 2 names the pipeline and lists its graphs per component (``"graphs": {component: {"files":
{precision: file}, "inputs": ..., "outputs": ...}}``); format 1 (pixel bundles written before it: no
``"pipeline"``, ``"graphs": {precision: file}``) still loads, as a ``"unet"`` pipeline. The manifest records every
file with its sha256 and size; :func:`load_bundle` refuses a bundle whose format is unknown, whose files are
missing, changed or torn, whose manifest names a path outside the folder, or that lacks a graph its pipeline needs.
Numpy and the standard library only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ._fileio import sha256_file

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "COMPONENT_GRAPH_FILES",
    "PIPELINE_COMPONENTS",
    "PIXEL_PIPELINE",
    "TEXT_TO_IMAGE_PIPELINE",
    "TOKENIZER_FILE",
    "Bundle",
    "BundleError",
    "GraphInfo",
    "ModelInfo",
    "TextToImageInfo",
    "is_bundle",
    "load_bundle",
    "sha256_file",
]

MANIFEST_NAME = "deploy_diff.json"
BUNDLE_FORMAT = "deploy-diff/bundle"
BUNDLE_FORMAT_VERSION = 2  # what export writes; load_bundle reads 1 and 2
GRAPH_FILES = {"fp32": "unet.onnx", "fp16": "unet.fp16.onnx"}  # the UNet's graphs, precision -> file
SCHEDULER_FILE = "scheduler_config.json"
TOKENIZER_FILE = "tokenizer.json"
PIXEL_PIPELINE = "unet"  # the manifest's "pipeline": a pixel-space UNet (every format-1 bundle)
TEXT_TO_IMAGE_PIPELINE = "text-to-image"  # a Stable Diffusion pipeline: text encoder, UNet, VAE decoder
#: the graphs each pipeline needs, in the order they run
PIPELINE_COMPONENTS = {
    PIXEL_PIPELINE: ("unet",),
    TEXT_TO_IMAGE_PIPELINE: ("text_encoder", "unet", "vae_decoder"),
}
#: component -> precision -> the file name export writes (the manifest's ``graphs`` table is what is read)
COMPONENT_GRAPH_FILES = {
    "text_encoder": {"fp32": "text_encoder.onnx", "fp16": "text_encoder.fp16.onnx"},
    "unet": GRAPH_FILES,
    "vae_decoder": {"fp32": "vae_decoder.onnx", "fp16": "vae_decoder.fp16.onnx"},
}
MAX_TOKENS = 1 << 16  # a tokenizer's model_max_length a manifest may claim
MAX_SIDE = 8192  # sizes a manifest may claim: checked before any array is allocated from them
MAX_CHANNELS = 1024


class BundleError(ValueError):
    """The folder is not a usable bundle; the message says what is wrong and where."""


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about the exported UNet."""

    sample_size: tuple[int, int]
    in_channels: int
    out_channels: int
    num_classes: int  # 0 = unconditional
    null_class_label: int | None  # the "no class" label of models trained with label dropout, else None
    prediction_type: str
    static_batch: int | None  # None = dynamic batch
    input_names: tuple[str, ...]
    output_name: str
    class_names: tuple[str, ...] | None = None
    default_inference_steps: int | None = None  # the sampler's own step count (few-step students); None = 50
    max_inference_steps: int | None = None  # the most steps the bundle's own sampler takes; None = no limit

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @classmethod
    def from_manifest(cls, model: dict[str, Any]) -> ModelInfo:
        try:
            size = model["sample_size"]
            if isinstance(size, bool) or not (isinstance(size, int) or (isinstance(size, list) and len(size) == 2)):
                raise BundleError(f"the manifest's model.sample_size must be an int or [height, width]; got {size!r}")
            size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
            inputs = model["inputs"]
            outputs = model["outputs"]
            names = tuple(inputs)
            if len(outputs) != 1:
                raise BundleError(f"the manifest's model.outputs must name one output; got {list(outputs)}")
            if (
                min(size) < 1
                or max(size) > MAX_SIDE
                or not 1 <= int(model["in_channels"]) <= MAX_CHANNELS
                or not 1 <= int(model["out_channels"]) <= 2 * MAX_CHANNELS
            ):
                raise BundleError(
                    f"the manifest's model sizes are out of range (sample_size {size}, channels "
                    f"{model['in_channels']} -> {model['out_channels']}; at most {MAX_SIDE} px and "
                    f"{MAX_CHANNELS} channels): refused before allocating anything"
                )
            null = model.get("null_class_label")
            class_names = model.get("class_names")
            steps = {}
            for key in ("default_inference_steps", "max_inference_steps"):
                value = model.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise BundleError(f"the manifest's model.{key} must be a positive int or absent; got {value!r}")
                steps[key] = value
            if None not in steps.values() and steps["default_inference_steps"] > steps["max_inference_steps"]:
                raise BundleError(
                    f"the manifest's model.default_inference_steps={steps['default_inference_steps']} exceeds "
                    f"max_inference_steps={steps['max_inference_steps']}"
                )
            return cls(
                sample_size=size,
                in_channels=int(model["in_channels"]),
                out_channels=int(model["out_channels"]),
                num_classes=int(model.get("num_classes") or 0),
                null_class_label=None if null is None else int(null),
                prediction_type=str(model.get("prediction_type", "epsilon")),
                static_batch=None if model.get("static_batch") is None else int(model["static_batch"]),
                input_names=names,
                output_name=next(iter(outputs)),
                class_names=None if class_names is None else tuple(str(c) for c in class_names),
                **steps,
            )
        except (KeyError, TypeError, ValueError, StopIteration, OverflowError, AttributeError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"the manifest's `model` section is malformed ({type(e).__name__}: {e})") from None


def _int(model: dict[str, Any], key: str, low: int, high: int, optional: bool = False) -> int | None:
    value = model.get(key) if optional else model[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BundleError(f"the manifest's model.{key} must be an int in [{low}, {high}]; got {value!r}")
    return value


@dataclass(frozen=True)
class TextToImageInfo:
    """What the runtime needs to know about a text-to-image bundle: the UNet's latent facts, the VAE's and the
    tokenizer's (the manifest's ``model`` section of a ``"text-to-image"`` bundle)."""

    sample_size: tuple[int, int]  # the UNet's default latent size [h, w]
    in_channels: int
    out_channels: int
    prediction_type: str
    vae_scale_factor: int  # image pixels per latent pixel, each way
    scaling_factor: float  # latents are divided by it before the VAE decoder
    image_channels: int
    text_hidden_size: int  # the text encoder's width == the UNet's cross_attention_dim
    model_max_length: int  # every prompt is padded / truncated to this many tokens
    pad_token: str
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: int | None
    tokenizer_file: str
    unet_inputs: tuple[str, ...]  # ("sample", "timestep", "encoder_hidden_states")
    #: image sides are multiples of this: vae_scale_factor times the UNet's downsampling factor (the exported UNet
    #: takes latent sides divisible by the latter); None (bundles that do not record it): vae_scale_factor
    size_multiple: int | None = None
    static_batch: None = None  # text-to-image graphs always take a dynamic batch

    def __post_init__(self) -> None:
        if self.size_multiple is None:
            object.__setattr__(self, "size_multiple", self.vae_scale_factor)

    @property
    def latent_multiple(self) -> int:
        """Latent sides the UNet takes are multiples of this (``size_multiple // vae_scale_factor``)."""
        return self.size_multiple // self.vae_scale_factor

    @classmethod
    def from_manifest(cls, model: dict[str, Any], unet_inputs: tuple[str, ...]) -> TextToImageInfo:
        try:
            size = model["sample_size"]
            if not (isinstance(size, list) and len(size) == 2):
                raise BundleError(f"the manifest's model.sample_size must be [height, width]; got {size!r}")
            for side in size:
                if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SIDE:
                    raise BundleError(
                        f"the manifest's model.sample_size must be two ints in [1, {MAX_SIDE}]; got {size}"
                    )
            scaling = model["scaling_factor"]
            if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < scaling < float("inf"):
                raise BundleError(f"the manifest's model.scaling_factor must be a positive number; got {scaling!r}")
            tok = model["tokenizer"]
            if not isinstance(tok, dict):
                raise BundleError(f"the manifest's model.tokenizer must be an object; got {type(tok).__name__}")
            pad_token = tok["pad_token"]
            if not isinstance(pad_token, str) or not pad_token:
                raise BundleError(
                    f"the manifest's model.tokenizer.pad_token must be a non-empty str; got {pad_token!r}"
                )
            tokenizer_file = tok.get("file", TOKENIZER_FILE)
            if not isinstance(tokenizer_file, str) or not tokenizer_file:
                raise BundleError(f"the manifest's model.tokenizer.file must be a file name; got {tokenizer_file!r}")
            vae_factor = _int(model, "vae_scale_factor", 1, 64)
            multiple = _int(model, "size_multiple", 1, MAX_SIDE, optional=True) or vae_factor
            if multiple % vae_factor:
                raise BundleError(
                    f"the manifest's model.size_multiple={multiple} is not a multiple of vae_scale_factor={vae_factor}"
                )
            if any(side % (multiple // vae_factor) for side in size):
                raise BundleError(
                    f"the manifest's model.sample_size {size} is not a multiple of the latent sides the UNet takes "
                    f"(size_multiple {multiple} / vae_scale_factor {vae_factor} = {multiple // vae_factor})"
                )
            missing = [n for n in ("sample", "timestep", "encoder_hidden_states") if n not in unet_inputs]
            if missing:
                raise BundleError(f"the manifest's unet graph lacks the inputs {missing}; it lists {list(unet_inputs)}")
            return cls(
                sample_size=(size[0], size[1]),
                in_channels=_int(model, "in_channels", 1, MAX_CHANNELS),
                out_channels=_int(model, "out_channels", 1, 2 * MAX_CHANNELS),
                prediction_type=str(model.get("prediction_type", "epsilon")),
                vae_scale_factor=vae_factor,
                scaling_factor=float(scaling),
                image_channels=_int(model, "image_channels", 1, 4),
                text_hidden_size=_int(model, "text_hidden_size", 1, 1 << 16),
                model_max_length=_int(tok, "model_max_length", 2, MAX_TOKENS),
                pad_token=pad_token,
                pad_token_id=_int(tok, "pad_token_id", 0, 1 << 31),
                bos_token_id=_int(tok, "bos_token_id", 0, 1 << 31, optional=True),
                eos_token_id=_int(tok, "eos_token_id", 0, 1 << 31, optional=True),
                tokenizer_file=tokenizer_file,
                unet_inputs=tuple(unet_inputs),
                size_multiple=multiple,
            )
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"the manifest's `model` section is malformed ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class GraphInfo:
    """One component's graphs (precision -> bundle-relative file) and interface (name -> dtype and shape)."""

    files: dict[str, str]
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder. ``pipeline``: ``"unet"`` (``model`` is a :class:`ModelInfo`) or
    ``"text-to-image"`` (``model`` is a :class:`TextToImageInfo`); ``graphs``: component -> :class:`GraphInfo`."""

    path: Path
    manifest: dict[str, Any]
    model: ModelInfo | TextToImageInfo
    files: dict[str, dict[str, Any]] = field(repr=False)
    pipeline: str = PIXEL_PIPELINE
    graphs: dict[str, GraphInfo] = field(default_factory=dict, repr=False)

    @property
    def components(self) -> tuple[str, ...]:
        """The graphs' component names, in the order the pipeline runs them."""
        return tuple(self.graphs)

    @property
    def precisions(self) -> tuple[str, ...]:
        """The UNet's graph precisions (``("fp32",)`` or ``("fp32", "fp16")``)."""
        return self.component_precisions("unet")

    def component_precisions(self, component: str) -> tuple[str, ...]:
        info = self.graphs.get(component)
        return () if info is None else tuple(p for p in GRAPH_FILES if p in info.files)

    def graph_path(self, precision: str = "fp32", component: str = "unet") -> Path:
        """The graph file of ``component`` in ``precision``; ``BundleError`` when the bundle has none."""
        if precision not in GRAPH_FILES:
            raise ValueError(f"precision must be one of {sorted(GRAPH_FILES)}; got {precision!r}")
        info = self.graphs.get(component)
        if info is None:
            raise BundleError(f"bundle {self.path} has no {component} graph; its components are {list(self.graphs)}")
        name = info.files.get(precision)
        if name is None:
            which = "" if component == "unet" else f" {component}"
            hint = " (export it with fp16=True to add one)" if precision == "fp16" else ""
            skipped = (self.manifest.get("export") or {}).get("fp16_skipped") or {}
            if isinstance(skipped, dict) and isinstance(skipped.get(component), str):
                hint = f" (not written at export: {skipped[component]})"
            raise BundleError(
                f"bundle {self.path} has no {precision}{which} graph{hint}; it has "
                f"{list(self.component_precisions(component))}"
            )
        return self.path / name

    @property
    def tokenizer_path(self) -> Path:
        """The ``tokenizer.json`` of a text-to-image bundle."""
        if not isinstance(self.model, TextToImageInfo):
            raise BundleError(f"bundle {self.path} is a {self.pipeline!r} bundle: it has no tokenizer")
        return self.path / self.model.tokenizer_file

    @property
    def scheduler_config_path(self) -> Path:
        return self.path / SCHEDULER_FILE

    def scheduler_config(self) -> dict[str, Any]:
        path = self.scheduler_config_path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise BundleError(f"{path} is not a readable JSON scheduler config ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise BundleError(
                f"{path} must hold a JSON object (a diffusers scheduler config); got {type(data).__name__}"
            )
        return data

    @property
    def engines(self) -> list[Path]:
        return [
            self.path / name for name in sorted(self.files) if name.startswith("engines/") and name.endswith(".plan")
        ]


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a manifest (whether or not it verifies)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def _safe_relpath(root: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name:
        raise BundleError(f"the manifest names a file with an invalid path: {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or name.startswith("~"):
        raise BundleError(f"the manifest names {name!r}, a path outside the bundle folder; refused")
    full = (root / Path(*pure.parts)).resolve()
    if not full.is_relative_to(root.resolve()):
        raise BundleError(f"the manifest names {name!r}, which resolves outside the bundle folder ({full}); refused")
    return full


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read ``path/deploy_diff.json``, check the format and (``verify=True``) every file's size and sha256.

    Raises :class:`BundleError` naming the problem: no such folder, no manifest, unknown format or version,
    an unknown pipeline, a file missing, changed or outside the folder, no scheduler config, a component graph
    (fp32) the pipeline needs or a text-to-image bundle's tokenizer missing.
    """
    root = Path(path)
    if not root.exists():
        raise BundleError(f"no bundle at {root}: the folder does not exist")
    if not root.is_dir():
        raise BundleError(
            f"{root} is a file, not a bundle folder (a bundle is the folder that export_bundle, or "
            "`deploy-diff export`, writes)"
        )
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(
            f"{root} is not a bundle: it has no {MANIFEST_NAME} (make one with export_bundle or `deploy-diff export`)"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise BundleError(
            f"{mpath} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); the bundle is corrupt"
        ) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} must hold a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{mpath} has format {manifest.get('format')!r}; expected {BUNDLE_FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_FORMAT_VERSION or version < 1:
        raise BundleError(
            f"{mpath} has format_version {version!r}; this deploy-diff reads versions 1.."
            f"{BUNDLE_FORMAT_VERSION} (a newer deploy-diff wrote it?)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{mpath} has no `files` table")
    for name, entry in files.items():
        try:
            full = _safe_relpath(root, name)
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise BundleError(f"{mpath}: the entry for {name!r} needs a sha256")
            if not full.is_file():
                raise BundleError(f"bundle {root} is missing {name} (listed in its manifest)")
            size = full.stat().st_size
        except OSError as e:  # e.g. a name longer than the file system allows
            raise BundleError(f"{mpath}: cannot use the entry {name[:80]!r}: {e.strerror or e}") from None
        if verify:
            if "bytes" in entry and size != entry["bytes"]:
                raise BundleError(
                    f"{full} has {size} bytes, the manifest says {entry['bytes']}: the file is torn "
                    "or was changed after export"
                )
            if sha256_file(full) != entry["sha256"]:
                raise BundleError(
                    f"{full} does not match the sha256 in {MANIFEST_NAME}: the file was changed or "
                    "corrupted after export"
                )
    if version == 1:  # the graphs are the UNet's files present (format 1's "graphs" was precision -> file)
        pipeline = PIXEL_PIPELINE
        section = manifest.get("model")
        io = [
            section.get(k) if isinstance(section, dict) and isinstance(section.get(k), dict) else {}
            for k in ("inputs", "outputs")
        ]
        graphs = {"unet": GraphInfo({p: name for p, name in GRAPH_FILES.items() if name in files}, *io)}
    else:
        pipeline = manifest.get("pipeline")
        if pipeline not in PIPELINE_COMPONENTS:
            raise BundleError(f"{mpath} has pipeline {pipeline!r}; expected one of {list(PIPELINE_COMPONENTS)}")
        graphs = _read_graphs(manifest.get("graphs"), files, mpath, PIPELINE_COMPONENTS[pipeline])
    for required in (graphs["unet"].files.get("fp32", GRAPH_FILES["fp32"]), SCHEDULER_FILE):
        if required not in files:
            raise BundleError(f"{mpath} lists no {required}; every bundle has one")
    model_section = manifest.get("model") or {}
    if pipeline == PIXEL_PIPELINE:
        model = ModelInfo.from_manifest(model_section)
    else:
        model = TextToImageInfo.from_manifest(model_section, tuple(graphs["unet"].inputs))
        if model.tokenizer_file not in files:
            raise BundleError(
                f"bundle {root} has no tokenizer: its manifest lists no {model.tokenizer_file} (a text-to-image "
                "bundle needs one; re-export the pipeline)"
            )
    return Bundle(path=root, manifest=manifest, model=model, files=files, pipeline=pipeline, graphs=graphs)


def _read_graphs(table: Any, files: dict[str, Any], mpath: Path, components: tuple[str, ...]) -> dict[str, GraphInfo]:
    """A format-2 manifest's ``graphs``: each component the pipeline needs, with an fp32 graph listed in ``files``."""
    if not isinstance(table, dict):
        raise BundleError(f"{mpath} has no `graphs` table (component -> its graph files)")
    graphs = {}
    for component in components:
        entry = table.get(component)
        if entry is None:
            raise BundleError(
                f"{mpath}: the bundle is missing the {component} graph (its `graphs` table lists {list(table)}; "
                f"this pipeline needs {list(components)})"
            )
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
            raise BundleError(f"{mpath}: graphs.{component} must be an object with a `files` table")
        names = entry["files"]
        for precision, name in names.items():
            if precision not in GRAPH_FILES:
                raise BundleError(
                    f"{mpath}: graphs.{component} has a {precision!r} graph; precisions are {list(GRAPH_FILES)}"
                )
            if name not in files:
                raise BundleError(
                    f"{mpath} lists no {name} in its `files` table (graphs.{component}.{precision} names it)"
                )
        if "fp32" not in names:
            raise BundleError(f"{mpath}: the bundle is missing the {component} graph (graphs.{component} has no fp32)")
        inputs, outputs = entry.get("inputs") or {}, entry.get("outputs") or {}
        if not isinstance(inputs, dict) or not isinstance(outputs, dict):
            raise BundleError(f"{mpath}: graphs.{component}.inputs and .outputs must be objects")
        graphs[component] = GraphInfo(dict(names), dict(inputs), dict(outputs))
    return graphs
