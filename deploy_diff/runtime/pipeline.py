"""``Pipeline``: sample images from a bundle without torch, equal to diffusers' pipelines for the same seed.

A thin layer over :func:`deploy_diff.runtime.sampling.sample`: it loads and verifies the bundle, builds a
backend runner and, per call, a fresh scheduler and torch-compatible generators, then converts the result to
images. One ``Pipeline`` may be called from several threads at once: each call owns its scheduler and noise,
and the runner is thread-safe (a CUDA-graph runner serialises its calls).

    pipe = Pipeline.from_bundle("bundles/digits", scheduler="dpmsolver++")
    images = pipe(num_images=16, num_inference_steps=20, seed=0)      # float32 [16, H, W, C] in [0, 1]
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .arguments import check_class_labels, check_guidance_scale, check_num_images, check_seeds, is_int
from .backends.base import parse_device
from .bundle import PIXEL_PIPELINE, Bundle, BundleError, ModelInfo, load_bundle
from .images import to_images
from .precisions import BACKENDS, SUPPORTED_PRECISIONS, check_precision
from .rng import TorchGenerator
from .sampling import sample
from .schedulers import SCHEDULER_NAMES, load_scheduler, scheduler_from_name

__all__ = [
    "BACKENDS",
    "Pipeline",
    "build_scheduler",
    "check_backend",
    "check_scheduler",
    "graph_for",
    "inference_steps",
    "select_backend",
    "select_backend_for",
    "seed_generators",
]

DEFAULT_INFERENCE_STEPS = 50  # for bundles that record no default_inference_steps
MAX_ELEMENTS = 1 << 31  # latent values per call (8 GiB of float32): a larger request is refused up front


def select_backend(
    backend: str, device: str = "cpu", precision: str = "fp32", onnxruntime_options: bool = False
) -> str:
    """The backend that runs ``device`` in ``precision``: ``backend`` itself, checked, or for ``"auto"`` OpenVINO
    when it is installed, ``device`` is the CPU and OpenVINO computes in ``precision``, else ONNX Runtime (always
    ONNX Runtime when ``onnxruntime_options``: the caller set ONNX Runtime's own ``providers`` / ``cuda_graph``).

    Reduced precision is never chosen here: ``precision`` is what the caller asked for. Raises ``ValueError`` for
    an unknown backend or device, or a precision the backend does not compute in.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}; got {backend!r}")
    kind, _ = parse_device(device)
    if backend == "auto":
        from .backends.openvino import openvino_available

        on_openvino = (
            kind == "cpu"
            and not onnxruntime_options
            and precision in SUPPORTED_PRECISIONS["openvino"]
            and openvino_available()
        )
        backend = "openvino" if on_openvino else "onnxruntime"
    if backend == "openvino" and kind != "cpu":
        raise ValueError(f"the openvino backend supports device 'cpu' only; got {device!r}")
    check_precision(backend, precision)
    return backend


def select_backend_for(
    backend: str, device: str, precision: str, cuda_graph: bool, providers: Sequence[Any] | None
) -> str:
    """:func:`select_backend` for a ``from_bundle`` call: ``cuda_graph`` and ``providers`` are ONNX Runtime's own
    options, so they pin ``"auto"`` to it, and any other backend given them is a ``ValueError``."""
    backend = select_backend(backend, device, precision, cuda_graph or providers is not None)
    if backend != "onnxruntime" and (cuda_graph or providers is not None):
        raise ValueError(f"cuda_graph and providers are ONNX Runtime options; the {backend} backend takes neither")
    return backend


def check_scheduler(scheduler: Any) -> str | Any | None:
    """A pipeline's ``scheduler`` argument, returned as given: None, a name of
    :data:`~.schedulers.SCHEDULER_NAMES` (any case) or a scheduler instance (anything with ``step``). ``ValueError``
    for an unknown name, ``TypeError`` for anything else."""
    if isinstance(scheduler, str) and scheduler.lower() not in SCHEDULER_NAMES:
        raise ValueError(
            f"unknown scheduler {scheduler!r}; expected one of {list(SCHEDULER_NAMES)} or a scheduler instance"
        )
    if scheduler is not None and not isinstance(scheduler, str) and not hasattr(scheduler, "step"):
        raise TypeError(f"scheduler must be a name or a scheduler instance; got {type(scheduler).__name__}")
    return scheduler


def build_scheduler(scheduler: str | Any | None, scheduler_config: dict[str, Any], prediction_type: str) -> Any:
    """A fresh scheduler for one call (schedulers keep per-run state, so calls never share one): the bundle's own
    (``scheduler`` None, from ``scheduler_config``), one by name built from that config as diffusers'
    ``Other.from_config`` would, or a deep copy of an instance. ``ValueError`` when its ``prediction_type`` is not
    the model's."""
    if scheduler is None:
        sched = load_scheduler(scheduler_config)
    elif isinstance(scheduler, str):
        sched = scheduler_from_name(scheduler, scheduler_config)
    else:
        sched = copy.deepcopy(scheduler)
    pt = getattr(sched, "config", {}).get("prediction_type")
    if pt is not None and pt != prediction_type:
        raise ValueError(
            f"the scheduler's prediction_type is {pt!r} but the model predicts {prediction_type!r}; configure the "
            f"scheduler with prediction_type={prediction_type!r}"
        )
    return sched


def seed_generators(seed: Any, n: int) -> TorchGenerator | list[TorchGenerator]:
    """The noise of a call making ``n`` images (``seed`` checked by :func:`~.arguments.check_seeds`): one
    torch-compatible generator for an int (diffusers' ``generator=torch.manual_seed(seed)``) or for None (a random
    seed), one per image for a list."""
    seeds = check_seeds(seed, n)
    if seeds is None:
        return TorchGenerator(secrets.randbits(32))
    if isinstance(seeds, list):
        return [TorchGenerator(s) for s in seeds]
    return TorchGenerator(seeds)


def graph_for(bundle: Bundle, backend: str, precision: str) -> Path:
    """The file ``backend`` opens to compute in ``precision``: ONNX Runtime the bundle's graph of that precision,
    OpenVINO the fp32 graph (it lowers the arithmetic itself), TensorRT the engine the manifest records in that
    precision (else the one whose file name states it). ``BundleError`` when the bundle has no such file."""
    if backend == "onnxruntime":
        return bundle.graph_path(precision)
    if backend == "openvino":
        return bundle.graph_path("fp32")
    from .backends.tensorrt import engine_precision

    engines = bundle.engines
    if not engines:
        raise ValueError(
            f"bundle {bundle.path} has no TensorRT engine (export_bundle(..., tensorrt=True) on the GPU that will "
            "run it)"
        )
    recorded = {
        str(e.get("file")): e.get("precision") for e in bundle.manifest.get("engines") or [] if isinstance(e, dict)
    }
    precisions = {
        e: recorded.get(e.relative_to(bundle.path).as_posix()) or engine_precision(e) or "fp32" for e in engines
    }
    wanted = [e for e in engines if precisions[e] == precision]
    if not wanted:
        raise BundleError(
            f"bundle {bundle.path} has no {precision} TensorRT engine; it has {sorted(set(precisions.values()))}"
        )
    return wanted[0]


def check_backend(bundle: Bundle, backend: str, device: str = "cpu", precision: str = "fp32") -> str:
    """The backend :meth:`Pipeline.from_bundle` would open for these arguments (``"auto"`` resolved), after checking
    what can be checked without building a runner: the pair itself, the file it opens, and for OpenVINO that it
    is installed and the CPU computes in ``precision``. Raises what ``from_bundle`` would."""
    backend = select_backend(backend, device, precision)
    graph_for(bundle, backend, precision)
    if backend == "openvino":
        from .backends.openvino import require_precision

        require_precision(precision)
    return backend


def _check_runner_matches(runner: Any, bundle: Bundle) -> None:
    """The graph must take what the manifest says (a hand-edited bundle could pair them wrongly)."""
    m = bundle.model
    names = tuple(getattr(runner, "input_names", ()) or ())
    if names and set(names) != set(m.input_names):
        raise BundleError(
            f"{bundle.path}: the graph's inputs {list(names)} differ from the manifest's {list(m.input_names)}"
        )
    shape = getattr(runner, "sample_shape", None)
    if shape is not None:
        want = (m.in_channels, *m.sample_size)
        if any(d is not None and d != w for d, w in zip(shape, want)):
            raise BundleError(
                f"{bundle.path}: the graph takes samples [B, {', '.join(map(str, shape))}] but the "
                f"manifest says [B, {', '.join(map(str, want))}]"
            )


def inference_steps(num_inference_steps: Any, model: ModelInfo, own_scheduler: bool = True) -> Any:
    """The step count a call samples with: ``num_inference_steps``, or the model's ``default_inference_steps`` when
    None (50 for bundles that record none). With the bundle's own scheduler (``own_scheduler``), a count above the
    model's ``max_inference_steps`` is a ``ValueError`` naming that maximum. Other values pass through unchanged for
    the step-count check of the caller."""
    if num_inference_steps is None:
        return model.default_inference_steps or DEFAULT_INFERENCE_STEPS
    if (
        own_scheduler
        and model.max_inference_steps is not None
        and is_int(num_inference_steps)
        and num_inference_steps > model.max_inference_steps
    ):
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is more than this model's sampler takes: "
            f"max_inference_steps={model.max_inference_steps} (its default is {model.default_inference_steps})"
        )
    return num_inference_steps


class Pipeline:
    """Sampling from one model (a runner) with any runtime scheduler.

    Usually built by :meth:`from_bundle`; the constructor takes any runner (for example the torch runner of the
    training side) with the model's :class:`~deploy_diff.runtime.bundle.ModelInfo` and a scheduler config.
    """

    def __init__(
        self,
        runner: Callable[..., np.ndarray],
        model: ModelInfo,
        scheduler_config: dict[str, Any],
        scheduler: str | Any | None = None,
        bundle: Bundle | None = None,
    ):
        self.runner = runner
        self.model = model
        self.scheduler_config = dict(scheduler_config)
        self.bundle = bundle
        self.scheduler = check_scheduler(scheduler)
        self.make_scheduler()  # fail now, not at the first call, when the config does not fit

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
    ) -> Pipeline:
        """Load and verify the bundle at ``path`` and open its graph with ``backend``.

        ``backend``: ``"onnxruntime"``, ``"openvino"`` (CPU), ``"tensorrt"`` (the bundle's engine), or ``"auto"``
        (:func:`select_backend`: OpenVINO when it is installed, ``device`` is the CPU and it computes in
        ``precision``, else ONNX Runtime). ``scheduler``: a name (``"ddpm"``, ``"ddim"``, ``"dpmsolver++"``,
        ``"euler"``, ``"euler_a"``, ``"heun"``, ``"unipc"``, ...) built from the bundle's
        ``scheduler_config.json`` as diffusers' ``Other.from_config`` would, an instance (copied per call), or
        None for the bundle's own scheduler. ``precision``: what is computed, ``"fp32"``, ``"fp16"`` or ``"bf16"``
        (:data:`~deploy_diff.runtime.backends.SUPPORTED_PRECISIONS` per backend; any other combination is a
        ``ValueError``): ONNX Runtime and TensorRT run the bundle's graph or engine of that precision, OpenVINO
        computes the fp32 graph in f32 or bf16. ``num_threads``: CPU threads (ONNX Runtime, OpenVINO).
        ``cuda_graph`` and ``providers``: ONNX Runtime only. ``cache_dir``: OpenVINO's compiled-model cache
        (off unless given; other backends ignore it).
        """
        bundle = path if isinstance(path, Bundle) else load_bundle(path, verify=verify)
        if bundle.pipeline != PIXEL_PIPELINE:
            raise ValueError(
                f"bundle {bundle.path} holds a {bundle.pipeline!r} pipeline: load it with "
                "deploy_diff.runtime.TextToImagePipeline.from_bundle (or deploy_diff.runtime.load, which picks the "
                "pipeline the manifest calls for); Pipeline samples pixel-space UNet bundles"
            )
        backend = select_backend_for(backend, device, precision, cuda_graph, providers)
        if backend == "onnxruntime":
            from .backends.onnxruntime import OnnxRuntimeRunner

            runner = OnnxRuntimeRunner(
                graph_for(bundle, backend, precision),
                device=device,
                providers=providers,
                num_threads=num_threads,
                cuda_graph=cuda_graph,
                precision=precision,
            )
        elif backend == "openvino":
            from .backends.openvino import OpenVINORunner

            runner = OpenVINORunner(
                graph_for(bundle, backend, precision), device=device, precision=precision, num_threads=num_threads,
                cache_dir=cache_dir,
            )  # fmt: skip
        else:
            from .backends.tensorrt import TensorRTRunner

            _, device_id = parse_device(device)  # TensorRT always runs on a GPU: "cpu" (the default) means GPU 0
            runner = TensorRTRunner(graph_for(bundle, backend, precision), device_id=device_id, precision=precision)
        _check_runner_matches(runner, bundle)
        return cls(runner, bundle.model, bundle.scheduler_config(), scheduler=scheduler, bundle=bundle)

    @property
    def precision(self) -> str:
        """What the runner computes in: ``"fp32"``, ``"fp16"`` or ``"bf16"``."""
        return getattr(self.runner, "precision", "fp32")

    # -- pieces -------------------------------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        """A fresh scheduler for one call (schedulers keep per-run state, so calls never share one; see
        :func:`build_scheduler`)."""
        return build_scheduler(self.scheduler, self.scheduler_config, self.model.prediction_type)

    # -- sampling -----------------------------------------------------------------------------------------
    def __call__(
        self,
        num_images: int = 1,
        num_inference_steps: int | None = None,
        seed: int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        class_labels: Any = None,
        eta: float = 0.0,
        latents: np.ndarray | None = None,
        output_type: str = "np",
        progress: bool = False,
        callback: Callable[[int, Any, np.ndarray], Any] | None = None,
    ) -> Any:
        """Sample ``num_images`` images; return them (see :func:`~deploy_diff.runtime.images.to_images`).

        ``num_inference_steps``: None takes the bundle's ``default_inference_steps`` (a distilled few-step model
        records its own), else 50; with the bundle's own scheduler, more than its ``max_inference_steps`` is a
        ``ValueError``.
        ``seed``: one int (one torch-compatible generator for the batch, as diffusers'
        ``generator=torch.manual_seed(seed)``), a list of ints (one generator per image: an image does not
        change with the batch it is in), or None (a random seed). ``output_type``: ``"np"`` float32
        [N, H, W, C] in [0, 1], ``"uint8"``, ``"pil"``, or ``"latent"`` (the raw float32 [N, C, H, W] sample).
        """
        n = check_num_images(num_images)
        if output_type not in ("np", "uint8", "pil", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'np', 'uint8', 'pil' or 'latent'")
        m = self.model
        if n * m.in_channels * m.sample_size[0] * m.sample_size[1] > MAX_ELEMENTS:
            raise ValueError(
                f"num_images={n} asks for more than {MAX_ELEMENTS:,} latent values in one call; sample "
                "in smaller batches"
            )
        # the model-aware rules; sample() checks the step count, eta and latents before any model call
        null = m.null_class_label if m.conditional else None
        guidance_scale = check_guidance_scale(guidance_scale, null, conditional=m.conditional)
        labels = check_class_labels(
            class_labels,
            n,
            null_class_label=null,
            num_classes=m.num_classes,
            conditional=m.conditional,
            where=f"num_images={n}",
        )
        num_inference_steps = self.inference_steps(num_inference_steps)
        generator = seed_generators(seed, n)
        shape = (n, m.in_channels, m.sample_size[0], m.sample_size[1])
        x = sample(
            self.runner,
            self.make_scheduler(),
            shape,
            num_inference_steps=num_inference_steps,
            generator=generator,
            guidance_scale=guidance_scale,
            class_labels=labels,
            null_class_label=null,
            eta=eta,
            latents=latents,
            callback=callback,
            progress=progress,
        )
        if output_type == "latent":
            return x
        return to_images(x, output_type)

    def inference_steps(self, num_inference_steps: int | None = None) -> int:
        """The step count a call samples with (:func:`inference_steps` for this pipeline's model and scheduler)."""
        return inference_steps(num_inference_steps, self.model, own_scheduler=self.scheduler is None)

    def __repr__(self) -> str:
        where = f" from {self.bundle.path}" if self.bundle is not None else ""
        sched = (
            self.scheduler
            if isinstance(self.scheduler, str)
            else type(self.scheduler).__name__
            if self.scheduler is not None
            else self.scheduler_config.get("_class_name", "DDPMScheduler")
        )
        return f"Pipeline({type(self.runner).__name__}{where}, scheduler={sched}, precision={self.precision})"
