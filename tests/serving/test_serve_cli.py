"""``deploy-diff serve`` as a user runs it: in the foreground until SIGTERM / Ctrl-C, the line that says where it
serves, clean shutdown, and the refusals that come before Ray starts."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import threading
import time

import pytest

pytest.importorskip("ray.serve", reason="needs the serve extra (ray[serve])")

from _serving import free_port, http, rehash, run_cli, start_cli  # noqa: E402

START_TIMEOUT_S = 180  # a local Ray instance, Serve and a model replica on a busy 2-core machine
STOP_TIMEOUT_S = 60


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line.rstrip("\n"))
    out.put(None)


def _wait_for_line(lines: queue.Queue, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting {prefix!r} within {timeout} s")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serves_in_the_foreground_until_signalled(cond_run_bundle, stop_signal):
    port = free_port()
    proc = start_cli(str(cond_run_bundle), "--port", str(port), "--max-batch-size", "4", "--request-timeout-s", "60")
    try:
        stdout: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(proc.stdout, stdout), daemon=True).start()
        line = _wait_for_line(stdout, "serving ", START_TIMEOUT_S)
        url = f"http://127.0.0.1:{port}"
        assert line == f"serving {cond_run_bundle} at {url}"
        assert http("GET", url + "/v1/health", timeout=10)[:2] == (200, {"status": "ok"})  # it answers already
        status, answer, _ = http("POST", url + "/v1/generate", {"seed": 3, "num_inference_steps": 5}, timeout=60)
        assert status == 200 and answer["seeds"] == [3] and len(answer["images"]) == 1
        proc.send_signal(stop_signal)
        code = proc.wait(timeout=STOP_TIMEOUT_S)
        stderr = proc.stderr.read()
        assert code == 0, stderr[-3000:]
        assert "deploy-diff serve: stopped" in stderr
        with pytest.raises(OSError):  # nothing listens any more
            http("GET", url + "/v1/health", timeout=5)
        # Ray's processes (started in the server's process group) are gone too
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("processes of the server's group still run after it stopped")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_refuses_a_bad_bundle_before_starting_ray(cond_run_bundle, tmp_path):
    torn = tmp_path / "torn"
    shutil.copytree(cond_run_bundle, torn)
    with open(torn / "unet.onnx", "ab") as f:
        f.write(b"\0")
    t0 = time.monotonic()
    r = run_cli(str(torn), "--port", str(free_port()))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().startswith("deploy-diff serve: error: BundleError:") and "unet.onnx" in r.stderr
    assert "Ray" not in r.stderr and time.monotonic() - t0 < 60

    other = tmp_path / "t2i"
    shutil.copytree(cond_run_bundle, other)
    manifest = json.loads((other / "deploy_diff.json").read_text())
    (other / "deploy_diff.json").write_text(json.dumps({**manifest, "pipeline": "text2img"}))
    r = run_cli(str(other))
    assert r.returncode == 1
    assert "deploy-diff serve: error: BundleError:" in r.stderr and "pipeline 'text2img'" in r.stderr

    broken = tmp_path / "broken"
    shutil.copytree(cond_run_bundle, broken)
    data = (broken / "unet.onnx").read_bytes()
    (broken / "unet.onnx").write_bytes(data[: len(data) // 3])  # truncated, with a manifest that agrees
    rehash(broken)
    r = run_cli(str(broken))
    assert r.returncode == 1 and "ONNX Runtime cannot load" in r.stderr and "Ray" not in r.stderr

    r = run_cli(str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "no bundle at" in r.stderr


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-batch-size", "0"], "--max-batch-size must be a positive int"),
        (["--replicas", "0"], "--replicas must be a positive int"),
        (["--request-timeout-s", "0"], "--request-timeout-s must be a finite number > 0"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must be a number in [0, 60000]"),
        (["--port", "70000"], "--port must be an int in [1, 65535]"),
    ],
)
def test_refuses_bad_flags(cond_run_bundle, flags, words):
    r = run_cli(str(cond_run_bundle), *flags)
    assert r.returncode == 1 and words in r.stderr, r.stderr


def test_refuses_a_busy_port_before_starting_ray(cond_run_bundle):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli(str(cond_run_bundle), "--port", str(port))
    assert r.returncode == 1 and r.stdout == ""
    assert f"deploy-diff serve: error: OSError: cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
