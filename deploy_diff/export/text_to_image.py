"""Export a diffusers ``StableDiffusionPipeline`` folder to a text-to-image bundle (manifest format 2).

:func:`load_text_to_image_source` reads the folder (``model_index.json`` naming ``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTokenizer`` and a scheduler; a ``safety_checker`` is ignored; other
pipeline classes are refused by name, see :func:`~.sources.diffusers_pipeline_kind`). :func:`export_text_to_image`
then writes, inside one :func:`~.staging.staging_folder` (nothing is visible at ``out`` until every step passed):

1. ``tokenizer.json``: the folder's tokenizer as transformers loads it (what diffusers uses), saved by the
   ``tokenizers`` library, and checked to give the same ``input_ids`` as transformers (padded and truncated to
   ``model_max_length``) on :data:`TOKENIZER_PROBES` through the runtime's own
   :class:`~deploy_diff.runtime.tokenizer.PromptTokenizer`: an :class:`~.sources.ExportError` otherwise;
2. three graphs, each traced, written and validated against its torch module by the pixel path's own steps
   (:func:`~.bundle.write_component`, :func:`~.bundle.validate_written`: attention fusion kept only if it
   validates, fp16 via :func:`~.onnx.convert_to_fp16`, fp32 1e-4 and fp16 2e-2 relative):

   * ``text_encoder.onnx``: ``input_ids`` int64[batch, seq] -> ``last_hidden_state`` float32[batch, seq, hidden];
   * ``unet.onnx``: ``sample`` float32[batch, C, height, width], ``timestep`` float32[batch],
     ``encoder_hidden_states`` float32[batch, seq, hidden] -> ``out``; height and width are symbolic multiples
     of the UNet's downsampling factor (the manifest's ``model.size_multiple`` is the image-pixel multiple:
     ``vae_scale_factor`` times it), validated at the default latent size and a second, non-square one;
   * ``vae_decoder.onnx``: ``latent_sample`` float32[batch, C, height, width] -> ``sample``
     float32[batch, 3, f*height, f*width] (the runtime divides latents by ``scaling_factor`` first; validation
     feeds latents of that scale);

   with ``fp16`` each also gets a ``*.fp16.onnx``. The UNet's must validate (else the export fails, as for a
   pixel bundle); the text encoder's and VAE decoder's are optional: one that fails validation (the VAE
   decoder's activations overflowing fp16 is the known case) is left out, and why is logged and recorded in the
   manifest's ``export.fp16_skipped``;
3. ``scheduler_config.json`` (the folder's) and the manifest ``deploy_diff.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.arguments import is_int
from ..runtime.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    COMPONENT_GRAPH_FILES,
    MANIFEST_NAME,
    MAX_SIDE,
    SCHEDULER_FILE,
    TEXT_TO_IMAGE_PIPELINE,
    TOKENIZER_FILE,
)
from .bundle import (
    Log,
    _check_options,
    _log_stderr,
    export_facts,
    file_table,
    validate_written,
    write_component,
    write_json,
)
from .onnx import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD
from .sources import (
    TEXT_TO_IMAGE_CLASS,
    ExportError,
    _check_scheduler_config,
    _read_json,
    diffusers_pipeline_kind,
)
from .staging import check_destination, staging_folder
from .validate import compare_graph

__all__ = ["TOKENIZER_PROBES", "TextToImageSource", "export_text_to_image", "load_text_to_image_source"]

# model_index.json entry -> the classes accepted for it
_COMPONENT_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
# UNet2DConditionModel options a Stable Diffusion UNet does not use: each adds an input the graph would lack
_UNSUPPORTED_UNET_OPTIONS = (
    "time_cond_proj_dim",
    "class_embed_type",
    "num_class_embeds",
    "addition_embed_type",
    "encoder_hid_dim",
)

#: strings the exported tokenizer must encode exactly as transformers does (plus one over model_max_length)
TOKENIZER_PROBES = (
    "a photo of an astronaut riding a horse on the moon",
    "",
    "a",
    "UPPER lower MiXeD CaSe",
    "  leading, trailing   and\trepeated \n whitespace  ",
    "punctuation!!! ?? ... ,,, 'quotes' \"double\" it's we're they'll I'd",
    "numbers 1234567890 3.14 1st 2nd",
    "unicode: café naïve résumé Ωμέγα 日本語 中文 한국어",
    "emoji 🙂🚀🎨 and symbols © ® ™ ½",
    "composed é vs decomposed e\u0301, \u00a0no-break space, zero\u200bwidth",
    "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ",
    "<|startoftext|> special tokens <|endoftext|> in the text",
    "hyphen-ated words_and_underscores",
)


class _TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class _UNet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass
class TextToImageSource:
    """A loaded StableDiffusionPipeline folder: the three torch modules in graph form (``text_encoder(input_ids)``,
    ``unet(sample, timestep, encoder_hidden_states)``, ``vae_decoder(latent_sample)``), the tokenizer as
    transformers loads it, and the facts the manifest records."""

    text_encoder: nn.Module
    unet: nn.Module
    vae_decoder: nn.Module
    tokenizer: Any  # a transformers tokenizer with a tokenizers backend
    scheduler_config: dict[str, Any]
    sample_size: tuple[int, int]  # the UNet's default latent size
    in_channels: int
    out_channels: int
    prediction_type: str
    vae_scale_factor: int
    scaling_factor: float
    image_channels: int
    text_hidden_size: int
    model_max_length: int
    vocab_size: int
    unet_factor: int  # latent sizes the UNet takes are multiples of this (2 ** its number of upsamplers)
    source: dict[str, Any] = field(default_factory=dict)

    def model_section(self) -> dict[str, Any]:
        """The manifest's ``model`` entry."""
        tok = self.tokenizer
        return {
            "sample_size": list(self.sample_size),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "prediction_type": self.prediction_type,
            "vae_scale_factor": self.vae_scale_factor,
            "size_multiple": self.vae_scale_factor * self.unet_factor,  # image sides the graphs take
            "scaling_factor": self.scaling_factor,
            "image_channels": self.image_channels,
            "text_hidden_size": self.text_hidden_size,
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "model_max_length": self.model_max_length,
                "pad_token": str(tok.pad_token),
                "pad_token_id": int(tok.pad_token_id),
                "bos_token_id": None if tok.bos_token_id is None else int(tok.bos_token_id),
                "eos_token_id": None if tok.eos_token_id is None else int(tok.eos_token_id),
            },
            "source": self.source,
        }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _check_index(folder: Path, index: dict[str, Any]) -> None:
    for name, accepted in _COMPONENT_CLASSES.items():
        entry = index.get(name)
        cls = entry[-1] if isinstance(entry, list) and entry else None
        if cls not in accepted:
            raise ExportError(
                f"{folder}: model_index.json gives {name} as {entry!r}; a {TEXT_TO_IMAGE_CLASS} export needs "
                f"{' or '.join(accepted)}"
            )
        if not (folder / name).is_dir():
            raise ExportError(f"{folder}: model_index.json lists {name}, but the folder has no {name}/")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise ExportError(f"{folder}: the pipeline has no scheduler/scheduler_config.json")


def _load(what: str, load):
    try:
        return load()
    except Exception as e:  # diffusers / transformers raise many kinds (OSError, ValueError, safetensors errors)
        raise ExportError(f"cannot load the {what}: {_first_line(e)}") from None


def load_text_to_image_source(folder: str | os.PathLike) -> TextToImageSource:
    """Read a ``StableDiffusionPipeline`` folder (see the module docstring); :class:`~.sources.ExportError` naming
    what is wrong: another pipeline class, a component of another class or missing, a UNet option the graph
    cannot take (``time_cond_proj_dim``, class or added embeddings), channels or widths that do not fit together,
    a tokenizer without a fast backend or longer than the text encoder's positions, a scheduler the runtime lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; expected a diffusers {TEXT_TO_IMAGE_CLASS} folder")
    if diffusers_pipeline_kind(folder) != "text-to-image":
        raise ExportError(
            f"{folder} is not a {TEXT_TO_IMAGE_CLASS} folder (its model_index.json must name that class); a "
            "UNet2DModel pipeline or model folder exports with load_diffusers_source + export_bundle"
        )
    index = _read_json(folder / "model_index.json", "diffusers pipeline")
    _check_index(folder, index)
    try:
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError:
        raise ExportError(
            "exporting a Stable Diffusion pipeline needs diffusers and transformers: "
            "pip install 'deploy-diff[export,diffusers]'"
        ) from None
    unet_config = _read_json(folder / "unet" / "config.json", "diffusers UNet")
    for option in _UNSUPPORTED_UNET_OPTIONS:
        if unet_config.get(option) is not None:
            raise ExportError(
                f"{folder / 'unet'}: {option}={unet_config[option]!r} is not supported (a Stable Diffusion UNet "
                "takes sample, timestep and encoder_hidden_states only)"
            )
    sched_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = _check_scheduler_config(_read_json(sched_file, "scheduler config"), str(sched_file))

    unet = _load("UNet", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False))
    vae = _load("VAE", lambda: AutoencoderKL.from_pretrained(folder / "vae", low_cpu_mem_usage=False))
    text_encoder = _load("text encoder", lambda: transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"))
    tokenizer_class = getattr(transformers, index["tokenizer"][-1])
    tokenizer = _load("tokenizer", lambda: tokenizer_class.from_pretrained(folder / "tokenizer"))
    for module in (unet, vae, text_encoder):
        module.float().eval()

    ucfg, vcfg, tcfg = unet.config, vae.config, text_encoder.config
    if int(ucfg.in_channels) != int(vcfg.latent_channels) or int(ucfg.out_channels) != int(vcfg.latent_channels):
        raise ExportError(
            f"{folder}: the UNet maps {ucfg.in_channels} -> {ucfg.out_channels} channels but the VAE's latents "
            f"have {vcfg.latent_channels} (an inpainting or depth UNet takes extra channels; not supported)"
        )
    cross = ucfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) and len(set(cross)) == 1 else cross
    if cross != tcfg.hidden_size:
        raise ExportError(
            f"{folder}: the UNet's cross_attention_dim {ucfg.cross_attention_dim} is not the text encoder's "
            f"hidden_size {tcfg.hidden_size}"
        )
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(f"{folder / 'tokenizer'}: {type(tokenizer).__name__} has no tokenizers backend to save")
    max_length = tokenizer.model_max_length
    positions = int(tcfg.max_position_embeddings)
    if not isinstance(max_length, int) or not 2 <= max_length <= positions:
        raise ExportError(
            f"{folder / 'tokenizer'}: model_max_length {max_length!r} must be an int in [2, {positions}] (the text "
            "encoder's max_position_embeddings); set it in tokenizer_config.json"
        )
    if tokenizer.pad_token is None or tokenizer.pad_token_id is None:
        raise ExportError(f"{folder / 'tokenizer'}: the tokenizer has no pad token (prompts are padded to max length)")
    size = ucfg.sample_size
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return TextToImageSource(
        text_encoder=_TextEncoder(text_encoder).eval(),
        unet=_UNet(unet).eval(),
        vae_decoder=_VaeDecoder(vae).eval(),
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        sample_size=size,
        in_channels=int(ucfg.in_channels),
        out_channels=int(ucfg.out_channels),
        prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
        vae_scale_factor=2 ** (len(vcfg.block_out_channels) - 1),
        scaling_factor=float(vcfg.scaling_factor),
        image_channels=int(vcfg.out_channels),
        text_hidden_size=int(tcfg.hidden_size),
        model_max_length=max_length,
        vocab_size=int(tcfg.vocab_size),
        unet_factor=2 ** (len(ucfg.block_out_channels) - 1),
        source={
            "kind": "diffusers",
            "path": str(folder.resolve()),
            "class": TEXT_TO_IMAGE_CLASS,
            "diffusers_version": index.get("_diffusers_version"),
        },
    )


# -- tokenizer ----------------------------------------------------------------------------------------------------
def write_tokenizer(src: TextToImageSource, path: Path) -> dict[str, Any]:
    """Save the tokenizer's ``tokenizers`` backend to ``path`` (no padding or truncation stored: the manifest's
    ``model_max_length`` and pad token say them) and check that the runtime's
    :class:`~deploy_diff.runtime.tokenizer.PromptTokenizer` on it gives transformers' ``input_ids`` for every probe
    string; returns what was checked."""
    from tokenizers import Tokenizer

    from ..runtime.tokenizer import PromptTokenizer

    tok = src.tokenizer
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(path))
    ours = PromptTokenizer(path, src.model_max_length, str(tok.pad_token), int(tok.pad_token_id))
    length = src.model_max_length
    probes = list(TOKENIZER_PROBES) + [" ".join(["astronaut", "riding", "a", "horse"] * length)]
    want = tok(probes, padding="max_length", max_length=length, truncation=True)["input_ids"]
    got = ours(probes)
    for text, w, g in zip(probes, want, got):
        if list(w) != g.tolist():
            raise ExportError(
                f"the exported tokenizer.json does not tokenize {text[:60]!r} as transformers' "
                f"{type(tok).__name__} does ({g.tolist()[:12]}... vs {list(w)[:12]}...); the export was discarded"
            )
    return {"file": TOKENIZER_FILE, "strings_checked": len(probes)}


# -- graphs -------------------------------------------------------------------------------------------------------
@dataclass
class _Component:
    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_name: str
    dynamic_shapes: dict[str, dict[int, Any]]
    dim_names: dict[str, str]
    inputs: dict[str, Any]  # the manifest's interface
    outputs: dict[str, Any]
    cases: list[dict[str, torch.Tensor]]
    describe: Any  # inputs -> the case's description in the report
    where: str  # the validation cases, in words (for the log)
    fp16_optional: bool


def _sizes(src: TextToImageSource) -> list[tuple[int, int]]:
    """The latent sizes validation runs at: the UNet's default and a second, non-square one (half the height,
    rounded to the UNet's factor)."""
    h, w = src.sample_size
    f = src.unet_factor
    second = (max(f, (h // 2) // f * f), w)
    return [(h, w), second if second != (h, w) else (h, w + f)]


def _side(name: str, factor: int) -> tuple[Any, str]:
    """A symbolic latent side that is a multiple of ``factor``, and the name the exporter gives it."""
    dim = torch.export.Dim(f"{name}_{factor}" if factor > 1 else name, min=1, max=MAX_SIDE // factor)
    return (factor * dim, f"{factor}*{name}_{factor}") if factor > 1 else (dim, name)


def _components(src: TextToImageSource, batches: Sequence[int]) -> list[_Component]:
    g = torch.Generator().manual_seed(0)
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=1 << 16)
    L, hidden, C = src.model_max_length, src.text_hidden_size, src.in_channels
    sizes = _sizes(src)
    b_small, b_big = batches[0], batches[-1]

    # text encoder: prompts as the runtime tokenizes them, and random ids at a shorter length (seq is symbolic)
    tok = src.tokenizer
    prompts = [TOKENIZER_PROBES[i % len(TOKENIZER_PROBES)] for i in range(b_big)]
    ids = [
        torch.tensor(tok(prompts[:b], padding="max_length", max_length=L, truncation=True)["input_ids"])
        for b in dict.fromkeys((b_small, b_big))
    ]
    ids.append(torch.randint(0, src.vocab_size, (b_big, max(2, L // 4)), generator=g))
    text_encoder = _Component(
        "text_encoder",
        src.text_encoder,
        (ids[-1],),
        ["input_ids"],
        "last_hidden_state",
        {"input_ids": {0: batch, 1: Dim("seq", min=2, max=L)}},
        {},
        {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]}},
        {"last_hidden_state": {"dtype": "float32", "shape": ["batch", "seq", hidden]}},
        [{"input_ids": i} for i in ids],
        lambda c: {"batch": int(c["input_ids"].shape[0]), "seq": int(c["input_ids"].shape[1])},
        f"on tokenized prompts (batch {b_small}, {b_big}; seq {L}) and random ids (seq {max(2, L // 4)})",
        True,
    )

    # UNet: each batch at the default latent size, the largest at the second size; timesteps 0, 999, fractions
    height, h_name = _side("height", src.unet_factor)
    width, w_name = _side("width", src.unet_factor)
    unet_cases = []
    for b, (h, w) in [(b, sizes[0]) for b in batches] + [(b_big, sizes[1])]:
        t = torch.rand(b, generator=g) * 999
        t[0] = 0.0
        if b > 1:
            t[-1] = 999.0
        ehs = torch.randn(b, L, hidden, generator=g)
        unet_cases.append({"sample": torch.randn(b, C, h, w, generator=g), "timestep": t, "encoder_hidden_states": ehs})
    latent = ["batch", C, "height", "width"]
    unet = _Component(
        "unet",
        src.unet,
        tuple(unet_cases[-1].values()),
        ["sample", "timestep", "encoder_hidden_states"],
        "out",
        {
            "sample": {0: batch, 2: height, 3: width},
            "timestep": {0: batch},
            "encoder_hidden_states": {0: batch, 1: Dim("seq", min=1, max=1 << 12)},
        },
        {h_name: "height", w_name: "width"},
        {
            "sample": {"dtype": "float32", "shape": latent},
            "timestep": {"dtype": "float32", "shape": ["batch"]},
            "encoder_hidden_states": {"dtype": "float32", "shape": ["batch", "seq", hidden]},
        },
        {"out": {"dtype": "float32", "shape": ["batch", src.out_channels, "height", "width"]}},
        unet_cases,
        lambda c: {
            "batch": int(c["sample"].shape[0]),
            "size": list(c["sample"].shape[2:]),
            "timesteps": [round(float(v), 4) for v in c["timestep"]],
        },
        f"at batch sizes {list(batches)} on {list(sizes[0])} latents and {b_big} on {list(sizes[1])}",
        False,
    )

    # VAE decoder: latents as the runtime feeds them (divided by scaling_factor), at both sizes
    vae_cases = [
        {"latent_sample": torch.randn(b, C, h, w, generator=g) / src.scaling_factor}
        for b, (h, w) in [(b_small, sizes[0]), (b_big, sizes[1])]
    ]
    f = src.vae_scale_factor
    vae_decoder = _Component(
        "vae_decoder",
        src.vae_decoder,
        tuple(vae_cases[-1].values()),
        ["latent_sample"],
        "sample",
        {"latent_sample": {0: batch, 2: Dim("height", min=1, max=MAX_SIDE), 3: Dim("width", min=1, max=MAX_SIDE)}},
        {},
        {"latent_sample": {"dtype": "float32", "shape": latent}},
        {"sample": {"dtype": "float32", "shape": ["batch", src.image_channels, f"{f}*height", f"{f}*width"]}},
        vae_cases,
        lambda c: {"batch": int(c["latent_sample"].shape[0]), "size": list(c["latent_sample"].shape[2:])},
        f"on latents / scaling_factor at batch {b_small} {list(sizes[0])} and {b_big} {list(sizes[1])}",
        True,
    )
    return [text_encoder, unet, vae_decoder]


def _export_component(
    c: _Component, folder: Path, *, opset: int, fp16: bool, optimize: bool, external_data_threshold: int, log: Log
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, float], str | None]:
    """Write and validate one component's graphs in ``folder``; return its manifest ``graphs`` entry, validation
    reports, optimisation entry, seconds, and why its optional fp16 graph was left out (else None)."""
    t0 = time.perf_counter()
    log(f"exporting the {c.name} to ONNX (opset {opset})")
    files = COMPONENT_GRAPH_FILES[c.name]
    written = write_component(
        c.module,
        c.example,
        c.input_names,
        folder,
        files,
        output_name=c.output_name,
        opset=opset,
        fp16=fp16,
        optimize=optimize,
        external_data_threshold=external_data_threshold,
        dynamic_shapes=c.dynamic_shapes,
        dim_names=c.dim_names,
    )
    seconds = {f"export_{c.name}_s": time.perf_counter() - t0}

    def check(graph: Path, precision: str, consequence: str) -> dict[str, Any]:
        return compare_graph(c.module, graph, precision, c.cases, c.describe, consequence=consequence)

    report, took, why = validate_written(
        written, check, log, c.where, fp16_optional=c.fp16_optional, prefix=f"{c.name}_"
    )
    seconds.update(took)
    entry = {"files": {p: files[p] for p in written.precisions}, "inputs": c.inputs, "outputs": c.outputs}
    return entry, report, written.optimization, seconds, why


def export_text_to_image(
    source: TextToImageSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    validation_batches: Sequence[int] = (1, 2),
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    optimize: bool = True,
    log: Log | None = _log_stderr,
) -> dict[str, Any]:
    """Export a ``StableDiffusionPipeline`` (a folder, or what :func:`load_text_to_image_source` returned) to a
    validated text-to-image bundle at ``out`` (see the module docstring); return the manifest.

    ``fp16`` adds fp16 graphs (the UNet's must validate; the text encoder's and VAE decoder's are left out, and
    why recorded, when they do not). ``validation_batches``: the batch sizes the graphs are validated at (the
    largest also at the second latent size). ``optimize``: fuse attention for ONNX Runtime where it validates.
    Graphs are always dynamic in batch, sequence length and latent size. An existing bundle at ``out`` is
    replaced; anything else there is refused; a failure leaves ``out`` as it was.
    """
    out = Path(out)
    log = log or (lambda _msg: None)
    _check_options(opset, None)
    batches = list(validation_batches)
    if not batches or not all(is_int(b) and b >= 1 for b in batches):
        raise ExportError(f"validation_batches must be positive batch sizes; got {batches!r}")
    batches = [int(b) for b in batches]
    check_destination(out)
    t0 = time.perf_counter()
    src = source if isinstance(source, TextToImageSource) else load_text_to_image_source(source)
    seconds: dict[str, float] = {"load_s": time.perf_counter() - t0}
    validation: dict[str, Any] = {}
    optimization: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    graphs: dict[str, Any] = {}
    with staging_folder(out) as folder:
        log(f"writing {TOKENIZER_FILE} and checking it against transformers' {type(src.tokenizer).__name__}")
        tokenizer_check = write_tokenizer(src, folder / TOKENIZER_FILE)
        for c in _components(src, batches):
            done = _export_component(
                c,
                folder,
                opset=opset,
                fp16=fp16,
                optimize=optimize,
                external_data_threshold=external_data_threshold,
                log=log,
            )
            graphs[c.name], validation[c.name], optimization[c.name], took, why = done
            seconds.update(took)
            if why is not None:
                skipped[c.name] = why
        write_json(folder / SCHEDULER_FILE, src.scheduler_config, sort_keys=True)
        seconds["total_s"] = time.perf_counter() - t0
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "pipeline": TEXT_TO_IMAGE_PIPELINE,
            "model": src.model_section(),
            "graphs": graphs,
            "files": file_table(folder),
            "engines": [],
            "export": {
                "opset": opset,
                "precisions": {name: list(report) for name, report in validation.items()},
                "validation": validation,
                **({"fp16_skipped": skipped} if fp16 else {}),
                "optimization": optimization,
                "tokenizer": tokenizer_check,
                **export_facts(seconds),
            },
        }
        write_json(folder / MANIFEST_NAME, manifest)
    log(f"wrote {out} ({', '.join(manifest['files'])}) in {seconds['total_s']:.1f} s")
    return manifest
