"""``deploy-diff serve``: a bundle behind an HTTP API on Ray Serve, in the foreground (docs/serving.md)."""

from __future__ import annotations

import argparse

from ._common import add_command

NAME = "serve"

EXAMPLES = (
    "examples:\n"
    "  deploy-diff serve bundles/digits                      # http://127.0.0.1:8000, a local Ray instance\n"
    "  deploy-diff serve bundles/digits --replicas 2 --max-batch-size 32 --port 8080\n"
    "  deploy-diff serve bundles/digits --address auto --host 0.0.0.0   # on a Ray cluster's head node\n"
    '  curl -s localhost:8000/v1/generate -d \'{"num_images": 4, "seed": 0}\''
)

# the library's option names in messages -> this command's flags
FLAG_WORDS = tuple(
    (rf"\b{name}\b", "--" + name.replace("_", "-"))
    for name in (
        "replicas",
        "threads",
        "max_batch_size",
        "batch_wait_ms",
        "max_images",
        "max_steps",
        "request_timeout_s",
        "port",
        "host",
    )
)
STATUS_EVERY_S = 5.0  # how often the foreground loop checks that the application still runs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        NAME,
        help="serve a bundle over HTTP (Ray Serve, dynamic batching)",
        description="Serve a pixel-space bundle over HTTP on Ray Serve until Ctrl-C or SIGTERM: POST /v1/generate, "
        "GET /v1/health, GET /v1/model (docs/serving.md). Needs the `serve` extra (ray[serve]).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1", help="interface the HTTP proxy listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--address", help="join the Ray cluster at this address (auto, HOST:6379, ray://HOST:10001); default: "
        "start a local Ray instance",
    )  # fmt: skip
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) per model replica (default 1)")
    p.add_argument(
        "--max-batch-size", type=int, default=16, help="images sampled in one model batch (default 16; 1: no batching)"
    )
    p.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill, in ms (default 10)"
    )
    p.add_argument("--max-images", type=int, default=64, help="images one request may ask for (default 64)")
    p.add_argument("--max-steps", type=int, default=1000, help="num_inference_steps one request may ask for")
    p.add_argument(
        "--request-timeout-s", type=float, default=300.0, help="answer 504 past this many seconds (default 300)"
    )
    p.set_defaults(func=run)


def _interrupt(signum, frame):  # SIGTERM stops the server the way Ctrl-C does
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Start the server, print ``serving BUNDLE at URL`` once it answers, serve until Ctrl-C / SIGTERM."""
    import signal
    import sys
    import time

    from ..runtime.bundle import load_bundle
    from ..serving._common import require_pixel_bundle
    from ..serving.requests import ServeOptions

    options = ServeOptions(
        replicas=args.replicas,
        threads=args.threads,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_images=args.max_images,
        max_steps=args.max_steps,
        request_timeout_s=args.request_timeout_s,
    )
    bundle = require_pixel_bundle(load_bundle(args.bundle, verify=True))  # all checked before Ray is imported
    try:
        from ray import serve
    except ImportError:
        raise ImportError(
            "deploy-diff serve needs Ray Serve: pip install 'deploy-diff[serve]' (or pip install 'ray[serve]')"
        ) from None
    from ..serving.app import Server

    server = Server(bundle, options, host=args.host, port=args.port, address=args.address)
    old = signal.getsignal(signal.SIGTERM)
    serving = False
    try:
        url = server.start()
        # ray.init installs its own SIGTERM handler (kill Ray's processes, exit 1): serving, SIGTERM is Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
        serving = True
        print(f"serving {args.bundle} at {url}", flush=True)
        while True:
            time.sleep(STATUS_EVERY_S)
            if server.app_name not in serve.status().applications:
                raise RuntimeError(f"the Serve application {server.app_name!r} is gone (deleted or Ray stopped)")
    except KeyboardInterrupt:
        if not serving:
            raise
        print(f"deploy-diff serve: stopping {url}", file=sys.stderr, flush=True)
    finally:
        try:
            server.stop()
        finally:
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
    print("deploy-diff serve: stopped", file=sys.stderr, flush=True)
    return 0
