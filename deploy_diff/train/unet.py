"""A small UNet denoiser in plain PyTorch (no diffusers at run time), ready for ONNX export.

``UNet(config)(sample float32[B, C, H, W], timestep float[B] (fractional allowed),
class_labels int64[B] | None) -> float32[B, C_out, H, W]``.

There is no Python control flow on tensor values, so the graph exports to ONNX as is. Class-conditional
models (``num_classes > 0``) have ``num_classes + 1`` label embeddings: the last one, index
``num_classes``, is the "null" label used for classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["UNet", "UNetConfig", "count_flops", "count_parameters"]


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; serialises to JSON (``asdict``) inside every checkpoint."""

    sample_size: int = 8
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32  # ``DiffusionConfig.hidden_size`` (deploy_diff.train.api)
    channel_mult: tuple[int, ...] = (1, 2)
    layers_per_block: int = 1  # ``DiffusionConfig.num_layers``
    attention_resolutions: tuple[int, ...] = (4,)  # feature-map sizes that get self-attention
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int = 0  # 0 = unconditional; else labels 0..num_classes-1 plus a null label
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # reserved, kept for forward compatibility

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        problems = []
        for name in ("sample_size", "in_channels", "out_channels", "base_channels", "layers_per_block", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive int (got {v!r})")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            problems.append(f"channel_mult must be a non-empty list of positive ints (got {self.channel_mult!r})")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            problems.append(f"num_classes must be an int >= 0 (got {self.num_classes!r})")
        if not 0 <= float(self.dropout) < 1:
            problems.append(f"dropout must lie in [0, 1) (got {self.dropout!r})")
        if not problems:
            down = 2 ** (len(self.channel_mult) - 1)
            if self.sample_size % down:
                problems.append(f"sample_size={self.sample_size} must be divisible by 2**(len(channel_mult)-1)={down}")
            for m in self.channel_mult:
                ch = self.base_channels * m
                if ch % _groups(ch):
                    problems.append(f"channels {ch} do not split into GroupNorm groups")
                if any(r for r in self.attention_resolutions) and ch % self.num_heads:
                    problems.append(f"channels {ch} are not divisible by num_heads={self.num_heads}")
        if problems:
            raise ValueError("invalid UNet config: " + "; ".join(problems))

    @property
    def null_class_label(self) -> int | None:
        return self.num_classes if self.num_classes > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            import warnings

            warnings.warn(f"UNetConfig: ignoring unknown keys {unknown}", UserWarning, stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2 or g == 1:
            return g
    return 1


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """float32[B, dim] sinusoidal embedding of (possibly fractional) timesteps float[B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, heads, c // heads, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B, heads, d, HW]
        scale = 1.0 / math.sqrt(math.sqrt(c // heads))  # split between q and k for fp16 range
        attn = torch.einsum("bhdi,bhdj->bhij", q * scale, k * scale).softmax(dim=-1)
        out = torch.einsum("bhij,bhdj->bhdi", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # nearest x2 as reshape/expand: exports without a Resize node (no scales to mis-convert in fp16)
        x = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


class UNet(nn.Module):
    """UNet denoiser: ResBlocks with timestep (+ class) embeddings, self-attention at chosen resolutions."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes > 0 else None
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [ch]
        res = config.sample_size
        cur = ch
        for level, mult in enumerate(config.channel_mult):
            out = ch * mult
            for _ in range(config.layers_per_block):
                blocks = nn.ModuleList([ResBlock(cur, out, emb_dim, config.dropout)])
                if res in config.attention_resolutions:
                    blocks.append(AttentionBlock(out, config.num_heads))
                self.down.append(blocks)
                cur = out
                skip_channels.append(cur)
            if level < len(config.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_channels.append(cur)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, emb_dim, config.dropout),
                AttentionBlock(cur, config.num_heads),
                ResBlock(cur, cur, emb_dim, config.dropout),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            out = ch * mult
            for _ in range(config.layers_per_block + 1):
                blocks = nn.ModuleList([ResBlock(cur + skip_channels.pop(), out, emb_dim, config.dropout)])
                if res in config.attention_resolutions:
                    blocks.append(AttentionBlock(out, config.num_heads))
                self.up.append(blocks)
                cur = out
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2
        assert not skip_channels

        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, config.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run(self, blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if isinstance(block, ResBlock):
                if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    h = checkpoint(block, h, emb, use_reentrant=False)
                else:
                    h = block(h, emb)
            else:
                h = block(h)
        return h

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32[B, C, H, W], float[B], int64[B] | None -> float32[B, C_out, H, W]."""
        emb = self.time_mlp(timestep_embedding(timestep, self.config.base_channels))
        if self.class_emb is not None:
            if class_labels is None:  # unconditional sampling through the null label
                class_labels = torch.full(
                    (sample.shape[0],), self.config.num_classes, dtype=torch.long, device=sample.device
                )
            emb = emb + self.class_emb(class_labels)
        h = self.conv_in(sample)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(blocks, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: UNet, batch_size: int = 1) -> int:
    """Multiply-accumulate-based FLOPs (2 per MAC) of one forward pass, counted with forward hooks on
    convolutions, linear layers and the attention matmuls."""
    cfg = model.config
    total = 0

    def conv_hook(mod: nn.Conv2d, inp, out) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total += 2 * out.numel() * k

    def linear_hook(mod: nn.Linear, inp, out) -> None:
        nonlocal total
        total += 2 * out.numel() * mod.in_features

    def attn_hook(mod: AttentionBlock, inp, out) -> None:
        nonlocal total
        b, c, h, w = inp[0].shape
        total += 2 * 2 * b * c * (h * w) ** 2  # QK^T and AV

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, AttentionBlock):
            hooks.append(m.register_forward_hook(attn_hook))
    try:
        device = next(model.parameters()).device
        x = torch.zeros(batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
        t = torch.zeros(batch_size, device=device)
        labels = torch.zeros(batch_size, dtype=torch.long, device=device) if cfg.num_classes else None
        with torch.no_grad():
            model(x, t, labels)
    finally:
        for h in hooks:
            h.remove()
    return total
