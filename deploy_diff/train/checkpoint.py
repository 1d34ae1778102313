"""Checkpoints that survive a kill at any moment, and load without pickle.

A run folder holds the latest checkpoint at its top level::

    RUN/model.safetensors  ema.safetensors  trainer_state.pt  config.json  scheduler_config.json
    RUN/checkpoints/step_000500/ ...   the same files, for the last ``keep_last`` saves

A save first writes a complete ``checkpoints/step_N`` folder (temp folder + rename, so it either exists
whole or not at all), then replaces the top-level files one by one with atomic renames, ``config.json``
last. ``config.json`` records the sha256 of every other file, so a reader can tell a torn top level (a
kill between two renames) and falls back to the newest complete ``checkpoints/step_N``.

Weights are safetensors; ``trainer_state.pt`` (optimizer, RNG states) holds only tensors and plain Python
values and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..runtime._fileio import atomic_write_bytes, atomic_write_text, sha256_file  # noqa: F401 (re-exported)
from .config import TrainConfig
from .unet import UNetConfig

FORMAT = "deploy-diff/checkpoint"
FORMAT_VERSION = 1
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"
HASHED_FILES = WEIGHT_FILES + (STATE_FILE, SCHEDULER_FILE)


class CheckpointError(ValueError):
    """A folder that is not (or no longer) a readable checkpoint."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    path: Path  # the folder the files were read from
    step: int
    model_config: UNetConfig
    train_config: TrainConfig
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    meta: dict[str, Any]  # the whole config.json

    @property
    def null_class_label(self) -> int | None:
        return self.meta.get("null_class_label")


def _write_folder(folder: Path, model_sd: dict, ema_sd: dict, state: dict, meta: dict, scheduler_json: str) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in model_sd.items()}, str(folder / WEIGHT_FILES[0]))
    save_file({k: v.detach().contiguous().cpu() for k, v in ema_sd.items()}, str(folder / WEIGHT_FILES[1]))
    torch.save(state, folder / STATE_FILE)
    (folder / SCHEDULER_FILE).write_text(scheduler_json, encoding="utf-8")
    meta = dict(meta, files={name: sha256_file(folder / name) for name in HASHED_FILES})
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for name in HASHED_FILES + (CONFIG_FILE,):
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_sd: dict,
    ema_sd: dict,
    state: dict,
    meta: dict,
    scheduler_json: str,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` into ``run_dir`` (see the module docstring); return its step folder."""
    run = Path(run_dir)
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = ckpts / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_folder(tmp, model_sd, ema_sd, state, dict(meta, step=step), scheduler_json)
        _fsync_dir(tmp)
        final = ckpts / name
        if final.exists():  # the same step saved again (e.g. after a resume): swap it out atomically
            trash = ckpts / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(ckpts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # top level: every file copied to a temp name then atomically renamed; config.json last. (Copies, not
    # hard links: a file edited in place at the top level must not change the step folder's twin.)
    for fname in HASHED_FILES + (CONFIG_FILE,):
        staged = run / f".{fname}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            shutil.copyfile(final / fname, staged)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staged, run / fname)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
    _fsync_dir(run)
    # prune: keep the newest ``keep_last`` step folders (never the one just written)
    steps = sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for junk in [*ckpts.glob(".tmp-*"), *ckpts.glob(".old-step_*")]:  # leftovers of a save that was killed
        shutil.rmtree(junk, ignore_errors=True)
    remove_stale_temp_files(run)
    return final


def remove_stale_temp_files(run: Path) -> None:
    """Remove the hidden ``.NAME.HEX.tmp`` files a killed process left at a run's top level (staged checkpoint
    copies, metrics.jsonl / loss.png rewrites). Only the names this package writes; never anything else."""
    names = HASHED_FILES + (CONFIG_FILE, "metrics.jsonl", "loss.png")
    for name in names:
        for junk in run.glob(f".{name}.*.tmp"):
            if junk.is_file():
                junk.unlink(missing_ok=True)


def _read_folder(folder: Path, verify: bool = True) -> Checkpoint:
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f'{cfg_path} is not a deploy-diff checkpoint config (no "format": "{FORMAT}")')
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format_version {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    files = meta.get("files") or {}
    for name in HASHED_FILES:
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{folder} is missing {name}")
        if verify and files.get(name) != sha256_file(p):
            raise CheckpointError(f"{p} does not match the sha256 recorded in {cfg_path} (torn or changed)")
    try:
        model_cfg = UNetConfig.from_dict(meta["model"])
        train_cfg = TrainConfig.from_dict(meta["train"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: bad model/train config: {e}") from None
    try:
        model_sd = load_file(str(folder / WEIGHT_FILES[0]))
        ema_sd = load_file(str(folder / WEIGHT_FILES[1]))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{folder}: unreadable weights: {e}") from None
    return Checkpoint(folder, int(meta.get("step", 0)), model_cfg, train_cfg, model_sd, ema_sd, meta)


def read_checkpoint(folder: str | Path, verify: bool = True) -> Checkpoint:
    """The checkpoint in exactly ``folder`` (a run's top level or one ``checkpoints/step_N``), no fallback."""
    return _read_folder(Path(folder), verify=verify)


def find_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The newest complete checkpoint of a run folder: its top level, or else the newest intact
    ``checkpoints/step_N``. Raises :class:`CheckpointError` naming what was wrong when there is none."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"{run} is not a folder")
    problems = []
    ranked: list[tuple[int, int, Path]] = []  # (step, top level first on a tie, folder)
    try:
        top_step = int(json.loads((run / CONFIG_FILE).read_text(encoding="utf-8")).get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        top_step = -1  # unreadable: still tried, last
    ranked.append((top_step, 1, run))
    ckpts = run / "checkpoints"
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
                ranked.append((int(p.name[5:]), 0, p))
    # newest first: a save killed between its step folder and the top-level copies leaves the newer step folder
    for _, _, folder in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True):
        try:
            return _read_folder(folder)
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError(f"{run} holds no complete deploy-diff checkpoint: " + "; ".join(problems))


def read_trainer_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The optimizer/RNG state of a checkpoint (``torch.load(weights_only=True)``: no pickle code runs)."""
    try:
        return torch.load(ckpt.path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        unsafe = next((ln.strip() for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln), None)
        if unsafe is not None or "weights_only" in str(e):
            # never echo torch's advice to retry with weights_only=False: that would run the file's code
            raise CheckpointError(
                f"{ckpt.path / STATE_FILE} holds objects other than tensors and plain data, so "
                f"it was refused (no code in it ran): {unsafe or 'not loadable safely'}"
            ) from None
        raise CheckpointError(
            f"{ckpt.path / STATE_FILE} is unreadable: {lines[0] if lines else type(e).__name__}"
        ) from None


def is_checkpoint_folder(path: str | Path) -> bool:
    try:
        find_checkpoint(path)
        return True
    except CheckpointError:
        return False
