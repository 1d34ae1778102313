"""One readable training loop for the UNet denoiser.

Per step: draw a batch of real images, random timesteps and Gaussian noise from one seeded generator;
noise the images with the *runtime's* schedule arrays (one source of truth for the forward process);
predict epsilon / v / x_0; take an AdamW step with warmup + cosine decay, gradient clipping and optional
mixed precision; update the EMA weights. Checkpoints (see ``checkpoint.py``) hold everything needed to
continue exactly: N steps straight equal N/2 + resume + N/2.

Run it as ``deploy-diff train ...``; under ``torchrun --nproc_per_node N`` it trains with
DistributedDataParallel (gloo on CPU, nccl on GPU) and only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime._fileio import atomic_open
from ..runtime.images import image_grid, save_png, to_images
from ..runtime.rng import TorchGenerator
from ..runtime.sampling import sample
from ..runtime.schedulers import DDIMScheduler, DDPMScheduler
from .checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    atomic_write_text,
    find_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from .config import TrainConfig
from .data import ImageData, load_data, random_flip
from .objective import diffusion_loss, lr_at, schedule_tensors
from .runner import TorchRunner
from .unet import UNet, UNetConfig, count_parameters

__all__ = ["Trainer", "diffusion_loss", "lr_at", "schedule_tensors", "train"]


def _device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but CUDA is not available here; use device='cpu' or 'auto'")
    return dev


class Trainer:
    """Train a :class:`UNet` on an :class:`ImageData` and write checkpoints under ``out_dir``.

    ``resume=True`` continues the checkpoint in ``out_dir`` up to ``train_config.steps`` total steps (the
    model config then comes from the checkpoint).
    """

    def __init__(
        self,
        model_config: UNetConfig | None,
        train_config: TrainConfig,
        out_dir: str | Path,
        data: ImageData | None = None,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        self.out = Path(out_dir)
        self.progress = progress
        self.log = log or (lambda msg: print(msg, flush=True))
        # -- distributed --------------------------------------------------------------------------
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _device(train_config.device, local_rank)
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
        self.is_main = self.rank == 0

        # -- resume or start ----------------------------------------------------------------------
        self.ckpt = None
        if resume:
            self.ckpt = find_checkpoint(self.out)  # CheckpointError names what is missing
            saved_train = self.ckpt.train_config
            if model_config is not None and model_config != self.ckpt.model_config:
                raise ValueError(
                    "resume=True: the model config differs from the checkpoint's; resume takes the "
                    "architecture from the checkpoint (pass model_config=None)"
                )
            model_config = self.ckpt.model_config
            # the forward process must not change under a resumed model
            for key in (
                "num_train_timesteps",
                "beta_schedule",
                "beta_start",
                "beta_end",
                "prediction_type",
                "rescale_betas_zero_snr",
                "data",
            ):
                if getattr(train_config, key) != getattr(saved_train, key):
                    raise ValueError(
                        f"resume=True: {key}={getattr(train_config, key)!r} differs from the checkpoint's "
                        f"{getattr(saved_train, key)!r}"
                    )
        elif self.out.exists() and any(self.out.iterdir()):
            try:
                find_checkpoint(self.out)
                raise FileExistsError(
                    f"{self.out} already holds a checkpoint: pass resume=True to continue it, or "
                    "choose another out_dir (nothing was overwritten)"
                )
            except CheckpointError:
                pass  # a folder with other files: we only add ours
        assert model_config is not None
        self.model_config = model_config
        self.cfg = train_config

        # -- data ---------------------------------------------------------------------------------
        self.data = (
            data
            if data is not None
            else load_data(train_config.data, model_config.sample_size, model_config.in_channels)
        )
        if self.data.channels != model_config.in_channels:
            raise ValueError(
                f"data has {self.data.channels} channel(s) but the model expects in_channels={model_config.in_channels}"
            )
        if self.data.sample_size != model_config.sample_size:
            raise ValueError(f"data images are {self.data.sample_size}px but sample_size={model_config.sample_size}")
        if model_config.num_classes:
            if self.data.labels is None:
                raise ValueError(
                    f"num_classes={model_config.num_classes} needs labelled data (sub-folders per class "
                    "or an .npz with labels); this data has none"
                )
            if int(self.data.labels.max()) >= model_config.num_classes:
                raise ValueError(
                    f"data has labels up to {int(self.data.labels.max())} but num_classes={model_config.num_classes}"
                )

        # -- model, EMA, optimizer, forward process -------------------------------------------------
        torch.manual_seed(train_config.seed)  # identical initial weights on every rank
        self.model = UNet(model_config).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=train_config.lr,
            weight_decay=train_config.weight_decay,
            betas=(train_config.adam_beta1, train_config.adam_beta2),
        )
        self.noise_scheduler = DDPMScheduler(**train_config.scheduler_kwargs())
        self.sqrt_abar, self.sqrt_one_minus_abar = schedule_tensors(self.noise_scheduler, self.device)
        self.gen = torch.Generator().manual_seed(train_config.seed * 1000003 + self.rank)
        self.scaler = None
        if train_config.mixed_precision == "fp16":
            if self.device.type != "cuda":
                raise ValueError("mixed_precision='fp16' needs CUDA; use 'bf16' on the CPU")
            self.scaler = torch.amp.GradScaler("cuda")
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        if self.ckpt is not None:
            self._load_state()
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )

    # -- state ----------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        ck = self.ckpt
        try:
            self.model.load_state_dict(ck.model_state)
            self.ema.load_state_dict(ck.ema_state)
        except RuntimeError as e:
            raise CheckpointError(f"{ck.path}: weights do not match the model config: {e}") from None
        state = read_trainer_state(ck)
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.gen.set_state(
                state["generator"][self.rank] if self.rank < len(state["generator"]) else state["generator"][0]
            )
            torch.set_rng_state(state["torch_rng"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{ck.path}: trainer state does not fit this run: {e}") from None
        self.step = ck.step
        if self.step > self.cfg.steps:
            raise ValueError(
                f"the checkpoint is at step {self.step}, past steps={self.cfg.steps}: raise steps to train further"
            )
        path = self.out / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= self.step:
                    self.metrics.append(row)
            if self.is_main:  # drop rows of steps after the checkpoint (a killed run's tail) right away
                atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in self.metrics))

    def _log_metrics(self, row: dict[str, Any]) -> None:
        """Keep a metrics row and append it to metrics.jsonl at once (live progress for a watcher). Every
        save rewrites the file atomically, so a line torn by a kill never outlives the next checkpoint."""
        self.metrics.append(row)
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _trainer_state(self) -> dict[str, Any]:
        gens = [self.gen.get_state()]
        if self.world > 1:
            gathered = [torch.empty_like(gens[0]) for _ in range(self.world)]
            torch.distributed.all_gather(gathered, gens[0])
            gens = gathered
        state = {
            "optimizer": self.opt.state_dict(),
            "generator": gens,
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model_config.to_dict(),
            "train": self.cfg.to_dict(),
            "null_class_label": self.model_config.null_class_label,
            "class_names": self.data.class_names,
            "prediction_type": self.cfg.prediction_type,
            "torch_version": torch.__version__,
            "parameters": count_parameters(self.model),
        }

    def scheduler_config(self) -> dict[str, Any]:
        """The run's ``scheduler_config.json``: how its model is sampled (here the forward process, as DDPM)."""
        return {"_class_name": "DDPMScheduler", **self.noise_scheduler.diffusers_config()}

    def sampler(self) -> tuple[Any, int]:
        """The scheduler and step count of the run's sample grids (DDIM over the run's forward process)."""
        return DDIMScheduler.from_config(self.noise_scheduler.config), self.cfg.sample_steps

    def save(self) -> None:
        state = self._trainer_state()  # collective under DDP: every rank calls save()
        if not self.is_main:
            return
        scheduler_json = json.dumps(self.scheduler_config(), indent=2) + "\n"
        save_checkpoint(
            self.out,
            self.step,
            self.model.state_dict(),
            self.ema.state_dict(),
            state,
            self.meta(),
            scheduler_json,
            keep_last=self.cfg.keep_last,
        )
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        self._plot_loss()

    def _plot_loss(self) -> None:
        if not self.metrics:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        steps = [m["step"] for m in self.metrics]
        losses = [m["loss"] for m in self.metrics]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{self.cfg.loss_type} loss ({self.cfg.prediction_type})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_open(self.out / "loss.png") as f:
            fig.savefig(f, format="png")
        plt.close(fig)

    # -- sampling ----------------------------------------------------------------------------------------
    def sample_grid(self, num_images: int = 16, steps: int | None = None, seed: int = 0) -> np.ndarray:
        """uint8 image grid from the EMA model through the runtime's sampling loop (:meth:`sampler`)."""
        runner = TorchRunner(self.ema, self.device)
        scheduler, default_steps = self.sampler()
        labels = None
        if self.model_config.num_classes:
            labels = np.arange(num_images) % self.model_config.num_classes
        x = sample(
            runner,
            scheduler,
            (num_images, self.model_config.in_channels, self.model_config.sample_size, self.model_config.sample_size),
            num_inference_steps=steps or default_steps,
            generator=TorchGenerator(seed),
            class_labels=labels,
            null_class_label=self.model_config.null_class_label,
        )
        return image_grid(to_images(x, "uint8"), scale=max(1, 64 // self.model_config.sample_size))

    def _write_samples(self) -> None:
        if self.is_main:
            save_png(self.sample_grid(), self.out / "samples" / f"step_{self.step:07d}.png")

    # -- the loop -----------------------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cfg, g = self.cfg, self.gen
        idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=g)
        x0 = self.data.images[idx]
        if cfg.hflip:
            x0 = random_flip(x0, g)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        labels = None
        if self.model_config.num_classes:
            labels = self.data.labels[idx].clone()
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
            labels[drop] = self.model_config.num_classes  # the null label, for classifier-free guidance
            labels = labels.to(self.device)
        return x0.to(self.device), t.to(self.device), noise.to(self.device), labels

    def compute_loss(self) -> torch.Tensor:
        """The loss of one freshly drawn batch (the denoising loss; distillation overrides it)."""
        cfg = self.cfg
        x0, t, noise, labels = self._batch()
        return diffusion_loss(
            self.ddp or self.model,
            x0,
            t,
            noise,
            labels,
            self.sqrt_abar,
            self.sqrt_one_minus_abar,
            cfg.prediction_type,
            cfg.loss_type,
            cfg.mixed_precision,
        )

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): :func:`lr_at` over the whole run."""
        return lr_at(step, self.cfg)

    def train_step(self) -> float:
        """One optimizer step; returns the loss."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate(self.step)
        loss = self.compute_loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {self.step + 1}; lower lr or use mixed_precision='no'"
            )
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.step += 1
        self._update_ema()
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    def train(self) -> dict[str, Any]:
        """Run up to ``cfg.steps``; Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and returns cleanly."""
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.ckpt is None and not self.metrics:  # a fresh run: no rows of an earlier, unsaved attempt
                atomic_write_text(self.out / "metrics.jsonl", "")
            self.log(
                f"training {count_parameters(self.model):,} parameters on {len(self.data)} images "
                f"({self.data.source}) for {cfg.steps - self.step} steps on {self.device}"
                + (f" x {self.world} processes" if self.world > 1 else "")
                + (f", resuming at step {self.step}" if self.step else "")
            )
        stop = {"requested": False}

        def _request_stop(signum, frame):  # finish the current step, then save
            stop["requested"] = True

        old = signal.signal(signal.SIGTERM, _request_stop) if self.is_main else None
        bar = None
        if self.progress and self.is_main:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True)
            except ImportError:
                bar = None
        window: list[float] = []
        start, start_step = time.perf_counter(), self.step
        interrupted = False
        try:
            while self.step < cfg.steps and not stop["requested"]:
                loss = self.train_step()
                window.append(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.learning_rate(self.step - 1):.2e}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - start
                    self._log_metrics(
                        {
                            "step": self.step,
                            "loss": float(np.mean(window)),
                            "lr": self.learning_rate(self.step - 1),
                            "steps_per_s": (self.step - start_step) / max(elapsed, 1e-9),
                            "time_s": elapsed,
                        }
                    )
                    window = []
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                    self._write_samples()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        if window:
            self._log_metrics(
                {
                    "step": self.step,
                    "loss": float(np.mean(window)),
                    "lr": self.learning_rate(self.step - 1),
                    "time_s": time.perf_counter() - start,
                }
            )
        self.save()
        if self.is_main and not (interrupted or stop["requested"]) and cfg.sample_every:
            self._write_samples()
        elapsed = time.perf_counter() - start
        if self.is_main:
            verb = "interrupted; saved" if (interrupted or stop["requested"]) else "done; saved"
            self.log(
                f"{verb} step {self.step} to {self.out} ({elapsed:.1f} s, "
                f"{(self.step - start_step) / max(elapsed, 1e-9):.2f} steps/s)"
            )
        return {
            "step": self.step,
            "seconds": elapsed,
            "interrupted": interrupted or stop["requested"],
            "final_loss": self.metrics[-1]["loss"] if self.metrics else None,
        }


def train(
    model_config: UNetConfig | None,
    train_config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it; see ``deploy-diff train --help``."""
    trainer = Trainer(model_config, train_config, out_dir, resume=resume, progress=progress)
    try:
        return trainer.train()
    finally:
        if trainer.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
