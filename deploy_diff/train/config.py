"""Training configuration: a dataclass that serialises to JSON (``config.json`` of every checkpoint), the JSON
config file, and the precedence that turns defaults, a file, a checkpoint and explicit settings into one run's
configs (:func:`resolve_train_configs`, what ``deploy-diff train`` calls)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.schedulers.base import PREDICTION_TYPES
from ..runtime.schedulers.beta_schedules import SCHEDULES

if TYPE_CHECKING:
    from .unet import UNetConfig

LOSS_TYPES = ("l2", "l1", "huber")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train. Model architecture lives in :class:`~deploy_diff.train.unet.UNetConfig`.

    Defaults are the built-in digits run, chosen by measurement: recognisable digits in a few minutes on 2 CPU
    cores.
    """

    data: str = "digits"
    steps: int = 3000  # total optimizer steps of the run (resume continues up to it)
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    ema_decay: float = 0.995
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # "bf16" (CPU/CUDA autocast) or "fp16" (CUDA, with GradScaler)
    loss_type: str = "l2"
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    rescale_betas_zero_snr: bool = False
    label_dropout: float = 0.1  # conditional models: probability of the null label (for guidance)
    hflip: bool = False
    seed: int = 0
    log_every: int = 25  # metrics.jsonl interval (optimizer steps)
    save_every: int = 500
    sample_every: int = 1000  # sample grid PNG interval (0 disables)
    sample_steps: int = 25  # DDIM steps for those grids
    keep_last: int = 2  # older checkpoints kept under checkpoints/
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...

    def __post_init__(self) -> None:
        problems = []

        def check(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        for name in ("steps", "batch_size", "num_train_timesteps", "log_every", "sample_steps"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1 (got {v!r})")
        for name in ("warmup_steps", "save_every", "sample_every", "keep_last", "seed"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an int >= 0 (got {v!r})")
        check(self.lr > 0, f"lr must be > 0 (got {self.lr!r})")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1] (got {self.min_lr_ratio!r})")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay!r})")
        check(0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1) (got {self.ema_decay!r})")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {self.max_grad_norm!r})")
        check(0 <= self.label_dropout < 1, f"label_dropout must lie in [0, 1) (got {self.label_dropout!r})")
        check(
            self.mixed_precision in MIXED_PRECISION,
            f"mixed_precision={self.mixed_precision!r}; expected one of {list(MIXED_PRECISION)}",
        )
        check(self.loss_type in LOSS_TYPES, f"loss_type={self.loss_type!r}; expected one of {list(LOSS_TYPES)}")
        check(
            self.prediction_type in PREDICTION_TYPES,
            f"prediction_type={self.prediction_type!r}; expected one of {list(PREDICTION_TYPES)}",
        )
        check(
            self.beta_schedule in SCHEDULES, f"beta_schedule={self.beta_schedule!r}; expected one of {list(SCHEDULES)}"
        )
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs of the runtime's DDPMScheduler describing this run's forward process."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
            # written into the run's scheduler_config.json: DDIM (and DDPM) would otherwise inherit
            # diffusers' clip_sample=True default, which clips x0 to [-1, 1] at every step and degrades
            # DDIM beyond ~20 steps on trained models; runs saved before this keep their own config
            "clip_sample": False,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"TrainConfig: ignoring unknown keys {unknown}", UserWarning, stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


def read_json_config(path: str | Path) -> dict[str, Any]:
    """A training config file: ``{"model": {...}, "train": {...}}`` or one flat object of either's keys."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a JSON object")
    return data


def _is_image_folder(data: Any) -> bool:
    return data != "digits" and not str(data).endswith((".npy", ".npz"))


def resolve_train_configs(
    out_dir: str | Path,
    *,
    config_file: str | Path | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> tuple[UNetConfig | None, TrainConfig]:
    """The ``(model_config, train_config)`` of a run: each field from the first of these that sets it:

    1. ``model_overrides`` / ``train_overrides``: :class:`~deploy_diff.train.unet.UNetConfig` /
       :class:`TrainConfig` field names (``deploy-diff train`` passes the flags given on its command line);
    2. ``config_file`` (:func:`read_json_config`; a flat file's keys are sorted into the two sections by name);
    3. with ``resume=True``, the training settings saved in the checkpoint in ``out_dir``;
    4. the dataclass defaults, except that a folder of images as ``data`` (not ``"digits"``, not an .npy/.npz)
       defaults a new model to RGB at 32 px.

    ``model_config`` is ``None`` when ``resume=True`` and no model field was set: the trainer then takes the
    architecture from the checkpoint (a model config that is given must equal the checkpoint's).
    """
    from .unet import UNetConfig

    file_cfg = read_json_config(config_file) if config_file is not None else {}
    model_cfg = dict(file_cfg.get("model", {}))
    train_cfg = dict(file_cfg.get("train", {}))
    for key, value in file_cfg.items():  # a flat file: sort its keys into the two sections
        if key in ("model", "train"):
            continue
        if key in UNetConfig.__dataclass_fields__:
            model_cfg[key] = value
        elif key in TrainConfig.__dataclass_fields__:
            train_cfg[key] = value
        else:
            raise ValueError(f"config file {config_file}: unknown key {key!r}")
    model_given = bool(model_cfg) or bool(model_overrides)
    model_cfg.update(model_overrides or {})
    train_cfg.update(train_overrides or {})
    if not resume and _is_image_folder(train_cfg.get("data", "digits")):
        model_cfg.setdefault("in_channels", 3)
        model_cfg.setdefault("out_channels", model_cfg["in_channels"])
        model_cfg.setdefault("sample_size", 32)
    if resume:
        from .checkpoint import find_checkpoint

        saved = find_checkpoint(out_dir).train_config.to_dict()
        train_cfg = {**saved, **train_cfg}  # the run's own settings unless set here
    train_config = TrainConfig.from_dict(train_cfg)
    model_config = UNetConfig.from_dict(model_cfg) if (not resume or model_given) else None
    return model_config, train_config
