"""Helpers of the serving tests: a free loopback port, an HTTP client with bounded waits, PNG decoding, the CLI in a
subprocess, and the local pipeline images the server's answers are compared with."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HTTP_TIMEOUT_S = 60.0  # no request of the tests waits longer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str, url: str, body: bytes | dict | None = None, timeout: float = HTTP_TIMEOUT_S, headers=None
) -> tuple[int, dict, dict]:
    """(status, decoded JSON body, headers with lower-case names) of one request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), e.headers
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = {"raw": raw.decode("utf-8", "replace")}
    return status, payload, {k.lower(): v for k, v in hdrs.items()}


def decode_png(b64: str) -> np.ndarray:
    """A base64 PNG -> uint8 [H, W, C]."""
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    return arr[..., None] if arr.ndim == 2 else arr


def local_image(pipe, seed: int, label: int | None = None, steps: int = 50, **kwargs) -> np.ndarray:
    """The reference: ``pipe(num_images=1, seed=[seed], ..., output_type="uint8")[0]``."""
    return pipe(
        num_images=1,
        seed=[seed],
        class_labels=None if label is None else [label],
        num_inference_steps=steps,
        output_type="uint8",
        **kwargs,
    )[0]


def within_one_level(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= 1


def rehash(bundle_dir: Path) -> None:
    """Make a bundle's manifest agree with its (edited) files again."""
    from deploy_diff.runtime.bundle import sha256_file

    manifest = json.loads((bundle_dir / "deploy_diff.json").read_text())
    for name, entry in manifest["files"].items():
        entry.update(sha256=sha256_file(bundle_dir / name), bytes=(bundle_dir / name).stat().st_size)
    (bundle_dir / "deploy_diff.json").write_text(json.dumps(manifest))


# `deploy-diff ARGS` with the serve command registered, whether or not the CLI lists it yet
CLI = (
    "import sys; from deploy_diff import cli; from deploy_diff.cli import serve; "
    "cli.COMMANDS.setdefault(serve.NAME, serve); sys.exit(cli.main(sys.argv[1:]))"
)


def cli_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def terminal_signals() -> None:
    """``preexec_fn`` giving a child the signal state a terminal gives a command: SIGINT and SIGTERM unblocked and
    at their default disposition. In the whole suite (not in tests/serving alone) children were seen to start with
    Ctrl-C undeliverable (inherited from the pytest process; the cause was not found), which no user's terminal does."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_cli(*args: str) -> subprocess.Popen:
    """``deploy-diff serve ARGS`` in a subprocess (its own process group), stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-c", CLI, "serve", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=terminal_signals,
    )


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI, "serve", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
