"""Read and verify a bundle: the folder ``deploy-diff export`` writes and the runtime samples from.

```
bundle/
  deploy_diff.json         the manifest (below)
  unet.onnx [unet.onnx.data]   fp32 graph (external data only above 2 GB)
  unet.fp16.onnx           optional fp16 graph (float32 inputs and output)
  scheduler_config.json    diffusers-compatible
  engines/*.plan           optional TensorRT engines (each with a .json saying how it was built)
```

The manifest records every file with its sha256 and size; :func:`load_bundle` refuses a bundle whose
format is unknown, whose files are missing, changed or torn, or whose manifest names a path outside the
folder. Numpy and the standard library only.
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
    "Bundle",
    "BundleError",
    "ModelInfo",
    "is_bundle",
    "load_bundle",
    "sha256_file",
]

MANIFEST_NAME = "deploy_diff.json"
BUNDLE_FORMAT = "deploy-diff/bundle"
BUNDLE_FORMAT_VERSION = 1
GRAPH_FILES = {"fp32": "unet.onnx", "fp16": "unet.fp16.onnx"}
SCHEDULER_FILE = "scheduler_config.json"
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
            )
        except (KeyError, TypeError, ValueError, StopIteration, OverflowError, AttributeError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"the manifest's `model` section is malformed ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder."""

    path: Path
    manifest: dict[str, Any]
    model: ModelInfo
    files: dict[str, dict[str, Any]] = field(repr=False)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p, name in GRAPH_FILES.items() if name in self.files)

    def graph_path(self, precision: str = "fp32") -> Path:
        if precision not in GRAPH_FILES:
            raise ValueError(f"precision must be one of {sorted(GRAPH_FILES)}; got {precision!r}")
        name = GRAPH_FILES[precision]
        if name not in self.files:
            hint = " (export it with fp16=True to add one)" if precision == "fp16" else ""
            raise BundleError(f"bundle {self.path} has no {precision} graph{hint}; it has {list(self.precisions)}")
        return self.path / name

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
    a file missing, changed or outside the folder, no fp32 graph or scheduler config.
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
    for required in (GRAPH_FILES["fp32"], SCHEDULER_FILE):
        if required not in files:
            raise BundleError(f"{mpath} lists no {required}; every bundle has one")
    model = ModelInfo.from_manifest(manifest.get("model") or {})
    return Bundle(path=root, manifest=manifest, model=model, files=files)
