"""The HTTP API's request rules: a ``POST /v1/generate`` body -> a checked :class:`GenerateRequest`, or a
:class:`RequestError` with the status, the field and the message the server answers with; and the server's
options (:class:`ServeOptions`, checked before anything starts).

No Ray here (numpy and the runtime's rules only), so the rules are tested and reused without a cluster. Each value
rule is the runtime's own (:mod:`deploy_diff.runtime.arguments`); this module adds what is HTTP's: the body size,
JSON, unknown fields, the server's limits, and the status codes:

* 400: the body is not JSON (or not a JSON object);
* 413: the body is over :data:`MAX_BODY_BYTES`, or ``num_images`` / ``num_inference_steps`` over the server's
  ``max_images`` / ``max_steps``;
* 422: a field unknown, of the wrong type, out of range, or missing where the model needs it (``class_labels`` for
  a class-conditional model without a null label).

Error bodies are ``{"error": {"field": NAME or null, "message": TEXT}}`` (:meth:`RequestError.body`).
"""

from __future__ import annotations

import base64
import io
import json
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.arguments import (
    SEED_LIMIT,
    check_class_labels,
    check_eta,
    check_guidance_scale,
    check_num_images,
    check_num_inference_steps,
    check_seeds,
    is_int,
    is_real,
)
from ..runtime.bundle import ModelInfo
from ..runtime.pipeline import inference_steps
from ..runtime.schedulers import SCHEDULER_CLASSES, SCHEDULER_NAMES, load_scheduler, scheduler_from_name

__all__ = [
    "FIELDS",
    "MAX_BODY_BYTES",
    "GenerateRequest",
    "Limits",
    "RequestError",
    "RequestParser",
    "ServeOptions",
    "error_body",
    "png_base64",
    "scheduler_short_name",
]

MAX_BODY_BYTES = 64 * 1024  # a generate body is a few hundred bytes; 64 KiB holds 2,900 seeds of 20 digits
#: the fields of a ``POST /v1/generate`` body and their defaults
FIELDS: dict[str, Any] = {
    "num_images": 1,
    "seed": 0,
    "seeds": None,
    "num_inference_steps": None,  # None: the bundle's default_inference_steps (a distilled model's), else 50
    "scheduler": None,
    "guidance_scale": None,
    "class_labels": None,
    "eta": 0.0,
}


def error_body(field: str | None, message: str) -> dict[str, Any]:
    """The body of every error answer: ``{"error": {"field": field, "message": message}}``."""
    return {"error": {"field": field, "message": message}}


class RequestError(ValueError):
    """A request the server refuses: the HTTP ``status``, the body ``field`` at fault (None: the body as a whole)
    and the ``message``."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message

    def body(self) -> dict[str, Any]:
        return error_body(self.field, self.message)

    def __reduce__(self):  # crosses process boundaries (Ray) with its status and field
        return (type(self), (self.status, self.field, self.message))


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: images per request, steps, body bytes."""

    max_images: int = 64
    max_steps: int = 1000
    max_body_bytes: int = MAX_BODY_BYTES

    def __post_init__(self):
        for name in ("max_images", "max_steps", "max_body_bytes"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")


@dataclass(frozen=True)
class ServeOptions:
    """How the application runs: ``replicas`` model replicas of ``threads`` CPU threads each, batches of up to
    ``max_batch_size`` images gathered for up to ``batch_wait_ms``, and the per-request limits (``max_images``,
    ``max_steps``, ``request_timeout_s``)."""

    replicas: int = 1
    threads: int = 1
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    max_images: int = 64
    max_steps: int = 1000
    request_timeout_s: float = 300.0

    def __post_init__(self):
        for name in ("replicas", "threads", "max_batch_size", "max_images", "max_steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not is_real(self.batch_wait_ms) or not 0 <= self.batch_wait_ms <= 60_000:
            raise ValueError(f"batch_wait_ms must be a number in [0, 60000]; got {self.batch_wait_ms!r}")
        if not is_real(self.request_timeout_s) or not 0 < self.request_timeout_s < float("inf"):
            raise ValueError(f"request_timeout_s must be a finite number > 0; got {self.request_timeout_s!r}")

    @property
    def limits(self) -> Limits:
        return Limits(max_images=self.max_images, max_steps=self.max_steps)

    @property
    def max_ongoing_requests(self) -> int:
        """Requests a model replica takes at once: enough for a batch to fill while the previous one samples."""
        return max(32, 2 * self.max_batch_size)


@dataclass(frozen=True)
class GenerateRequest:
    """A checked generate request: one seed (and one label, for class-conditional models) per image, and the
    sampling settings the images share. ``scheduler`` None is the bundle's own."""

    seeds: tuple[int, ...]
    num_inference_steps: int
    scheduler: str | None
    guidance_scale: float | None
    class_labels: tuple[int, ...] | None  # one per image; None for an unconditional model
    eta: float

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def settings(self) -> tuple[Any, ...]:
        """What images must share to be sampled in one model batch: steps, scheduler, guidance, eta."""
        return (self.num_inference_steps, self.scheduler, self.guidance_scale, self.eta)


def scheduler_short_name(config: dict[str, Any]) -> str:
    """The name (a key of ``SCHEDULER_NAMES``, e.g. ``"ddpm"``) that builds the scheduler of ``config`` (a
    scheduler config with ``_class_name``), or the class name when no name does."""
    class_name = config.get("_class_name", "DDPMScheduler")
    for name, (cls, overrides) in SCHEDULER_NAMES.items():
        defaults = SCHEDULER_CLASSES[cls]().config if overrides else {}
        if cls == class_name and all(config.get(k, defaults.get(k)) == v for k, v in overrides.items()):
            return name
    return str(class_name)


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


class RequestParser:
    """The request rules of one served model: ``parse(body_bytes) -> GenerateRequest`` or a :class:`RequestError`.

    ``model``: the bundle's :class:`ModelInfo`; ``scheduler_config``: its scheduler config (what ``"scheduler":
    null`` samples with, and what named schedulers are built from); ``limits``: the server's limits.
    """

    def __init__(self, model: ModelInfo, scheduler_config: dict[str, Any], limits: Limits | None = None):
        self.model = model
        self.scheduler_config = dict(scheduler_config)
        self.limits = limits or Limits()
        self.default_scheduler = scheduler_short_name(self.scheduler_config)
        self._make_scheduler(None)  # a config that builds no scheduler fails here, not at the first request

    def _make_scheduler(self, name: str | None) -> Any:
        if name is None:
            return load_scheduler(self.scheduler_config)
        return scheduler_from_name(name, self.scheduler_config)

    def parse(self, body: bytes) -> GenerateRequest:
        """The checked request of a ``POST /v1/generate`` body; raises :class:`RequestError`."""
        if len(body) > self.limits.max_body_bytes:
            raise RequestError(
                413, None, f"the request body has {len(body):,} bytes; at most {self.limits.max_body_bytes:,} are taken"
            )
        try:
            data = json.loads(body.decode("utf-8") if body else "", parse_constant=_json_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            reason = f"{type(e).__name__}: {str(e)[:200]}"
            raise RequestError(400, None, f"the request body is not JSON ({reason})") from None
        if not isinstance(data, dict):
            raise RequestError(400, None, f"the request body must be a JSON object; got {type(data).__name__}")
        return self.parse_fields(data)

    def parse_fields(self, data: dict[str, Any]) -> GenerateRequest:
        """The checked request of a decoded body (a dict); raises :class:`RequestError`."""
        unknown = [k for k in data if k not in FIELDS]
        if unknown:
            raise RequestError(
                422, str(unknown[0])[:100], f"unknown field {str(unknown[0])[:100]!r}; the fields are {list(FIELDS)}"
            )
        get = {**FIELDS, **data}.__getitem__
        m = self.model
        limits = self.limits

        # images and their seeds
        seeds_in, seed_in = get("seeds"), get("seed")
        if seeds_in is not None:
            if "seed" in data and seed_in is not None:
                raise RequestError(422, "seeds", "give seed (the first of consecutive seeds) or seeds, not both")
            if not isinstance(seeds_in, list) or not seeds_in:
                raise RequestError(422, "seeds", f"seeds must be a non-empty list of ints; got {seeds_in!r:.200}")
        if "num_images" in data or seeds_in is None:
            num_images = _checked(422, "num_images", check_num_images, get("num_images"))
            if num_images > limits.max_images:
                raise RequestError(
                    413, "num_images", f"num_images={num_images} is over this server's limit of {limits.max_images}"
                )
        else:  # the number of seeds given
            num_images = len(seeds_in)
            if num_images > limits.max_images:
                raise RequestError(
                    413, "seeds", f"{num_images} seeds ask for more images than this server's limit of "
                    f"{limits.max_images} per request",
                )  # fmt: skip
        if seeds_in is not None:
            seeds = _checked(422, "seeds", check_seeds, seeds_in, num_images)
        elif seed_in is None:  # a random first seed, returned in the answer's "seeds"
            first = secrets.randbits(32)
            seeds = [first + i for i in range(num_images)]
        else:
            if not is_int(seed_in):
                raise RequestError(
                    422, "seed", f"seed must be an int (the first image's seed; seeds takes a list) or null; got "
                    f"{seed_in!r:.100}",
                )  # fmt: skip
            first = _checked(422, "seed", check_seeds, seed_in, num_images)
            if first + num_images > SEED_LIMIT:
                raise RequestError(
                    422, "seed", f"seed={first} with num_images={num_images} runs past the last seed 2**64 - 1"
                )
            seeds = [first + i for i in range(num_images)]

        # sampling settings
        scheduler = get("scheduler")
        if scheduler is not None:
            if not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULER_NAMES:
                raise RequestError(
                    422, "scheduler", f"scheduler must be null (the bundle's own) or one of {list(SCHEDULER_NAMES)}; "
                    f"got {scheduler!r:.100}",
                )  # fmt: skip
            scheduler = scheduler.lower()
        sched = self._make_scheduler(scheduler)
        # the bundle's own step count when none is given, and its sampler's maximum: the Pipeline's rule
        steps = _checked(422, "num_inference_steps", inference_steps, get("num_inference_steps"), m, scheduler is None)
        if is_int(steps) and steps > limits.max_steps:
            raise RequestError(
                413,
                "num_inference_steps",
                f"num_inference_steps={steps} is over this server's limit of {limits.max_steps}",
            )
        steps = _checked(
            422, "num_inference_steps", check_num_inference_steps, steps, sched.config.get("num_train_timesteps")
        )
        _checked(422, "num_inference_steps", sched.set_timesteps, steps)  # the scheduler's own rules, before a batch
        null = m.null_class_label if m.conditional else None
        guidance = _checked(422, "guidance_scale", check_guidance_scale, get("guidance_scale"), null, m.conditional)
        labels = _checked(
            422,
            "class_labels",
            check_class_labels,
            get("class_labels"),
            num_images,
            null_class_label=null,
            num_classes=m.num_classes,
            conditional=m.conditional,
            where=f"num_images={num_images}",
        )
        eta = _checked(422, "eta", check_eta, get("eta"), sched)
        return GenerateRequest(
            seeds=tuple(seeds),
            num_inference_steps=steps,
            scheduler=scheduler,
            guidance_scale=guidance,
            class_labels=None if labels is None else tuple(int(v) for v in labels),
            eta=eta,
        )


def _checked(status: int, field: str, check: Any, *args: Any, **kwargs: Any) -> Any:
    """``check(*args, **kwargs)``, its ValueError / TypeError as a :class:`RequestError` for ``field``."""
    try:
        return check(*args, **kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        raise RequestError(status, field, str(e)) from None


def png_base64(image: np.ndarray) -> str:
    """uint8[H, W, C] (C = 1 or 3) -> a base64 PNG (ASCII)."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"png_base64 takes uint8 [H, W, 1 or 3]; got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
