"""``deploy-diff serve``'s application on a real local Ray instance (2 CPUs, loopback): the HTTP API, images equal
to a local pipeline's for their seeds whatever they were batched with, dynamic batching counted, every error's
status and body, the request timeout, and a model replica killed under load.

One Ray instance and one served application for the module (Ray's start-up is the slow part); the replica-kill test
runs last."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve", reason="needs the serve extra (ray[serve])")

from _serving import decode_png, free_port, http, local_image, within_one_level  # noqa: E402

from deploy_diff.runtime.bundle import load_bundle  # noqa: E402
from deploy_diff.runtime.pipeline import Pipeline  # noqa: E402
from deploy_diff.runtime.schedulers import SCHEDULER_NAMES  # noqa: E402

BATCH = 8  # images per model batch
LIMITS = dict(max_images=8, max_steps=200)


@pytest.fixture(scope="module")
def server(cond_run_bundle):
    import ray

    from deploy_diff.serving._common import ray_init
    from deploy_diff.serving.app import ServeOptions, Server

    ray_init(num_cpus=2)
    srv = Server(
        cond_run_bundle,
        ServeOptions(max_batch_size=BATCH, batch_wait_ms=50, request_timeout_s=60, **LIMITS),
        port=free_port(),
        startup_timeout_s=180,
    )
    try:
        srv.start()
        yield srv
    finally:
        try:
            srv.stop()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def pipe(cond_run_bundle):
    return Pipeline.from_bundle(cond_run_bundle, num_threads=1)


def test_health_and_model(server, cond_run_bundle):
    assert http("GET", server.url + "/v1/health")[:2] == (200, {"status": "ok"})
    status, info, headers = http("GET", server.url + "/v1/model")
    assert status == 200 and headers["content-type"] == "application/json"
    manifest_model = load_bundle(cond_run_bundle).manifest["model"]
    assert {k: info[k] for k in manifest_model} == manifest_model
    assert info["schedulers"] == list(SCHEDULER_NAMES) and info["default_scheduler"] == "ddpm"
    assert info["limits"]["max_images"] == LIMITS["max_images"] and info["limits"]["max_batch_size"] == BATCH


def test_concurrent_clients_get_their_seeds_images_and_batching_happens(server, pipe):
    """16 clients at once, mixed settings; each image equals pipe(num_images=1, seed=[s], ...) within one level."""
    requests = [{"seed": 100 + i, "class_labels": i % 10, "num_inference_steps": 20} for i in range(11)]
    requests += [
        {"seeds": [7, 3, 7], "class_labels": [1, 2, 3], "guidance_scale": 2.0, "num_inference_steps": 20},
        {"num_images": 2, "seed": 40, "guidance_scale": 2.0, "num_inference_steps": 20},  # null labels, guided
        {"num_images": 2, "seed": 50, "num_inference_steps": 10, "scheduler": "ddim", "eta": 0.5},
        {"seed": 60, "num_inference_steps": 10, "scheduler": "dpmsolver++", "class_labels": 9},
        {"num_images": 4, "seed": 0, "class_labels": [0, 1, 2, 3], "num_inference_steps": 20},
    ]
    before = server.model_stats()
    barrier = threading.Barrier(len(requests), timeout=60)

    def call(body):
        barrier.wait()
        return http("POST", server.url + "/v1/generate", body)

    with ThreadPoolExecutor(len(requests)) as ex:
        answers = list(ex.map(call, requests))
    after = server.model_stats()

    for body, (status, answer, _) in zip(requests, answers):
        assert status == 200, answer
        n = len(body.get("seeds") or []) or body.get("num_images", 1)
        want_seeds = body.get("seeds") or [body["seed"] + i for i in range(n)]
        assert answer["seeds"] == want_seeds and len(answer["images"]) == n
        labels = body.get("class_labels")
        labels = labels if isinstance(labels, list) else [labels] * n
        extra = {k: body[k] for k in ("guidance_scale", "eta") if k in body}
        ref_pipe = pipe if "scheduler" not in body else Pipeline(
            pipe.runner, pipe.model, pipe.scheduler_config, scheduler=body["scheduler"]
        )  # fmt: skip
        for seed, label, b64 in zip(want_seeds, labels, answer["images"]):
            got = decode_png(b64)
            want = local_image(ref_pipe, seed, label, steps=body["num_inference_steps"], **extra)
            assert got.dtype == want.dtype and within_one_level(got, want), (body, seed)

    served = after["requests"] - before["requests"]
    calls = after["model_calls"] - before["model_calls"]
    assert served == len(requests)
    assert after["images"] - before["images"] == sum(len(a["images"]) for _, a, _ in answers)
    assert calls < served, f"{calls} model calls for {served} requests: no batching"
    assert 1 < after["largest_batch"] <= BATCH


@pytest.mark.parametrize(
    "method, path, body, status, field",
    [
        ("POST", "/v1/generate", b"{not json", 400, None),
        ("POST", "/v1/generate", b"[]", 400, None),
        ("POST", "/v1/generate", {"num_images": LIMITS["max_images"] + 1}, 413, "num_images"),
        ("POST", "/v1/generate", {"num_inference_steps": LIMITS["max_steps"] + 1}, 413, "num_inference_steps"),
        ("POST", "/v1/generate", b'{"seeds": [' + b"1, " * 40000 + b"1]}", 413, None),  # over 64 KiB
        ("POST", "/v1/generate", {"prompt": "a cat"}, 422, "prompt"),
        ("POST", "/v1/generate", {"num_images": "2"}, 422, "num_images"),
        ("POST", "/v1/generate", {"class_labels": 10.5}, 422, "class_labels"),
        ("POST", "/v1/generate", {"eta": 0.3}, 422, "eta"),
        ("POST", "/v1/generate", {"seed": 1, "seeds": [1]}, 422, "seeds"),
        ("GET", "/v1/generate", None, 405, None),
        ("POST", "/v1/health", b"{}", 405, None),
        ("GET", "/v2/generate", None, 404, None),
    ],
)
def test_errors_have_their_status_and_body(server, method, path, body, status, field):
    got, payload, headers = http(method, server.url + path, body)
    assert got == status, payload
    assert headers["content-type"] == "application/json"
    assert set(payload) == {"error"} and set(payload["error"]) == {"field", "message"}
    assert payload["error"]["field"] == field and isinstance(payload["error"]["message"], str)
    assert payload["error"]["message"]


def test_request_timeout_is_504(server, cond_run_bundle):
    """A second application on the same proxy, with a 50 ms limit: a long request is answered 504 on time."""
    from deploy_diff.serving.app import ServeOptions, Server

    tight = Server(
        cond_run_bundle,
        ServeOptions(request_timeout_s=0.05, max_steps=1000),
        port=server.port,
        app_name="deploy-diff-tight",
        route_prefix="/tight",
        startup_timeout_s=120,
    )
    try:
        tight.start()
        assert tight.url == server.url + "/tight"
        t0 = time.monotonic()
        status, payload, _ = http("POST", tight.url + "/v1/generate", {"num_inference_steps": 1000, "num_images": 2})
        assert status == 504, payload
        assert payload["error"]["field"] is None and "0.05 s" in payload["error"]["message"]
        assert time.monotonic() - t0 < 10
        assert http("GET", tight.url + "/v1/health")[0] == 200  # the replica is still there, answering
    finally:
        tight.stop()
    assert http("POST", server.url + "/v1/generate", {"num_inference_steps": 2})[0] == 200  # the other app unharmed


def test_replica_killed_during_load(server):
    """kill -9 of the model replica under load: the requests it held get a 5xx, none is run again by the new replica,
    and requests succeed again within 30 s. Long requests (200 steps), so that the replica holds some when it dies."""
    old = server.model_stats()
    results: list[tuple[float, float, int, dict, str]] = []  # sent, done, status, body, request id
    lock = threading.Lock()
    stop = threading.Event()
    killed_at: list[float] = []

    def client(i: int) -> None:
        for k in range(60):  # bounded: at most 60 requests per client
            if stop.is_set():
                return
            sent = time.monotonic()
            status, payload, headers = http(
                "POST", server.url + "/v1/generate", {"seed": 1000 * i + k, "num_inference_steps": 200}, timeout=60
            )
            with lock:
                results.append((sent, time.monotonic(), status, payload, headers.get("x-request-id", "")))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(results) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    # the clients move in step (their requests share batches): kill half a round after the last answers, when the
    # requests sent right after them are inside the replica, sampling (in transit, Serve would route them elsewhere)
    with lock:
        latency = sorted(done - sent for sent, done, *_ in results)[len(results) // 2]
        last_done = max(done for _, done, *_ in results)
    time.sleep(max(0.0, last_done + latency / 2 - time.monotonic()))
    killed_at.append(time.monotonic())
    os.kill(old["pid"], signal.SIGKILL)
    # keep the load on until requests sent after the kill have succeeded for a while
    while time.monotonic() < killed_at[0] + 45:
        with lock:
            late_ok = [r for r in results if r[0] > killed_at[0] and r[2] == 200]
        if len(late_ok) >= 12:
            break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)

    kill = killed_at[0]
    failed = [r for r in results if r[2] != 200]
    timeline = [(round(r[0] - kill, 2), round(r[1] - kill, 2), r[2]) for r in results if r[1] > kill - 1]
    assert failed, f"no request was held by the killed replica; (sent, done, status) around the kill: {timeline}"
    for _, _, status, payload, _ in failed:
        assert 500 <= status < 600 and payload["error"]["field"] is None, payload
    first_ok_after = min(r[1] for r in results if r[0] > kill and r[2] == 200)
    assert first_ok_after - kill < 30
    assert all(r[2] == 200 for r in results if r[0] > first_ok_after), "failures after the replacement answered"

    new = server.model_stats()
    assert new["pid"] != old["pid"]
    ids = new["recent_request_ids"]
    assert len(ids) == len(set(ids)), "a request was run twice"
    assert not {r[4] for r in failed} & set(ids), "a request answered with an error was run again"
    assert {r[4] for r in results if r[0] > first_ok_after} <= set(ids)
    assert new["requests"] == len(ids) <= sum(r[2] == 200 for r in results)
