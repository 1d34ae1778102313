"""``deploy-diff serve`` under concurrent load: requests/s and p50/p99 latency with and without dynamic batching.

    .venv/bin/python benchmarks/serve_load.py [--bundle PATH] [--clients 16] [--requests 640] [--steps 50]
        [--batch-sizes 1,16] [--batch-wait-ms 10] [--rounds 2] [--json benchmarks/results/serve_load.json]
        [--md benchmarks/results/serve_load.md]

Without ``--bundle`` it builds the digits-size model (random weights, UNet2DModel 1x8x8, the layout of
benchmarks/_unet_layouts.py) and exports it. It starts one local Ray instance and, for each ``--max-batch-size`` in
``--batch-sizes``, serves the bundle on 127.0.0.1 (one model replica, ``--threads`` threads), warms it up, then
``--clients`` client threads (one keep-alive HTTP connection each) send ``--requests`` requests in all, each for one
image with its own seed, as fast as the answers come. Per configuration: requests/s (requests answered / wall time
from the first request sent to the last answer), p50 / p99 latency, failures, and the model's batches (images per
pipeline call, from the replica's diagnostics). ``--rounds`` repeats the configurations in turn (the table lists
every round; the summary takes each configuration's best requests/s). Everything runs on this machine (clients,
Serve's proxy, the ingress and the replica share its cores), so the numbers are for the whole stack on it.

Smoke run (seconds): --requests 48 --warmup 8 --steps 5 --rounds 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploy_diff.runtime._fileio import atomic_write_text

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(port: int, clients: int, requests: int, steps: int, seed0: int) -> dict[str, Any]:
    """``requests`` one-image requests from ``clients`` threads; latencies, statuses and the wall time."""
    lock = threading.Lock()
    next_i = [0]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while True:
                with lock:
                    i = next_i[0]
                    if i >= requests:
                        return
                    next_i[0] += 1
                body = json.dumps({"seed": seed0 + i, "num_inference_steps": steps})
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    payload = resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    status, payload = -1, f"{type(e).__name__}: {e}".encode()
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(dt)
                    elif len(errors) < 5:
                        errors.append(f"{status}: {payload[:200]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3600)
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    ok = int(statuses.get(200, 0))
    return {
        "requests": requests,
        "ok": ok,
        "failed": requests - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": ok / wall if wall > 0 else None,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "mean_ms": float(lat.mean()) if lat.size else None,
    }


def measure(bundle: Path, batch: int, args: argparse.Namespace, round_: int) -> dict[str, Any]:
    from deploy_diff.serving.app import ServeOptions, Server

    options = ServeOptions(
        max_batch_size=batch, batch_wait_ms=args.batch_wait_ms, threads=args.threads, max_steps=max(1000, args.steps)
    )
    server = Server(bundle, options, port=free_port(), startup_timeout_s=600)
    server.start()
    try:
        if args.warmup:
            run_load(server.port, args.clients, args.warmup, args.steps, seed0=10**9)
        before = server.model_stats()
        row = run_load(server.port, args.clients, args.requests, args.steps, seed0=0)
        after = server.model_stats()
    finally:
        server.stop()
    calls = after["model_calls"] - before["model_calls"]
    images = after["images"] - before["images"]
    row.update(
        round=round_,
        max_batch_size=batch,
        model_calls=calls,
        images_per_model_call=images / calls if calls else None,
        largest_batch=after["largest_batch"],
    )
    print(
        f"round {round_} max_batch_size {batch:>3}: {row['requests_per_s']:.1f} req/s, p50 {row['p50_ms']:.0f} ms, "
        f"p99 {row['p99_ms']:.0f} ms, {row['failed']} failed, {row['images_per_model_call'] or 0:.1f} images per "
        "model call",
        flush=True,
    )
    return row


def summarize(rows: list[dict[str, Any]], batch_sizes: list[int]) -> dict[str, Any]:
    best = {
        b: max((r for r in rows if r["max_batch_size"] == b), key=lambda r: r["requests_per_s"] or 0)
        for b in batch_sizes
    }
    base = best.get(1)
    out: dict[str, Any] = {
        str(b): {k: best[b][k] for k in ("requests_per_s", "p50_ms", "p99_ms", "images_per_model_call")}
        for b in batch_sizes
    }
    out["failed_requests"] = sum(r["failed"] for r in rows)
    if base is not None and base["requests_per_s"]:
        for b in batch_sizes:
            if b != 1 and best[b]["requests_per_s"]:
                out[f"speedup_{b}_vs_1"] = best[b]["requests_per_s"] / base["requests_per_s"]
    return out


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "# deploy-diff serve under load",
        "",
        f"{meta['clients']} concurrent clients, 1 image per request, {meta['requests']} requests per configuration, "
        f"{meta['steps']} steps ({meta['scheduler']}), bundle `{meta['bundle_kind']}`, one model replica with "
        f"{meta['threads']} thread(s), batch wait {meta['batch_wait_ms']} ms; {meta['machine']['cpus']} CPUs "
        f"({meta['machine']['cpu']}), load average before {meta['machine']['loadavg_before']}, after "
        f"{meta['machine']['loadavg_after']}. Clients, Serve's proxy, the ingress and the replica share the machine.",
        "",
        "| round | --max-batch-size | requests/s | p50 ms | p99 ms | failed | images per model call |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['max_batch_size']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['failed']} | {r['images_per_model_call'] or 0:.2f} |"
        )
    lines.append("")
    for key, value in summary.items():
        if key.startswith("speedup_"):
            lines.append(f"Dynamic batching ({key.split('_')[1]} images) / one at a time, best round each: "
                         f"**{value:.2f}x** requests/s.")  # fmt: skip
    lines.append(f"Failed requests over all rounds: {summary['failed_requests']}.")
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle to serve (default: build the digits-size model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=640, help="requests per configuration and round")
    parser.add_argument("--warmup", type=int, default=64, help="requests before each measurement (not counted)")
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps of every request")
    parser.add_argument("--batch-sizes", default="1,16", help="--max-batch-size values to compare (1 = no batching)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="threads of the model replica")
    parser.add_argument("--rounds", type=int, default=2, help="repeat the configurations in turn")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--md", help="write a markdown table here")
    parser.add_argument("--note", help="a line for the markdown")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if min(args.clients, args.requests, args.steps, args.rounds, *batch_sizes) < 1:
        parser.error("--clients, --requests, --steps, --rounds and every batch size must be >= 1")

    import ray

    from deploy_diff.runtime.bundle import load_bundle
    from deploy_diff.serving._common import ray_init

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle, kind = Path(args.bundle), str(args.bundle)
        else:
            from pipeline_speed import build  # benchmarks/ is sys.path[0] when run as a script

            bundle, kind = build("digits", Path(tmp)), "digits (random weights, UNet2DModel 1x8x8)"
        scheduler = load_bundle(bundle).scheduler_config().get("_class_name", "DDPMScheduler")
        load_before = os.getloadavg()
        ray_init()
        rows = []
        try:
            for round_ in range(1, args.rounds + 1):
                order = batch_sizes if round_ % 2 else batch_sizes[::-1]
                rows += [measure(bundle, b, args, round_) for b in order]
        finally:
            ray.shutdown()
        load_after = os.getloadavg()

    import onnxruntime

    meta = {
        "bundle_kind": kind,
        "clients": args.clients,
        "requests": args.requests,
        "warmup": args.warmup,
        "steps": args.steps,
        "scheduler": scheduler,
        "batch_wait_ms": args.batch_wait_ms,
        "threads": args.threads,
        "rounds": args.rounds,
        "note": args.note,
        "machine": {
            "cpu": cpu_model(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in load_after],
        },
        "versions": {
            "python": platform.python_version(),
            "ray": ray.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "command": " ".join(sys.argv),
    }
    summary = summarize(rows, batch_sizes)
    print(json.dumps(summary, indent=2), flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.md:
        atomic_write_text(args.md, markdown(meta, rows, summary))
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
