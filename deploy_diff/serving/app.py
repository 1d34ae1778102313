"""The Ray Serve application behind ``deploy-diff serve``: an HTTP ingress and the model replicas.

```
client --HTTP--> Serve's proxy --> Ingress (routes, request rules, timeout, PNG) --handle--> Model replicas
                                                                                   (dynamic batching, Pipeline)
```

* **Ingress** (one replica, no CPU reserved): answers ``GET /v1/health`` and ``GET /v1/model`` itself, checks a
  ``POST /v1/generate`` body (:mod:`deploy_diff.serving.requests`), calls a model replica, enforces the request
  timeout (504) and encodes the PNGs. Every error is answered with ``{"error": {"field", "message"}}``; a model
  replica that dies under a request gives that request a 503.
* **Model** (``replicas`` replicas, ``threads`` CPUs each): one :class:`~deploy_diff.runtime.pipeline.Pipeline`
  with ``num_threads=threads``. A request is split into one call per image; Ray Serve's ``@serve.batch`` gathers
  up to ``max_batch_size`` images (waiting at most ``batch_wait_ms`` for a batch to fill), the images that share
  their sampling settings (steps, scheduler, guidance, eta) run as one ``pipe(...)`` call with one seed per image,
  so an image is the same whatever it is batched with. Serve forms the next batch as soon as the previous one
  starts, from what arrives within ``batch_wait_ms``; so that a batch holds everything that arrived while the
  previous one sampled, requests arriving during a batch wait for it to end and then queue together. The pipeline
  runs in a thread: the replica's event loop keeps answering while a batch samples. A replica never dies from a
  request: errors are answers.

:class:`Server` starts it all (Ray, Serve's HTTP proxy, the application) and stops it; ``deploy-diff serve`` is a
:class:`Server` in the foreground.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import Response

from ..runtime.arguments import is_int
from ..runtime.bundle import Bundle, load_bundle
from ..runtime.pipeline import Pipeline
from ..runtime.schedulers import SCHEDULER_NAMES
from .requests import GenerateRequest, Limits, RequestError, RequestParser, ServeOptions, error_body, png_base64

__all__ = ["APP_NAME", "INGRESS", "MODEL", "Ingress", "Model", "ServeOptions", "Server", "build_app"]

APP_NAME = "deploy-diff"  # the Serve application's name
MODEL = "Model"  # the model deployment's name (serve.get_deployment_handle(MODEL, app_name=APP_NAME).stats)
INGRESS = "Ingress"
RECENT_REQUESTS = 4096  # request ids a model replica remembers (its stats' "recent_request_ids")
GRACEFUL_SHUTDOWN_S = 10.0  # how long a replica being stopped lets its requests finish
HEALTH_CHECK_PERIOD_S = 2.0  # how soon Serve notices a dead replica and starts another (Serve's default: 10 s)
logger = logging.getLogger("ray.serve")


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, error_body(field, message), headers)


def _request_id() -> str:
    try:
        return serve.context._get_serve_request_context().request_id
    except Exception:  # pragma: no cover - outside a request
        return ""


@serve.deployment(
    name=MODEL,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
    max_constructor_retry_count=3,
)
class Model:
    """A model replica: one pipeline, dynamic batching over images (see the module docstring)."""

    def __init__(self, bundle: str, threads: int, max_batch_size: int, batch_wait_s: float):
        from ._common import require_pixel_bundle

        self.bundle = require_pixel_bundle(load_bundle(bundle))
        self.pipe = Pipeline.from_bundle(self.bundle, num_threads=threads)
        self._pipes: dict[str | None, Pipeline] = {None: self.pipe}
        self.sample_image.set_max_batch_size(max_batch_size)
        self.sample_image.set_batch_wait_timeout_s(batch_wait_s)
        self._idle: asyncio.Event | None = None  # set while no batch samples (made on the replica's event loop)
        self._lock = threading.Lock()
        self._stats = {"model_calls": 0, "batches": 0, "images": 0, "requests": 0, "largest_batch": 0}
        self._recent: deque[str] = deque(maxlen=RECENT_REQUESTS)

    def _pipeline(self, scheduler: str | None) -> Any:
        pipe = self._pipes.get(scheduler)
        if pipe is None:  # another scheduler over the same runner (the runner is thread-safe)
            base = self.pipe
            pipe = type(base)(base.runner, base.model, base.scheduler_config, scheduler=scheduler, bundle=base.bundle)
            self._pipes[scheduler] = pipe
        return pipe

    def _sample(self, settings: tuple[Any, ...], seeds: list[int], labels: list[int | None]) -> np.ndarray:
        """One model batch: images sharing ``settings``, one seed (and label) each. Runs in a worker thread."""
        steps, scheduler, guidance, eta = settings
        with self._lock:
            self._stats["model_calls"] += 1
        return self._pipeline(scheduler)(
            num_images=len(seeds),
            num_inference_steps=steps,
            seed=list(seeds),
            guidance_scale=guidance,
            class_labels=None if labels[0] is None else list(labels),
            eta=eta,
            output_type="uint8",
        )

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    # the replica sets its own sizes in __init__ (set_max_batch_size); these are only the decorator's starting values
    @serve.batch(max_batch_size=ServeOptions.max_batch_size, batch_wait_timeout_s=ServeOptions.batch_wait_ms / 1000)
    async def sample_image(self, items: list[tuple[tuple[Any, ...], int, int | None]]) -> list[Any]:
        """Images of any requests (each item: settings, seed, label) -> one uint8 [H, W, C] image each, or the
        exception that stopped it. Items that share settings run as one pipeline call."""
        idle = self._idle_event()
        idle.clear()
        try:
            return await self._sample_batch(items)
        finally:
            idle.set()

    async def _sample_batch(self, items: list[tuple[tuple[Any, ...], int, int | None]]) -> list[Any]:
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, (settings, _, _) in enumerate(items):
            groups.setdefault(settings, []).append(i)
        with self._lock:
            self._stats["batches"] += 1
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(items))
        out: list[Any] = [None] * len(items)
        for settings, index in groups.items():
            seeds = [items[i][1] for i in index]
            labels = [items[i][2] for i in index]
            try:
                images = await asyncio.to_thread(self._sample, settings, seeds, labels)
                for i, image in zip(index, images):
                    out[i] = image
            except Exception as e:
                if len(index) == 1:
                    out[index[0]] = e
                    continue
                # an image that fails must not fail the others: each one alone, so only its own request errs
                for i, seed, label in zip(index, seeds, labels):
                    try:
                        out[i] = (await asyncio.to_thread(self._sample, settings, [seed], [label]))[0]
                    except Exception as e1:
                        out[i] = e1
        return out

    async def generate(self, request: GenerateRequest) -> np.ndarray:
        """The images of one checked request, uint8 [n, H, W, C] in the order of its seeds."""
        labels = request.class_labels or (None,) * request.num_images
        # Serve forms the next batch as soon as one starts, from what arrives within batch_wait_ms: requests that
        # arrive while a batch samples wait here for it to end, then queue together and fill the next batch
        await self._idle_event().wait()
        results = await asyncio.gather(
            *(self.sample_image((request.settings, seed, label)) for seed, label in zip(request.seeds, labels))
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        with self._lock:
            self._stats["requests"] += 1
            self._stats["images"] += len(results)
            self._recent.append(_request_id())
        return np.stack(results)

    def stats(self) -> dict[str, Any]:
        """Diagnostics of this replica: pipeline calls, batches, images, requests answered, the largest batch (in
        images), the ids of the last requests answered, and the process id."""
        with self._lock:
            return {**self._stats, "recent_request_ids": list(self._recent), "pid": os.getpid()}


@serve.deployment(
    name=INGRESS,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
)
class Ingress:
    """The HTTP API (see docs/serving.md): routes, request rules, timeout, answers."""

    def __init__(self, model: Any, bundle: str, limits: Limits, request_timeout_s: float, max_batch_size: int):
        b = load_bundle(bundle, verify=False)  # the driver and every model replica verify it
        self.model = model
        self.request_timeout_s = float(request_timeout_s)
        self.parser = RequestParser(b.model, b.scheduler_config(), limits)
        self.model_info = {
            **(b.manifest.get("model") or {}),
            "schedulers": list(SCHEDULER_NAMES),
            "default_scheduler": self.parser.default_scheduler,
            "limits": {
                "max_images": limits.max_images,
                "max_steps": limits.max_steps,
                "max_body_bytes": limits.max_body_bytes,
                "request_timeout_s": self.request_timeout_s,
                "max_batch_size": max_batch_size,
            },
        }

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except Exception as e:  # a request never takes the ingress down: an unexpected error is a 500
            logger.exception("deploy-diff: unexpected error answering %s %s", request.method, request.url.path)
            return _error(500, None, f"internal error: {type(e).__name__}: {str(e)[:500]}")

    async def _route(self, request: Request) -> Response:
        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        path = "/" + path.strip("/")
        routes = {"/v1/health": "GET", "/v1/model": "GET", "/v1/generate": "POST"}
        if path not in routes:
            return _error(404, None, f"no such endpoint {path[:200]!r}; the endpoints are {list(routes)}")
        if request.method != routes[path]:
            return _error(
                405, None, f"{path} takes {routes[path]}; got {request.method}", headers={"Allow": routes[path]}
            )
        if path == "/v1/health":
            return _json(200, {"status": "ok"})
        if path == "/v1/model":
            return _json(200, self.model_info)
        return await self._generate(request)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.parser.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise RequestError(413, None, f"the request body has {int(length):,} bytes; at most {limit:,} are taken")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, None, f"the request body is over {limit:,} bytes; at most {limit:,} are taken")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _generate(self, request: Request) -> Response:
        start = time.monotonic()
        try:
            parsed = self.parser.parse(await self._read_body(request))
        except RequestError as e:
            return _error(e.status, e.field, e.message)
        response = self.model.generate.remote(parsed)

        async def images() -> np.ndarray:
            return await response

        left = self.request_timeout_s - (time.monotonic() - start)
        try:
            result = await asyncio.wait_for(images(), timeout=max(left, 0.0))
        except asyncio.TimeoutError:
            response.cancel()
            return _error(504, None, f"the request took longer than this server's {self.request_timeout_s:g} s limit")
        except (RayActorError, DeploymentUnavailableError) as e:
            return _error(
                503,
                None,
                "the model replica serving this request stopped before answering (it is being replaced); "
                f"send the request again ({type(e).__name__})",
            )
        except RequestError as e:
            return _error(e.status, e.field, e.message)
        except Exception as e:
            return _error(500, None, f"sampling failed: {type(e).__name__}: {str(e)[:500]}")
        encoded = await asyncio.to_thread(lambda: [png_base64(im) for im in result])
        return _json(200, {"images": encoded, "seeds": list(parsed.seeds)})


def build_app(bundle: str | os.PathLike, options: ServeOptions | None = None) -> Any:
    """The Serve application serving ``bundle`` (a path every replica can read) with ``options``."""
    options = options or ServeOptions()
    path = str(Path(bundle).resolve())
    model = Model.options(
        num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.threads},
    ).bind(path, options.threads, options.max_batch_size, options.batch_wait_ms / 1000)
    return Ingress.bind(model, path, options.limits, options.request_timeout_s, options.max_batch_size)


def _check_port(host: str, port: int) -> None:
    """An ``OSError`` naming the reason when nothing could listen on ``host:port`` (in use, no such address)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another port or host") from None


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Server:
    """``bundle`` (a path every replica can read, or a :class:`Bundle` already verified) served over HTTP at
    ``http://host:port`` on Ray Serve.

    ``address``: join the Ray cluster there (``ray.init(address=...)``); None starts a local, loopback-only
    instance (stopped again by :meth:`stop`). ``app_name`` and ``route_prefix``: the Serve application (another
    name and prefix serve a second bundle beside the first). :meth:`start` verifies the bundle and opens its graph
    once (a bad bundle is refused before Ray starts), deploys, waits until ``GET /v1/health`` answers (at most
    ``startup_timeout_s``) and returns the URL.
    """

    def __init__(
        self,
        bundle: str | os.PathLike | Bundle,
        options: ServeOptions | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        address: str | None = None,
        app_name: str = APP_NAME,
        route_prefix: str = "/",
        startup_timeout_s: float = 300.0,
    ):
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a host name or IP address; got {host!r}")
        if not is_int(port) or not 1 <= port <= 65535:
            raise ValueError(f"port must be an int in [1, 65535]; got {port!r}")
        if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/'; got {route_prefix!r}")
        self.bundle = bundle
        self.options = options or ServeOptions()
        self.host, self.port, self.address = host, int(port), address
        self.app_name, self.route_prefix = app_name, route_prefix
        self.startup_timeout_s = startup_timeout_s
        self._started_ray = self._started_serve = self._deployed = False

    @property
    def url(self) -> str:
        """Where clients call it: ``http://HOST:PORT`` (plus the route prefix, when not ``/``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"

    @property
    def _local_url(self) -> str:
        """The URL this process checks the server at (a wildcard host is reached on the loopback interface)."""
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}
        host = wildcard.get(self.host, f"[{self.host}]" if ":" in self.host else self.host)
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"

    def start(self) -> str:
        import ray

        from ._common import ray_init, require_pixel_bundle

        bundle = self.bundle if isinstance(self.bundle, Bundle) else load_bundle(self.bundle, verify=True)
        require_pixel_bundle(bundle)  # a bad bundle never gets as far as Ray
        Pipeline.from_bundle(bundle, num_threads=1).runner.close()  # nor a graph that does not open or fit its manifest
        self.bundle = bundle.path
        if not ray.is_initialized() and self.address is None:
            _check_port(self.host, self.port)
        self._started_ray = not ray.is_initialized()
        ray_init(address=self.address)
        try:
            self._deploy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _deploy(self) -> None:
        import ray

        opts = self.options
        if self.address is None and self._started_ray:
            cpus = ray.cluster_resources().get("CPU", 0)
            if opts.replicas * opts.threads > cpus:
                raise ValueError(
                    f"replicas={opts.replicas} x threads={opts.threads} need {opts.replicas * opts.threads} CPUs; "
                    f"this machine's Ray instance has {cpus:g}"
                )
        status = serve.status()
        if not status.proxies:
            serve.start(http_options={"host": self.host, "port": self.port}, proxy_location="HeadOnly")
            self._started_serve = True
        elif self.app_name in status.applications:
            raise ValueError(
                f"a Serve application named {self.app_name!r} already runs on this Ray cluster; stop it first"
            )
        app = build_app(self.bundle, opts)
        deadline = time.monotonic() + self.startup_timeout_s
        self._deployed = True
        if hasattr(serve, "run_many"):
            serve.run_many(
                [serve.RunTarget(app, name=self.app_name, route_prefix=self.route_prefix)],
                wait_for_ingress_deployment_creation=False,
                wait_for_applications_running=False,
            )
            self._wait_running(deadline)
        else:  # pragma: no cover - older Ray: Serve's own (unbounded) wait
            serve.run(app, name=self.app_name, route_prefix=self.route_prefix)
        self._wait_answers(deadline)

    def _wait_running(self, deadline: float) -> None:
        while True:
            app = serve.status().applications.get(self.app_name)
            state = str(getattr(app, "status", "")) if app is not None else ""
            if state.endswith("RUNNING"):
                return
            if state.endswith("DEPLOY_FAILED"):
                raise RuntimeError(f"the Serve application failed to start: {getattr(app, 'message', '')}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the Serve application did not start within {self.startup_timeout_s:g} s (status {state!r}); "
                    "are enough CPUs free for replicas x threads?"
                )
            time.sleep(0.2)

    def _wait_answers(self, deadline: float) -> None:
        url = self._local_url + "/v1/health"
        last = ""
        while time.monotonic() < deadline:
            try:
                status, _ = _get(url, timeout=2.0)
                if status == 200:
                    return
                last = f"status {status}"
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
        raise TimeoutError(
            f"Serve's HTTP proxy did not answer at {url} within {self.startup_timeout_s:g} s ({last}); a Serve "
            "instance already running on the cluster keeps its own host and port"
        )

    def stop(self) -> None:
        """Delete the application; stop Serve when this server started it and no other application runs on it, and
        the local Ray instance when this server started it."""
        import ray

        if not ray.is_initialized():
            return
        try:
            if self._started_ray and self._started_serve:
                serve.shutdown()  # all of it is ours
            else:
                if self._deployed:
                    serve.delete(self.app_name)
                if self._started_serve and not serve.status().applications:
                    serve.shutdown()
        finally:
            self._deployed = self._started_serve = False
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    def model_stats(self) -> dict[str, Any]:
        """A model replica's :meth:`Model.stats` (diagnostics; with several replicas, one of them)."""
        handle = serve.get_deployment_handle(MODEL, app_name=self.app_name)
        return handle.stats.remote().result(timeout_s=30)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
