"""Random StableDiffusionPipeline folders built locally (no downloads), for the text-to-image tests and benchmark.

:func:`make_tiny_sd_folder` builds the tiny pipeline of diffusers' fast tests (a 2-block UNet2DConditionModel with
cross-attention, a 2-block AutoencoderKL, a 5-layer CLIPTextModel of width 32) with a CLIP tokenizer whose
vocabulary and merges are learned here from a small word list (so real words split into several BPE pieces, and
text outside it falls back to byte-level pieces), and ``save_pretrained``s it. :func:`make_sd_folder` builds the
same pipeline at any of the sizes in :data:`SD_CONFIGS` (``"mid"``: the benchmark's ~100M-parameter UNet).

``out_scale`` shrinks the UNet's output layer: with random weights the sampler's trajectory is chaotic (a 1e-7
difference between two correct forwards grows to 1e-3 over the steps), so parity bounds would mean nothing; a small
epsilon makes the random UNet behave like a trained denoiser.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SCHEDULERS",
    "SD_CONFIGS",
    "TOKENIZER_WORDS",
    "build_sd_pipeline",
    "load_diffusers_sd",
    "make_sd_folder",
    "make_tiny_sd_folder",
    "write_clip_tokenizer_files",
    "write_clip_tokenizer_folder",
]

# -- model sizes (one definition: the tests use "tiny", benchmarks/text_to_image_speed.py both) -------------------
SD_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    # diffusers' fast-test pipeline (tests/pipelines/stable_diffusion), with 2 attention heads in the 4-channel
    # block (its default of 8 heads leaves a 4-channel block 0 channels per head)
    "tiny": {
        "unet": dict(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=2,
        ),
        "vae": dict(
            block_out_channels=[4, 8],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=2,
        ),
        "text_encoder": dict(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            pad_token_id=1,
            vocab_size=1000,
        ),
    },
    # the benchmark's mid-size pipeline: a ~100M-parameter UNet at 32x32 latents (256x256 images through a 4-block
    # VAE), a 6-layer CLIP text encoder of width 512
    "mid": {
        "unet": dict(
            block_out_channels=(192, 384, 512),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=512,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            block_out_channels=[32, 64, 128, 128],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
        ),
        "text_encoder": dict(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=512,
            intermediate_size=2048,
            layer_norm_eps=1e-05,
            num_attention_heads=8,
            num_hidden_layers=6,
            pad_token_id=1,
            vocab_size=1000,
        ),
    },
}

# Stable Diffusion's own scheduler settings; the short names are the ones the tests pass
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++")),
}

# -- tokenizer ----------------------------------------------------------------------------------------------------
# the corpus the merges are learned from: prompt-like words, so common words split into a few pieces
TOKENIZER_WORDS = (
    "a photo of an astronaut riding a horse on the moon painting portrait of a cat sitting in the garden "
    "landscape with mountains and a river at sunset highly detailed digital art oil painting by an artist "
    "the city at night with neon lights cinematic lighting beautiful flowers in a vase still life watercolor "
    "a dog running on the beach sketch drawing of a house in the forest trending on artstation sharp focus"
)
_NUM_MERGES = 96
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: the first in sorted order)."""
    byte_char = _bytes_to_unicode()
    counts = Counter(words)
    split = {w: [byte_char[b] for b in w.encode("utf-8")] for w in counts}
    for w in split:
        split[w][-1] += "</w>"
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, pieces in split.items():
            for pair in zip(pieces, pieces[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        for w, pieces in split.items():
            i, out = 0, []
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    out.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            split[w] = out
    return merges


def write_clip_tokenizer_files(folder: Path, num_merges: int = _NUM_MERGES) -> tuple[Path, Path]:
    """Write a CLIP ``vocab.json`` and ``merges.txt`` (byte-level BPE, ``</w>`` word ends) into ``folder``: the 256
    byte characters, the same with ``</w>``, one token per learned merge, then the start and end tokens (ids
    ``512 + num_merges`` and one more, last, as in CLIP's own vocabulary)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = _learn_merges(TOKENIZER_WORDS.split(), num_merges)
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file


def write_clip_tokenizer_folder(folder: Path, model_max_length: int = 77) -> Path:
    """A tokenizer folder as Stable Diffusion 1.x checkpoints ship it: ``vocab.json``, ``merges.txt`` (see
    :func:`write_clip_tokenizer_files`), ``tokenizer_config.json`` and ``special_tokens_map.json``; no
    ``tokenizer.json`` (transformers builds the fast tokenizer from the vocabulary and merges)."""
    write_clip_tokenizer_files(folder)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = dict(special, model_max_length=model_max_length, tokenizer_class="CLIPTokenizer", do_lower_case=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


# -- pipelines ----------------------------------------------------------------------------------------------------
def _scheduler(name: str):
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}; got {name!r}")
    cls_name, kwargs = SCHEDULERS[name]
    return getattr(diffusers, cls_name)(**_SD_BETAS, **kwargs)


def build_sd_pipeline(
    config: str = "tiny", *, seed: int = 0, scheduler: str = "pndm", sample_size: int | None = None, out_scale=0.05
):
    """A random diffusers StableDiffusionPipeline of the size ``config`` names (no safety checker)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = SD_CONFIGS[config]
    torch.manual_seed(seed)
    unet_cfg = dict(cfg["unet"], **({"sample_size": sample_size} if sample_size else {}))
    unet = UNet2DConditionModel(**unet_cfg).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
        unet.conv_out.bias.mul_(out_scale)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**cfg["vae"]).eval()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval()
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_folder(Path(tmp)))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_sd_folder(path: str | Path, config: str = "tiny", **kwargs) -> Path:
    """:func:`build_sd_pipeline` ``save_pretrained`` into ``path`` (its tokenizer folder in the vocab.json /
    merges.txt layout of Stable Diffusion 1.x checkpoints); returns ``path``."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        build_sd_pipeline(config, **kwargs).save_pretrained(path)
    # transformers saves tokenizer.json; Stable Diffusion 1.x folders hold the vocabulary and merges instead
    shutil.rmtree(path / "tokenizer")
    write_clip_tokenizer_folder(path / "tokenizer")
    return path


def make_tiny_sd_folder(
    path: str | Path, *, seed: int = 0, scheduler: str = "pndm", sample_size: int = 8, out_scale: float = 0.05
) -> Path:
    """The tiny random StableDiffusionPipeline (diffusers' fast-test sizes, latents ``sample_size`` square, images
    twice that: the VAE has 2 blocks) saved at ``path``, with the scheduler ``scheduler`` (see :data:`SCHEDULERS`)."""
    return make_sd_folder(path, "tiny", seed=seed, scheduler=scheduler, sample_size=sample_size, out_scale=out_scale)


def load_diffusers_sd(path: str | Path):
    """diffusers' ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None)`` (CPU, float32)."""
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
