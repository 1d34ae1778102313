"""A compact Python API with the names and defaults of the DDPM/DDIM reference formulation:
``DiffusionConfig``, ``DiffusionModel``, ``DiffusionTrainer``, ``DiffusionAnalyzer``, ``SchedulerType``.

These are thin, torch-side conveniences over the real components: :class:`UNet`, the runtime's schedule
arrays, and ``deploy_diff.runtime.sampling.sample`` (the one sampling loop) through the torch runner.
Where the reference formulation's schedule names clash with diffusers', its *meaning* is kept through an
explicit mapping: ``SchedulerType.SCALED_LINEAR`` is improved-DDPM's 1000/T-scaled linear
(``"iddpm_linear"``), never diffusers' ``scaled_linear``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import nn

from ..runtime.arguments import check_class_labels, check_guidance_scale
from ..runtime.rng import TorchGenerator
from ..runtime.sampling import sample as run_sampling
from ..runtime.schedulers import DDIMScheduler, DDPMScheduler
from .objective import diffusion_loss, schedule_tensors
from .runner import TorchRunner
from .unet import UNet, UNetConfig, count_flops, count_parameters

__all__ = [
    "DiffusionAnalyzer",
    "DiffusionConfig",
    "DiffusionModel",
    "DiffusionTrainer",
    "NoiseSchedule",
    "SchedulerType",
]


class SchedulerType(str, Enum):
    """The reference formulation's six schedules, mapped onto the runtime's ``beta_schedule`` names
    (``deploy-diff schedules`` lists them all)."""

    LINEAR = "linear"
    COSINE = "cosine"  # the reference cosine exactly (not diffusers' squaredcos_cap_v2)
    QUADRATIC = "quadratic"  # = diffusers' scaled_linear
    SIGMOID = "sigmoid"
    SCALED_LINEAR = "iddpm_linear"  # the reference's "scaled linear": beta * 1000 / T
    KARRAS = "karras"  # sigma rising along t (the reference's literal formula is degenerate)


def _default_channel_mult(image_size: int) -> tuple[int, ...]:
    levels = max(1, min(4, int(np.log2(max(image_size, 4))) - 1))  # 8 -> 2 levels, 16 -> 3, >= 32 -> 4
    return (1,) + (2,) * (levels - 1)


@dataclass
class DiffusionConfig:
    """The reference formulation's configuration (its field names and defaults), plus a few fields it leaves
    implicit."""

    # model architecture
    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 8
    num_classes: int = 0
    dropout: float = 0.0
    channel_mult: tuple[int, ...] | None = None  # default: from image_size
    attention_resolutions: tuple[int, ...] | None = None  # default: the two smallest feature maps
    # diffusion parameters
    num_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    scheduler_type: SchedulerType | str = SchedulerType.LINEAR
    # sampling parameters
    num_inference_steps: int = 50
    guidance_scale: float = 7.5  # used only by conditional models when no value is passed
    eta: float = 0.0
    clip_denoised: bool = True
    # advanced
    prediction_type: str = "epsilon"
    loss_type: str = "l2"
    # training (used by DiffusionTrainer)
    learning_rate: float = 1e-3
    gradient_clipping: bool = True
    max_grad_norm: float = 1.0
    label_dropout: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def beta_schedule(self) -> str:
        """The runtime's schedule name (a plain string is taken as a runtime name, diffusers' meaning)."""
        st = self.scheduler_type
        return st.value if isinstance(st, SchedulerType) else str(st)

    def unet_config(self) -> UNetConfig:
        mult = tuple(self.channel_mult) if self.channel_mult else _default_channel_mult(self.image_size)
        sizes = [self.image_size // 2**i for i in range(len(mult))]
        attn = tuple(self.attention_resolutions) if self.attention_resolutions is not None else tuple(sizes[-2:])
        return UNetConfig(
            sample_size=self.image_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            base_channels=self.hidden_size,
            channel_mult=mult,
            layers_per_block=self.num_layers,
            attention_resolutions=attn,
            num_heads=self.num_heads,
            dropout=self.dropout,
            num_classes=self.num_classes,
        )

    def scheduler_kwargs(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
        }


class NoiseSchedule:
    """The torch-side forward process with the reference formulation's signatures, built from the runtime's
    float64 arrays."""

    def __init__(self, config: DiffusionConfig, device: torch.device | str = "cpu"):
        rs = DDPMScheduler(**config.scheduler_kwargs())
        self.runtime_scheduler = rs
        self.num_timesteps = config.num_timesteps
        f32 = {"dtype": torch.float32, "device": device}
        self.betas = torch.tensor(rs.betas, **f32)
        self.alphas = torch.tensor(rs.alphas, **f32)
        self.alphas_cumprod = torch.tensor(rs.alphas_cumprod, **f32)
        self.alphas_cumprod_prev = torch.tensor(np.concatenate([[1.0], rs.alphas_cumprod[:-1]]), **f32)
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = schedule_tensors(rs, torch.device(device))

    def to(self, device: torch.device | str) -> NoiseSchedule:
        for name in (
            "betas",
            "alphas",
            "alphas_cumprod",
            "alphas_cumprod_prev",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
        ):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def add_noise(
        self, x_start: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy, noise): q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        a = self.sqrt_alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return a * x_start + s * noise, noise

    def get_velocity(self, x_start: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        a = self.sqrt_alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return a * noise - s * x_start


class DiffusionModel(nn.Module):
    """``.unet`` (a :class:`UNet`), ``.scheduler`` (:class:`NoiseSchedule`), ``.sample(...)``."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet_config())
        self.scheduler = NoiseSchedule(config)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        return self.unet(sample, timestep, class_labels)

    def to(self, *args, **kwargs):  # keep the schedule tensors beside the weights
        out = super().to(*args, **kwargs)
        self.scheduler.to(next(self.unet.parameters()).device)
        return out

    @property
    def null_class_label(self) -> int | None:
        return self.unet.config.null_class_label

    @torch.no_grad()
    def sample(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        use_ddim: bool = True,
        guidance_scale: float | None = None,
        eta: float | None = None,
        class_labels: Sequence[int] | int | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """float32[B, C, H, W] samples in [-1, 1] through ``runtime.sampling.sample`` with the torch runner.

        ``guidance_scale=None`` takes the config's value for a conditional model (none for an
        unconditional one); an explicit value for an unconditional model is an error.
        """
        cfg = self.config
        uc = self.unet.config
        conditional = cfg.num_classes > 0
        check_guidance_scale(guidance_scale, uc.null_class_label, conditional=conditional)
        check_class_labels(class_labels, batch_size, null_class_label=uc.null_class_label,
                           num_classes=cfg.num_classes, conditional=conditional)  # fmt: skip
        if guidance_scale is None and conditional:
            guidance_scale = cfg.guidance_scale
        kwargs = dict(self.scheduler.runtime_scheduler.config, clip_sample=cfg.clip_denoised)
        scheduler = DDIMScheduler.from_config(kwargs) if use_ddim else DDPMScheduler.from_config(kwargs)
        shape = (batch_size, uc.in_channels, uc.sample_size, uc.sample_size)
        x = run_sampling(
            TorchRunner(self.unet),
            scheduler,
            shape,
            num_inference_steps=num_inference_steps or cfg.num_inference_steps,
            generator=TorchGenerator(seed),
            guidance_scale=guidance_scale,
            class_labels=class_labels,
            null_class_label=uc.null_class_label,
            eta=(cfg.eta if eta is None else eta) if use_ddim else 0.0,
        )
        return torch.from_numpy(x)


class DiffusionTrainer:
    """``DiffusionTrainer(model, config).train(dataloader)``: a minimal trainer over any iterable of
    batches (image tensors in [-1, 1], or ``(images, labels)`` pairs)."""

    def __init__(self, model: DiffusionModel, config: DiffusionConfig | None = None, seed: int = 0):
        self.model = model
        self.config = config or model.config
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.unet.parameters(), lr=self.config.learning_rate)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def training_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step on ``batch``; returns ``{"loss": ..., "step": ...}``."""
        cfg = self.config
        images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("a batch must be a float tensor [B, C, H, W] (or an (images, labels) pair)")
        images = images.to(self.device, torch.float32)
        b = images.shape[0]
        null = self.model.null_class_label
        if null is not None:
            if labels is None:
                labels = torch.full((b,), null, dtype=torch.long)
            labels = labels.to(torch.long).clone()
            labels[torch.rand(b, generator=self.generator) < cfg.label_dropout] = null
            labels = labels.to(self.device)
        else:
            labels = None
        t = torch.randint(0, cfg.num_timesteps, (b,), generator=self.generator).to(self.device)
        noise = torch.randn(images.shape, generator=self.generator).to(self.device)
        sched = self.model.scheduler
        self.model.train()
        loss = diffusion_loss(
            self.model.unet,
            images,
            t,
            noise,
            labels,
            sched.sqrt_alphas_cumprod,
            sched.sqrt_one_minus_alphas_cumprod,
            cfg.prediction_type,
            cfg.loss_type,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(self.model.unet.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        return {"loss": float(loss.detach()), "step": self.step}

    def train(self, dataloader: Iterable[Any], num_epochs: int = 1, max_steps: int | None = None) -> dict[str, Any]:
        """Train for ``num_epochs`` passes (or ``max_steps`` steps); returns the loss history."""
        losses: list[float] = []
        start = time.perf_counter()
        for _ in range(num_epochs):
            for batch in dataloader:
                losses.append(self.training_step(batch)["loss"])
                if max_steps is not None and len(losses) >= max_steps:
                    break
            if max_steps is not None and len(losses) >= max_steps:
                break
        return {
            "losses": losses,
            "steps": self.step,
            "final_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - start,
        }


class DiffusionAnalyzer:
    """Model statistics and sampling benchmarks."""

    def analyze_model(self, model: DiffusionModel | UNet) -> dict[str, Any]:
        """Parameters, FLOPs per forward (batch 1) and activation memory of one forward pass."""
        unet = model.unet if isinstance(model, DiffusionModel) else model
        cfg = unet.config
        activation_bytes = 0

        def hook(mod, inp, out) -> None:
            nonlocal activation_bytes
            if isinstance(out, torch.Tensor):
                activation_bytes += out.numel() * out.element_size()

        hooks = [m.register_forward_hook(hook) for m in unet.modules() if not list(m.children())]
        try:
            device = next(unet.parameters()).device
            x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
            labels = torch.zeros(1, dtype=torch.long, device=device) if cfg.num_classes else None
            with torch.no_grad():
                unet(x, torch.zeros(1, device=device), labels)
        finally:
            for h in hooks:
                h.remove()
        params = count_parameters(unet)
        return {
            "parameters": params,
            "trainable_parameters": sum(p.numel() for p in unet.parameters() if p.requires_grad),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in unet.parameters()),
            "flops_per_forward": count_flops(unet),
            "activation_bytes_per_image": activation_bytes,
            "sample_size": cfg.sample_size,
        }

    def benchmark_sampling(
        self,
        model: DiffusionModel,
        batch_size: int = 1,
        steps: Sequence[int] = (10, 25, 50),
        methods: Sequence[str] = ("ddim", "ddpm"),
    ) -> list[dict[str, Any]]:
        """Wall time per method and step count (torch runner through the runtime's loop)."""
        rows = []
        for method in methods:
            if method not in ("ddim", "ddpm"):
                raise ValueError(f"method={method!r}; expected 'ddim' or 'ddpm'")
            for n in steps:
                start = time.perf_counter()
                model.sample(batch_size=batch_size, num_inference_steps=n, use_ddim=method == "ddim")
                seconds = time.perf_counter() - start
                rows.append(
                    {
                        "method": method,
                        "steps": n,
                        "batch_size": batch_size,
                        "seconds": seconds,
                        "seconds_per_step": seconds / n,
                    }
                )
        return rows
