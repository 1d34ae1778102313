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
from typing import Any

import numpy as np

from .bundle import Bundle, BundleError, ModelInfo, load_bundle
from .images import to_images
from .rng import TorchGenerator
from .sampling import sample
from .schedulers import SCHEDULER_NAMES, load_scheduler, scheduler_from_name

__all__ = ["BACKENDS", "Pipeline"]

BACKENDS = ("onnxruntime", "tensorrt")
MAX_ELEMENTS = 1 << 31  # latent values per call (8 GiB of float32): a larger request is refused up front


def _seed_value(seed: Any, what: str = "seed") -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{what} must be an int (or a list of ints, one per image); got {seed!r}")
    if not 0 <= seed < 2**64:  # torch.Generator.manual_seed's range; larger ones would alias smaller ones
        raise ValueError(f"{what} must lie in [0, 2**64); got {seed}")
    return int(seed)


def _check_runner_matches(runner: Any, bundle: Bundle) -> None:
    """The graph must take what the manifest says (a hand-edited bundle could pair them wrongly)."""
    m = bundle.model
    names = tuple(getattr(runner, "input_names", ()) or ())
    if names and set(names) != set(m.input_names):
        raise BundleError(f"{bundle.path}: the graph's inputs {list(names)} differ from the manifest's "
                          f"{list(m.input_names)}")
    shape = getattr(runner, "sample_shape", None)
    if shape is not None:
        want = (m.in_channels, *m.sample_size)
        if any(d is not None and d != w for d, w in zip(shape, want)):
            raise BundleError(f"{bundle.path}: the graph takes samples [B, {', '.join(map(str, shape))}] but the "
                              f"manifest says [B, {', '.join(map(str, want))}]")


class Pipeline:
    """Sampling from one model (a runner) with any runtime scheduler.

    Usually built by :meth:`from_bundle`; the constructor takes any runner (for example the torch runner of the
    training side) with the model's :class:`~deploy_diff.runtime.bundle.ModelInfo` and a scheduler config.
    """

    def __init__(self, runner: Callable[..., np.ndarray], model: ModelInfo, scheduler_config: dict[str, Any],
                 scheduler: str | Any | None = None, bundle: Bundle | None = None):
        self.runner = runner
        self.model = model
        self.scheduler_config = dict(scheduler_config)
        self.bundle = bundle
        if isinstance(scheduler, str) and scheduler.lower() not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {list(SCHEDULER_NAMES)} or a "
                             "scheduler instance")
        if scheduler is not None and not isinstance(scheduler, str) and not hasattr(scheduler, "step"):
            raise TypeError(f"scheduler must be a name or a scheduler instance; got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.make_scheduler()  # fail now, not at the first call, when the config does not fit

    @classmethod
    def from_bundle(cls, path: str | os.PathLike | Bundle, backend: str = "onnxruntime", device: str = "cpu",
                    scheduler: str | Any | None = None, precision: str = "fp32", num_threads: int | None = None,
                    cuda_graph: bool = False, providers: Sequence[Any] | None = None, verify: bool = True
                    ) -> Pipeline:
        """Load and verify the bundle at ``path`` and open its graph with ``backend``.

        ``scheduler``: a name (``"ddpm"``, ``"ddim"``, ``"dpmsolver++"``, ``"euler"``, ``"euler_a"``, ``"heun"``,
        ``"unipc"``, ...) built from the bundle's ``scheduler_config.json`` as diffusers'
        ``Other.from_config`` would, an instance (copied per call), or None for the bundle's own scheduler.
        ``precision`` picks ``unet.onnx`` or ``unet.fp16.onnx``.
        """
        bundle = path if isinstance(path, Bundle) else load_bundle(path, verify=verify)
        if backend == "onnxruntime":
            from .backends.onnxruntime import OnnxRuntimeRunner

            runner = OnnxRuntimeRunner(bundle.graph_path(precision), device=device, providers=providers,
                                       num_threads=num_threads, cuda_graph=cuda_graph)
        elif backend == "tensorrt":
            from .backends.tensorrt import TensorRTRunner

            engines = bundle.engines
            if not engines:
                raise ValueError(f"bundle {bundle.path} has no TensorRT engine (export with --tensorrt on the GPU "
                                 "that will run it)")
            wanted = [e for e in engines if f"_{precision}_" in e.name] or engines
            device_id = int(device.split(":", 1)[1]) if str(device).startswith("cuda:") else 0
            runner = TensorRTRunner(wanted[0], device_id=device_id)
        else:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        _check_runner_matches(runner, bundle)
        return cls(runner, bundle.model, bundle.scheduler_config(), scheduler=scheduler, bundle=bundle)

    # -- pieces -------------------------------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        """A fresh scheduler for one call (schedulers keep per-run state, so calls never share one)."""
        s = self.scheduler
        if s is None:
            sched = load_scheduler(self.scheduler_config)
        elif isinstance(s, str):
            sched = scheduler_from_name(s, self.scheduler_config)
        else:
            sched = copy.deepcopy(s)
        pt = getattr(sched, "config", {}).get("prediction_type")
        if pt is not None and pt != self.model.prediction_type:
            raise ValueError(f"the scheduler's prediction_type is {pt!r} but the model predicts "
                             f"{self.model.prediction_type!r}; configure the scheduler with "
                             f"prediction_type={self.model.prediction_type!r}")
        return sched

    def _labels(self, class_labels: Any, guidance_scale: float | None, n: int) -> tuple[Any, int | None]:
        m = self.model
        if not m.conditional:
            if class_labels is not None:
                raise ValueError("this model is unconditional: class_labels must be None")
            if guidance_scale is not None:
                raise ValueError("guidance_scale needs a class-conditional model trained with label dropout; this "
                                 "model is unconditional, so pass guidance_scale=None")
            return None, None
        if m.null_class_label is None:
            if guidance_scale is not None:
                raise ValueError("this class-conditional model has no null label (diffusers' class-conditional "
                                 "UNets have none), so classifier-free guidance is unavailable: pass "
                                 "guidance_scale=None")
            if class_labels is None:
                raise ValueError(f"this class-conditional model has no null label: pass class_labels (0.."
                                 f"{m.num_classes - 1}), one per image or one int")
        if class_labels is None:
            return None, m.null_class_label
        labels = np.asarray(class_labels)
        if labels.dtype.kind not in "iu" or labels.ndim > 1:
            raise ValueError(f"class_labels must be an int or a list of ints; got {class_labels!r}")
        if labels.ndim == 1 and labels.shape[0] != n:
            raise ValueError(f"got {labels.shape[0]} class_labels for num_images={n}; pass one per image or one int")
        allowed_max = m.num_classes if m.null_class_label == m.num_classes else m.num_classes - 1
        if labels.size and (labels.min() < 0 or labels.max() > allowed_max):
            raise ValueError(f"class_labels must lie in 0..{m.num_classes - 1}"
                             + (f" (or {m.null_class_label}, the null label)" if m.null_class_label is not None
                                else "") + f"; got {labels.tolist()}")
        return np.broadcast_to(labels.astype(np.int64), (n,)).copy(), m.null_class_label

    def _generators(self, seed: Any, n: int) -> Any:
        if seed is None:
            return TorchGenerator(secrets.randbits(32))
        if isinstance(seed, (list, tuple, np.ndarray)):
            seeds = [_seed_value(s, "each seed") for s in seed]
            if len(seeds) != n:
                raise ValueError(f"got {len(seeds)} seeds for num_images={n}; pass one int or one seed per image")
            return [TorchGenerator(s) for s in seeds]
        return TorchGenerator(_seed_value(seed))

    # -- sampling -----------------------------------------------------------------------------------------
    def __call__(self, num_images: int = 1, num_inference_steps: int = 50, seed: int | Sequence[int] | None = None,
                 guidance_scale: float | None = None, class_labels: Any = None, eta: float = 0.0,
                 latents: np.ndarray | None = None, output_type: str = "np", progress: bool = False,
                 callback: Callable[[int, Any, np.ndarray], Any] | None = None) -> Any:
        """Sample ``num_images`` images; return them (see :func:`~deploy_diff.runtime.images.to_images`).

        ``seed``: one int (one torch-compatible generator for the batch, as diffusers'
        ``generator=torch.manual_seed(seed)``), a list of ints (one generator per image: an image does not
        change with the batch it is in), or None (a random seed). ``output_type``: ``"np"`` float32
        [N, H, W, C] in [0, 1], ``"uint8"``, ``"pil"``, or ``"latent"`` (the raw float32 [N, C, H, W] sample).
        """
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise ValueError(f"num_images must be a positive int; got {num_images!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int; got {num_inference_steps!r}")
        if output_type not in ("np", "uint8", "pil", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'np', 'uint8', 'pil' or 'latent'")
        n = int(num_images)
        m = self.model
        if n * m.in_channels * m.sample_size[0] * m.sample_size[1] > MAX_ELEMENTS:
            raise ValueError(f"num_images={n} asks for more than {MAX_ELEMENTS:,} latent values in one call; sample "
                             "in smaller batches")
        labels, null = self._labels(class_labels, guidance_scale, n)
        generator = self._generators(seed, n)
        shape = (n, m.in_channels, m.sample_size[0], m.sample_size[1])
        x = sample(self.runner, self.make_scheduler(), shape, num_inference_steps=int(num_inference_steps),
                   generator=generator, guidance_scale=guidance_scale, class_labels=labels, null_class_label=null,
                   eta=eta, latents=latents, callback=callback, progress=progress)
        if output_type == "latent":
            return x
        return to_images(x, output_type)

    def __repr__(self) -> str:
        where = f" from {self.bundle.path}" if self.bundle is not None else ""
        sched = self.scheduler if isinstance(self.scheduler, str) else \
            type(self.scheduler).__name__ if self.scheduler is not None else \
            self.scheduler_config.get("_class_name", "DDPMScheduler")
        return f"Pipeline({type(self.runner).__name__}{where}, scheduler={sched})"
