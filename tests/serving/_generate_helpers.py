"""What the generate tests share: the command line (registered or not yet), the single-process reference images,
reading a generated folder back, and finding this process's own generate workers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from deploy_diff.serving.generate import BATCH_SIZE, MANIFEST, iter_shards

REPO = Path(__file__).resolve().parents[2]


def cli(argv: list[str]) -> int:
    """``deploy-diff generate ARGV`` in this process: through ``deploy_diff.cli.main`` once the command is
    registered, else through the module's own parser with main's handling (an error: one line, exit 1; an
    interrupt: exit 130)."""
    from deploy_diff.cli import COMMANDS, main

    if "generate" in COMMANDS:
        return main(["generate", *argv])
    from deploy_diff.cli import generate as generate_cli
    from deploy_diff.cli._common import error_line

    parser = argparse.ArgumentParser(prog="deploy-diff")
    generate_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", *argv])
    try:
        return generate_cli.run(args)
    except KeyboardInterrupt:
        print("deploy-diff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(error_line("generate", e, generate_cli.FLAG_WORDS), file=sys.stderr)
        return 1


# the same, as a separate process (a driver the test can interrupt)
CLI_SCRIPT = (
    "import sys; sys.path.insert(0, {helpers!r}); from _generate_helpers import cli; sys.exit(cli(sys.argv[1:]))"
)


def cli_command(argv: list[str]) -> list[str]:
    script = CLI_SCRIPT.format(helpers=str(Path(__file__).parent))
    return [sys.executable, "-c", script, *argv]


def reference(
    bundle,
    num_images: int,
    shard_size: int,
    steps: int,
    scheduler: str | None = None,
    seed_base: int = 0,
    labels: np.ndarray | None = None,
    guidance: float | None = None,
) -> np.ndarray:
    """The images of a single-process run with a plain Pipeline (one thread): per-image seeds, each shard sampled
    in chunks of BATCH_SIZE images, as the contract says."""
    from deploy_diff.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, scheduler=scheduler, num_threads=1)
    parts = []
    for shard_start in range(0, num_images, shard_size):
        shard_end = min(shard_start + shard_size, num_images)
        for start in range(shard_start, shard_end, BATCH_SIZE):
            end = min(start + BATCH_SIZE, shard_end)
            parts.append(
                pipe(
                    num_images=end - start,
                    num_inference_steps=steps,
                    seed=[seed_base + i for i in range(start, end)],
                    guidance_scale=guidance,
                    class_labels=None if labels is None else labels[start:end].tolist(),
                    output_type="uint8",
                )
            )
    return np.concatenate(parts)


def one_by_one(bundle, seeds, steps: int, scheduler: str | None = None, labels=None, guidance=None) -> np.ndarray:
    """``pipe(num_images=1, seed=[s], ...)`` for every seed: the per-image images the contract compares with."""
    from deploy_diff.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, scheduler=scheduler, num_threads=1)
    return np.concatenate(
        [
            pipe(
                num_images=1,
                num_inference_steps=steps,
                seed=[int(s)],
                guidance_scale=guidance,
                class_labels=None if labels is None else [int(labels[k])],
                output_type="uint8",
            )
            for k, s in enumerate(seeds)
        ]
    )


def read_all(out) -> dict[str, np.ndarray]:
    """Every listed shard's arrays (each file checked against its sha256), concatenated in image order."""
    shards = list(iter_shards(out))
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


def manifest(out) -> dict:
    return json.loads((Path(out) / MANIFEST).read_text())


def shard_hashes(out) -> list[str]:
    return [e["sha256"] for e in sorted(manifest(out)["shards"], key=lambda e: e["index"])]


def _proc(pid: int) -> tuple[int, str] | None:
    """(parent pid, command line) of a live process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1]), cmdline.strip()


def own_generate_workers(busy_only: bool = False) -> list[int]:
    """The pids of the generate workers (Ray actors titled ``ray::GenerateWorker...``) that descend from this
    process: the local Ray this process started runs them (never another session's workers). ``busy_only``:
    those running a chunk now (titled ``ray::GenerateWorker.run``)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := _proc(int(name))) is not None:
            table[int(name)] = info
    me, found = os.getpid(), []
    for pid, (_, cmd) in table.items():
        if not cmd.startswith("ray::GenerateWorker") or (busy_only and not cmd.startswith("ray::GenerateWorker.run")):
            continue
        parent, seen = pid, 0
        while parent in table and parent != me and seen < 64:
            parent, seen = table[parent][0], seen + 1
        if parent == me:
            found.append(pid)
    return found
