"""``TextToImagePipeline``: Stable Diffusion text-to-image from a bundle without torch, equal to diffusers'
``StableDiffusionPipeline`` for the same seed.

A text-to-image bundle holds three graphs (text encoder, UNet, VAE decoder) and a tokenizer. A call tokenizes the
prompts (:class:`~.tokenizer.PromptTokenizer`), encodes them, samples latents with the one sampling loop
(:func:`~.sampling.sample`, through a runner that supplies the prompt embeddings to the UNet) and decodes them,
with diffusers' arithmetic: guidance above 1 runs the negative and the positive prompts in one UNet batch,
negative first, and mixes ``uncond + g * (text - uncond)``; the latents are drawn as diffusers draws them for
``generator=torch.manual_seed(seed)`` and scaled by the scheduler's ``init_noise_sigma``; the VAE decodes
``latents / scaling_factor``. One pipeline may be called from several threads at once: each call owns its
scheduler, noise and embeddings, and the runners and the tokenizer are thread-safe.

    pipe = TextToImagePipeline.from_bundle("bundles/sd15", scheduler="dpmsolver++")
    images = pipe("a photo of an astronaut riding a horse", num_inference_steps=20, seed=0)  # float32 [1, H, W, 3]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .arguments import check_guidance_scale, is_int
from .backends.base import parse_device
from .bundle import TEXT_TO_IMAGE_PIPELINE, Bundle, BundleError, TextToImageInfo, load_bundle
from .images import to_images
from .pipeline import MAX_ELEMENTS, build_scheduler, check_scheduler, seed_generators, select_backend_for
from .sampling import NonFiniteError, sample
from .tokenizer import PromptTokenizer, check_prompts

__all__ = ["COMPONENTS", "TextToImagePipeline", "component_precision"]

#: the graphs of a text-to-image bundle, in the order a call runs them
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
DEFAULT_INFERENCE_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5

_log = logging.getLogger(__name__)


def _engines(bundle: Bundle) -> dict[tuple[str, str], Path]:
    """(component, precision) -> the bundle's TensorRT engine: the manifest's ``engines`` records say both
    (``component`` absent: the UNet; ``precision`` absent: what the file name states, else fp32)."""
    from .backends.tensorrt import engine_precision

    records = {str(e.get("file")): e for e in bundle.manifest.get("engines") or [] if isinstance(e, dict)}
    found: dict[tuple[str, str], Path] = {}
    for path in bundle.engines:
        record = records.get(path.relative_to(bundle.path).as_posix(), {})
        precision = record.get("precision") or engine_precision(path) or "fp32"
        found.setdefault((str(record.get("component", "unet")), str(precision)), path)
    return found


def component_precision(bundle: Bundle, component: str, backend: str, precision: str) -> str:
    """What ``component`` computes in when the pipeline is opened in ``precision``: the UNet in ``precision``; the
    text encoder and VAE decoder in ``precision`` where the bundle has a graph (ONNX Runtime) or an engine
    (TensorRT) of theirs in it, which export writes only when it validates, else in fp32 (always fp32 on
    OpenVINO: its bf16 is validated for the UNet only)."""
    if component == "unet" or precision == "fp32":
        return precision
    if backend == "onnxruntime" and precision in bundle.component_precisions(component):
        return precision
    if backend == "tensorrt" and (component, precision) in _engines(bundle):
        return precision
    return "fp32"


def _graph_file(bundle: Bundle, component: str, backend: str, precision: str) -> Path:
    """The file ``backend`` opens for ``component`` in ``precision`` (see :func:`~.pipeline.graph_for`)."""
    if backend == "onnxruntime":
        return bundle.graph_path(precision, component)
    if backend == "openvino":
        return bundle.graph_path("fp32", component)
    engine = _engines(bundle).get((component, precision))
    if engine is None:
        raise BundleError(
            f"bundle {bundle.path} has no {precision} TensorRT engine for its {component}: the tensorrt backend "
            f"needs one per graph ({', '.join(COMPONENTS)}), recorded with its component in the manifest's engines"
        )
    return engine


def _open_graph(bundle: Bundle, component: str, backend: str, device: str, precision: str, **options: Any) -> Any:
    """A runner (``unet=False``: called with ``run({name: array})``) over ``component``'s graph."""
    path = _graph_file(bundle, component, backend, precision)
    if backend == "onnxruntime":
        from .backends.onnxruntime import OnnxRuntimeRunner

        cuda_graph = options["cuda_graph"] and component == "unet"
        return OnnxRuntimeRunner(
            path,
            device=device,
            providers=options["providers"],
            num_threads=options["num_threads"],
            cuda_graph=cuda_graph,
            precision=precision,
            unet=False,
        )
    if backend == "openvino":
        from .backends.openvino import OpenVINORunner

        return OpenVINORunner(
            path,
            device=device,
            precision=precision,
            num_threads=options["num_threads"],
            cache_dir=options["cache_dir"],
            unet=False,
        )
    from .backends.tensorrt import TensorRTRunner

    _, device_id = parse_device(device)  # TensorRT always runs on a GPU: "cpu" (the default) means GPU 0
    return TensorRTRunner(path, device_id=device_id, precision=precision, unet=False)


def _check_graph(runner: Any, bundle: Bundle, component: str) -> None:
    """The graph must take what the manifest says (a hand-edited bundle could pair them wrongly)."""
    listed = set(bundle.graphs[component].inputs) if component in bundle.graphs else set()
    names = set(getattr(runner, "input_names", ()) or ())
    if listed and names and names != listed:
        raise BundleError(
            f"{bundle.path}: the {component} graph's inputs {sorted(names)} differ from the manifest's {sorted(listed)}"
        )
    if component == "text_encoder":
        seq = (getattr(runner, "input_shapes", {}).get("input_ids") or (None, None))[1:2]
        if seq and seq[0] is not None and seq[0] != bundle.model.model_max_length:
            raise BundleError(
                f"{bundle.path}: the text encoder takes {seq[0]} tokens but the tokenizer pads to "
                f"model_max_length={bundle.model.model_max_length}"
            )


class _PromptUNet:
    """The UNet as a runner of :func:`~.sampling.sample`: it supplies one call's prompt embeddings.

    ``sample()`` stacks the conditional half first (``[x, x]`` with one timestep, then ``uncond + g * (cond -
    uncond)``); diffusers batches the negative prompts first. The two halves of the sample are equal, so the UNet
    is run in diffusers' order (``encoder_hidden_states`` = [negative; positive]) and its two output halves are
    handed back swapped: the UNet sees exactly diffusers' batch.
    """

    def __init__(self, unet: Any, positive: np.ndarray, negative: np.ndarray | None):
        self.unet = unet
        self.batch = len(positive)
        self.guided = negative is not None
        self.embeddings = np.concatenate([negative, positive]) if negative is not None else positive

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels: Any = None) -> np.ndarray:
        b = self.batch
        if len(sample) != len(self.embeddings):
            raise ValueError(f"the UNet got {len(sample)} samples for {len(self.embeddings)} prompt embeddings")
        out = self.unet.run({"sample": sample, "timestep": timestep, "encoder_hidden_states": self.embeddings})
        return np.concatenate([out[b:], out[:b]]) if self.guided else out


def _check_finite(x: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise NonFiniteError(
            f"the {what} output has {bad} non-finite value(s) (an fp16 overflow or a broken graph are the usual causes)"
        )
    return x


class TextToImagePipeline:
    """Text-to-image sampling from a text encoder, a UNet and a VAE decoder (runners with ``run({name: array})``),
    a tokenizer and any runtime scheduler.

    Usually built by :meth:`from_bundle`; the constructor takes any runners with the bundle's graph interfaces
    (``input_ids`` -> hidden states; ``sample``, ``timestep``, ``encoder_hidden_states`` -> noise;
    ``latent_sample`` -> image), a :class:`~.tokenizer.PromptTokenizer`, the bundle's
    :class:`~.bundle.TextToImageInfo` and a scheduler config.
    """

    def __init__(
        self,
        text_encoder: Any,
        unet: Any,
        vae_decoder: Any,
        tokenizer: Callable[[list[str]], np.ndarray],
        model: TextToImageInfo,
        scheduler_config: Mapping[str, Any],
        scheduler: str | Any | None = None,
        bundle: Bundle | None = None,
    ):
        self.text_encoder, self.unet, self.vae_decoder = text_encoder, unet, vae_decoder
        self.tokenizer = tokenizer
        self.model = model
        self.scheduler_config = dict(scheduler_config)
        self.bundle = bundle
        self.scheduler = check_scheduler(scheduler)
        self.make_scheduler()  # fail now, not at the first call, when the config does not fit

    def make_scheduler(self) -> Any:
        """A fresh scheduler for one call, built as :meth:`Pipeline.make_scheduler` builds it
        (:func:`~.pipeline.build_scheduler`), then with the two settings diffusers' ``StableDiffusionPipeline``
        forces on the scheduler it is given: ``steps_offset=1`` and ``clip_sample=False`` wherever the scheduler has
        them (a DDIM built from an SD folder's PNDM config that does not name ``clip_sample`` would otherwise clip
        its x0 predictions)."""
        sched = build_scheduler(self.scheduler, self.scheduler_config, self.model.prediction_type)
        config = dict(getattr(sched, "config", None) or {})
        fixes = {}
        if config.get("steps_offset", 1) != 1:
            fixes["steps_offset"] = 1
        if config.get("clip_sample", False) is True:
            fixes["clip_sample"] = False
        from_config = getattr(type(sched), "from_config", None)
        return from_config({**config, **fixes}) if fixes and from_config is not None else sched

    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike | Bundle,
        backend: str = "onnxruntime",
        device: str = "cpu",
        scheduler: str | Any | None = None,
        precision: str = "fp32",
        num_threads: int | None = None,
        cuda_graph: bool = False,
        providers: Sequence[Any] | None = None,
        verify: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> TextToImagePipeline:
        """Load and verify the text-to-image bundle at ``path`` and open its three graphs with ``backend``.

        The arguments are :meth:`Pipeline.from_bundle`'s. ``precision`` is what the UNet computes in; the text
        encoder and VAE decoder compute in it where the bundle has their graph in it, else in fp32
        (:func:`component_precision`; ``pipe.precisions`` says what each runs). ``cuda_graph`` applies to the UNet
        (static shapes only). A pixel-space bundle is refused (open it with :class:`~.pipeline.Pipeline`, or
        :func:`deploy_diff.runtime.load` either kind).
        """
        bundle = path if isinstance(path, Bundle) else load_bundle(path, verify=verify)
        if bundle.pipeline != TEXT_TO_IMAGE_PIPELINE:
            raise BundleError(
                f"bundle {bundle.path} is a {bundle.pipeline!r} bundle (a pixel-space UNet), not a text-to-image "
                "one: open it with Pipeline.from_bundle, or deploy_diff.runtime.load for either kind"
            )
        backend = select_backend_for(backend, device, precision, cuda_graph, providers)
        tokenizer = PromptTokenizer.from_bundle(bundle)
        options = dict(providers=providers, num_threads=num_threads, cuda_graph=cuda_graph, cache_dir=cache_dir)
        runners: dict[str, Any] = {}
        try:
            for component in COMPONENTS:
                p = component_precision(bundle, component, backend, precision)
                runners[component] = _open_graph(bundle, component, backend, device, p, **options)
                _check_graph(runners[component], bundle, component)
        except BaseException:
            for runner in runners.values():
                runner.close()
            raise
        return cls(
            runners["text_encoder"],
            runners["unet"],
            runners["vae_decoder"],
            tokenizer,
            bundle.model,
            bundle.scheduler_config(),
            scheduler=scheduler,
            bundle=bundle,
        )

    @property
    def precision(self) -> str:
        """What the UNet computes in: ``"fp32"``, ``"fp16"`` or ``"bf16"``."""
        return getattr(self.unet, "precision", "fp32")

    @property
    def precisions(self) -> dict[str, str]:
        """What each graph computes in, by component."""
        return {c: getattr(getattr(self, c), "precision", "fp32") for c in COMPONENTS}

    @property
    def runner(self) -> Any:
        """The UNet's runner (the name :class:`~.pipeline.Pipeline` gives its one runner)."""
        return self.unet

    def close(self) -> None:
        """Close the three runners (their sessions, compiled models or engines); idempotent."""
        for c in COMPONENTS:
            close = getattr(getattr(self, c), "close", None)
            if close is not None:
                close()

    def __enter__(self) -> TextToImagePipeline:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- pieces -------------------------------------------------------------------------------------------
    @staticmethod
    def inference_steps(num_inference_steps: int | None = None) -> int:
        """The step count a call samples with: ``num_inference_steps``, or 50 (diffusers' default) when None."""
        return DEFAULT_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps

    def image_size(self, height: Any = None, width: Any = None) -> tuple[int, int]:
        """``(height, width)`` of the images a call makes: each given one, or the UNet's ``sample_size`` times the
        VAE's ``vae_scale_factor`` when None. ``ValueError`` unless a positive int divisible by the bundle's
        ``size_multiple`` (the VAE's factor times the UNet's downsampling factor: the exported UNet takes latent
        sides divisible by the latter)."""
        m, f, multiple = self.model, self.model.vae_scale_factor, self.model.size_multiple
        if multiple == f:
            why = f"the VAE's factor: one latent pixel is {f}x{f} image pixels"
        else:
            why = (
                f"the VAE's factor {f} times the UNet's downsampling factor {multiple // f}: the UNet takes latent "
                f"sides divisible by {multiple // f}"
            )
        sides = []
        for name, value, default in (("height", height, m.sample_size[0]), ("width", width, m.sample_size[1])):
            value = default * f if value is None else value
            if not is_int(value) or value < multiple or value % multiple:
                raise ValueError(f"{name} must be a positive int divisible by {multiple} ({why}); got {value!r}")
            sides.append(int(value))
        return sides[0], sides[1]

    def encode_prompt(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompt embeddings float32[len(prompts), model_max_length, text_hidden_size]: tokenized, then encoded by
        the text encoder (one batch). A prompt longer than the tokenizer's maximum is truncated, with a warning
        naming what was dropped (as diffusers warns)."""
        texts = check_prompts(prompts)
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            ids, dropped = encode(texts)
            for text in dropped:
                if text:
                    _log.warning(
                        "part of a prompt was truncated (the text encoder takes %d tokens): %r",
                        self.model.model_max_length,
                        text,
                    )
        else:
            ids = np.asarray(self.tokenizer(texts), dtype=np.int64)
        return _check_finite(np.asarray(self.text_encoder.run({"input_ids": ids}), np.float32), "text encoder")

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """Latents float32[B, C, h, w] -> the VAE decoder's images float32[B, 3, h*f, w*f] in about [-1, 1]:
        ``latents / scaling_factor`` decoded, as diffusers decodes them."""
        x = np.asarray(latents, dtype=np.float32) / np.float32(self.model.scaling_factor)
        return _check_finite(np.asarray(self.vae_decoder.run({"latent_sample": x}), np.float32), "VAE decoder")

    # -- sampling -----------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = DEFAULT_INFERENCE_STEPS,
        guidance_scale: float | None = DEFAULT_GUIDANCE_SCALE,
        seed: int | Sequence[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | None = None,
        output_type: str = "np",
        eta: float = 0.0,
        progress: bool = False,
        callback: Callable[[int, Any, np.ndarray], Any] | None = None,
    ) -> Any:
        """Images for ``prompt`` (one str, or a list: ``num_images_per_prompt`` images each, in prompt order).

        ``negative_prompt``: None (the empty prompt), one str for every prompt, or a list with one per prompt; used
        only when ``guidance_scale > 1`` (classifier-free guidance; ``None`` or <= 1 runs the prompts alone).
        ``num_inference_steps``: None means 50. ``seed``: one int (one torch-compatible generator for the whole
        batch, as diffusers' ``generator=torch.manual_seed(seed)``), a list with one int per image, or None (a
        random seed). ``height`` / ``width``: image pixels, divisible by the bundle's ``size_multiple`` (default: the
        UNet's sample size times the VAE's factor). ``latents``: float32[N, C, height/f, width/f] starting noise
        instead of drawing it (scaled by the scheduler's ``init_noise_sigma`` like drawn noise). ``output_type``:
        ``"np"`` float32 [N, H, W, 3] in [0, 1], ``"uint8"``, ``"pil"``, or ``"latent"`` (the final latents, float32
        [N, C, h, w], not decoded). ``eta``: DDIM's noise weight. ``callback(step_index, timestep, latents)`` after
        every step.

        Raises ``TypeError`` for a prompt that is not a str or a list of str, ``ValueError`` for any other bad
        argument (before a graph runs), :class:`~.sampling.NonFiniteError` naming the step when the latents stop
        being finite.
        """
        prompts = check_prompts(prompt)
        negatives = None if negative_prompt is None else check_prompts(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) != len(prompts):
            if len(negatives) == 1 and isinstance(negative_prompt, str):
                negatives = negatives * len(prompts)
            else:
                raise ValueError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one negative_prompt "
                    "per prompt, or one str for all"
                )
        if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int; got {num_images_per_prompt!r}")
        if output_type not in ("np", "uint8", "pil", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'np', 'uint8', 'pil' or 'latent'")
        guidance_scale = check_guidance_scale(guidance_scale, null_class_label=0)
        guided = guidance_scale is not None and guidance_scale > 1.0
        m = self.model
        n = len(prompts) * int(num_images_per_prompt)
        height, width = self.image_size(height, width)
        f = m.vae_scale_factor
        shape = (n, m.in_channels, height // f, width // f)
        if n * max(2 * m.in_channels, m.image_channels * f * f) * shape[2] * shape[3] > MAX_ELEMENTS:
            raise ValueError(
                f"{n} image(s) of {height}x{width} ask for more than {MAX_ELEMENTS:,} values in one call; sample "
                "in smaller batches"
            )
        num_inference_steps = self.inference_steps(num_inference_steps)
        generator = seed_generators(seed, n)  # the seed is checked before any graph runs
        scheduler = self.make_scheduler()

        # one text encoder batch: the negative prompts ("" where none is given, as diffusers) then the prompts
        p, k = len(prompts), int(num_images_per_prompt)
        embeddings = self.encode_prompt(((negatives or [""] * p) + prompts) if guided else prompts)
        positive = np.repeat(embeddings[-p:], k, axis=0)  # each prompt's k rows together, as diffusers repeats them
        negative = np.repeat(embeddings[:p], k, axis=0) if guided else None

        x = sample(
            _PromptUNet(self.unet, positive, negative),
            scheduler,
            shape,
            num_inference_steps=num_inference_steps,
            generator=generator,
            guidance_scale=guidance_scale if guided else None,
            null_class_label=0 if guided else None,  # sample()'s guidance needs one; _PromptUNet ignores labels
            eta=eta,
            latents=latents,
            callback=callback,
            progress=progress,
        )
        if output_type == "latent":
            return x
        return to_images(self.decode_latents(x), output_type)

    def __repr__(self) -> str:
        where = f" from {self.bundle.path}" if self.bundle is not None else ""
        sched = (
            self.scheduler
            if isinstance(self.scheduler, str)
            else type(self.scheduler).__name__
            if self.scheduler is not None
            else self.scheduler_config.get("_class_name", "PNDMScheduler")
        )
        return (
            f"TextToImagePipeline({type(self.unet).__name__}{where}, scheduler={sched}, precisions={self.precisions})"
        )
