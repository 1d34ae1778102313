"""Bulk generation on Ray: :func:`generate` writes a dataset of images from a pixel-space bundle as ``.npz`` shards.

```
DIR/
  manifest.json        written first (the bundle's sha256 and every setting), rewritten atomically as shards land
  shard-00000.npz      images uint8[n, H, W, C], seeds int64[n], class_labels int64[n] (conditional bundles only)
  shard-00001.npz      ...
```

Image ``i`` is sampled with its own generator, seed ``seed_base + i`` (and, for a conditional bundle, label
``classes[i % len(classes)]``, or ``i % num_classes`` for ``"balanced"``). Shard ``k`` holds images
``[k * shard_size, (k + 1) * shard_size)``; inside a shard the model runs on fixed chunks of :data:`BATCH_SIZE`
images with ``num_threads`` threads, so the bytes of every shard depend on the settings only, never on how many
workers ran, which worker ran what, or how often a chunk was retried (on machines of one CPU kind: different
instruction sets may round differently).

Workers are Ray actors (one :class:`GenerateWorker` per worker, each loading the bundle once); Ray restarts a
worker that dies and retries its chunks. Only the driver writes: each shard once, atomically, when all of its
chunks are in, then the manifest. A rerun into the same folder verifies the shards the manifest lists (sha256) and
computes only the others; a rerun with different settings is refused, naming the setting.

Importing this module imports neither Ray nor a backend; :func:`generate` checks everything it can (arguments,
bundle, folder) before it starts Ray.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime._fileio import atomic_write_bytes, atomic_write_text, sha256_file
from ..runtime.arguments import (
    check_class_labels,
    check_guidance_scale,
    check_num_images,
    check_num_inference_steps,
    is_int,
)
from ..runtime.bundle import MANIFEST_NAME as BUNDLE_MANIFEST
from ..runtime.bundle import Bundle, load_bundle
from ._common import ray_init, require_pixel_bundle

__all__ = [
    "BATCH_SIZE",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MAX_RESTARTS",
    "GenerateError",
    "GenerateWorker",
    "generate",
    "iter_shards",
    "read_manifest",
    "shard_name",
]

FORMAT = "deploy-diff/generated"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BATCH_SIZE = 64  # images per model call inside a shard: a constant, so the output never depends on the workers
MAX_RESTARTS = 3  # times Ray restarts a dead worker (and retries the chunks it held) before the run fails
IN_FLIGHT = 2  # chunks queued per worker: the next one is there when the current one ends
SEED_LIMIT = 2**63  # seeds are stored as int64
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp in the shards' zip entries: equal arrays, equal bytes

# the settings that decide the images, in the order a mismatch is reported; workers and address are not among
# them: the output is the same whatever runs it
SETTINGS = (
    "num_images",
    "seed_base",
    "shard_size",
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
    "classes",
    "num_threads",
    "batch_size",
    "backend",
    "precision",
)


class GenerateError(ValueError):
    """The output folder cannot be used for this run (another run's settings, not a generate folder, ...)."""


def shard_name(index: int) -> str:
    """``shard-00007.npz``: the file of shard ``index``."""
    return f"shard-{index:05d}.npz"


def bundle_sha256(path: str | os.PathLike) -> str:
    """The bundle's hash: the sha256 of its manifest, which records the sha256 of every file of the bundle."""
    return sha256_file(Path(path) / BUNDLE_MANIFEST)


# -- the plan: settings, labels, shards ---------------------------------------------------------------------------
def _positive_int(value: Any, name: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def _resolve_classes(classes: Any, bundle: Bundle) -> str | list[int] | None:
    """``classes`` -> ``"balanced"``, a list of labels (checked against the model), or None (unconditional)."""
    m = bundle.model
    if not m.conditional:
        if classes is not None:
            raise ValueError(f"bundle {bundle.path} is unconditional: it takes no classes; got classes={classes!r}")
        return None
    if classes is None or classes == "balanced":
        return "balanced"
    if isinstance(classes, str):
        raise ValueError(f"classes must be 'balanced' or a list of class labels; got {classes!r}")
    labels = [classes] if is_int(classes) else list(classes)
    if not labels:
        raise ValueError("classes must be 'balanced' or a non-empty list of class labels; got []")
    null = m.null_class_label
    checked = check_class_labels(
        labels, len(labels), null_class_label=null, num_classes=m.num_classes, conditional=True, where="classes"
    )
    return [int(v) for v in checked]


def _labels(classes: str | list[int] | None, num_classes: int, start: int, count: int) -> np.ndarray | None:
    """The labels of images ``start .. start + count - 1``."""
    if classes is None:
        return None
    i = np.arange(start, start + count, dtype=np.int64)
    if classes == "balanced":
        return i % num_classes
    return np.asarray(classes, dtype=np.int64)[i % len(classes)]


def _settings(
    bundle: Bundle,
    num_images: Any,
    seed_base: Any,
    shard_size: Any,
    scheduler: str | None,
    num_inference_steps: Any,
    guidance_scale: Any,
    classes: Any,
    num_threads: Any,
) -> dict[str, Any]:
    """Every setting checked by the library's rules, in the form the manifest records."""
    from ..runtime.pipeline import Pipeline

    n = check_num_images(num_images)
    if not is_int(seed_base) or seed_base < 0:
        raise ValueError(f"seed_base must be an int >= 0; got {seed_base!r}")
    if seed_base + n - 1 >= SEED_LIMIT:
        raise ValueError(
            f"seed_base={seed_base} with num_images={n} gives seeds up to {seed_base + n - 1}; seeds are stored as "
            "int64, so the last one must be below 2**63"
        )
    if scheduler is not None and not isinstance(scheduler, str):
        raise TypeError(f"scheduler must be a scheduler name or None; got {type(scheduler).__name__}")
    # the scheduler rules (name, prediction type) are the Pipeline's own; no model is loaded for them
    pipe = Pipeline(None, bundle.model, bundle.scheduler_config(), scheduler=scheduler, bundle=bundle)
    sched = pipe.make_scheduler()
    # None: the bundle's default_inference_steps (a distilled model's), else 50; its sampler's maximum applies
    steps = pipe.inference_steps(num_inference_steps)
    steps = check_num_inference_steps(steps, sched.config.get("num_train_timesteps"))
    sched.set_timesteps(steps)  # the scheduler's own rule for the step count, before any worker starts
    m = bundle.model
    null = m.null_class_label if m.conditional else None
    return {
        "num_images": n,
        "seed_base": int(seed_base),
        "shard_size": _positive_int(shard_size, "shard_size"),
        "scheduler": scheduler.lower() if scheduler is not None else None,
        "num_inference_steps": steps,
        "guidance_scale": check_guidance_scale(guidance_scale, null, conditional=m.conditional),
        "classes": _resolve_classes(classes, bundle),
        "num_threads": _positive_int(num_threads, "num_threads"),
        "batch_size": BATCH_SIZE,
        "backend": "onnxruntime",
        "precision": "fp32",
    }


def _shard_ranges(settings: dict[str, Any]) -> list[tuple[int, int]]:
    """``(first_image, count)`` of every shard."""
    n, size = settings["num_images"], settings["shard_size"]
    return [(start, min(size, n - start)) for start in range(0, n, size)]


# -- shard files --------------------------------------------------------------------------------------------------
def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (what ``np.savez`` writes, readable by ``np.load``) whose bytes depend on the arrays only: the
    zip entries carry a fixed timestamp instead of the time of writing."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """``OUT/manifest.json``, checked to be a generate manifest of a format this version reads."""
    path = Path(out) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise GenerateError(f"{path} is not a readable generate manifest ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GenerateError(f"{path} is not a generate manifest (format {FORMAT!r} expected)")
    if data.get("format_version") != FORMAT_VERSION:
        raise GenerateError(
            f"{path} has format_version {data.get('format_version')!r}; this deploy-diff reads {FORMAT_VERSION}"
        )
    if not all(isinstance(data.get(k), t) for k, t in (("bundle", dict), ("settings", dict), ("shards", list))):
        raise GenerateError(f"{path} lacks its bundle, its settings or its shard list")
    return data


def iter_shards(out: str | os.PathLike, verify: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of every shard the manifest lists, in image order (``verify``: each file's sha256 first).

    Raises :class:`GenerateError` for a file that is missing or does not match the manifest."""
    root = Path(out)
    manifest = read_manifest(root)
    for entry in sorted(manifest["shards"], key=lambda e: e["index"]):
        path = root / entry["file"]
        if not path.is_file():
            raise GenerateError(f"{path} is listed in {MANIFEST} but missing")
        if verify and sha256_file(path) != entry["sha256"]:
            raise GenerateError(f"{path} does not match the sha256 in {MANIFEST}: changed or torn")
        with np.load(path, allow_pickle=False) as z:
            yield {k: z[k] for k in z.files}


def _settings_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in SETTINGS:
        if old.get(key) != new[key]:
            return key
    return None


def _prepare_folder(
    root: Path, bundle: Bundle, bundle_hash: str, settings: dict[str, Any], log: Callable[[str], Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check ``root`` against this run; return the manifest to continue and the shards already done and intact.

    A folder holding other files and no manifest is refused; so is a manifest of another bundle or other
    settings. Listed shards whose file is missing or does not match its sha256, and shard files the manifest does
    not list (a driver stopped between writing a shard and listing it, or a file from elsewhere), are computed
    again; temp files of an interrupted write are removed."""
    if root.exists() and not root.is_dir():
        raise GenerateError(f"out={str(root)!r} is a file; give a folder (it is created when missing)")
    old = None
    if (root / MANIFEST).exists():
        old = read_manifest(root)
        if old["bundle"].get("sha256") != bundle_hash:
            raise GenerateError(
                f"{root} was generated from another bundle (sha256 {str(old['bundle'].get('sha256'))[:12]}..., at "
                f"{old['bundle'].get('path')}); {bundle.path} has sha256 {bundle_hash[:12]}...: use another out "
                "folder"
            )
        key = _settings_mismatch(old["settings"], settings)
        if key is not None and old.get("shards"):  # a folder with no shard yet holds nothing its settings decide
            raise GenerateError(
                f"{root} was generated with {key}={old['settings'].get(key)!r}; this run has "
                f"{key}={settings[key]!r}: rerun with the same settings to resume, or use another out folder"
            )
    elif root.is_dir() and any(root.iterdir()):
        raise GenerateError(f"{root} is not empty and holds no {MANIFEST}: give a new or empty out folder")
    kept = []
    ranges = _shard_ranges(settings)
    listed = {e.get("index"): e for e in (old or {}).get("shards", []) if isinstance(e, dict)}
    for index in range(len(ranges)):
        path = root / shard_name(index)
        entry = listed.get(index)
        if entry is not None and path.is_file() and sha256_file(path) == entry.get("sha256"):
            kept.append(entry)
        elif entry is not None:
            why = "is missing" if not path.is_file() else "does not match its sha256 in the manifest (torn or changed)"
            log(f"{path} {why}: computing it again")
        elif path.exists():
            log(f"{path} is not listed in {MANIFEST} (an interrupted run, or another file): computing it again")
    for tmp in root.glob(".*.tmp") if root.is_dir() else ():
        if tmp.name.startswith((".shard-", f".{MANIFEST}.")):
            tmp.unlink(missing_ok=True)  # an atomic write cut short by a killed driver
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle": {"path": str(bundle.path.resolve()), "sha256": bundle_hash},
        "settings": settings,
        "image_shape": [*bundle.model.sample_size, bundle.model.in_channels],
        "num_classes": bundle.model.num_classes,
        "num_shards": len(ranges),
        "shards": kept,
        "complete": len(kept) == len(ranges),
        "runs": list((old or {}).get("runs", [])),
    }
    return manifest, kept


# -- the worker ---------------------------------------------------------------------------------------------------
class GenerateWorker:
    """One worker: loads the bundle once (after checking it is the driver's), then samples chunks of images by
    seed. :func:`generate` runs it as a Ray actor (``ray.remote(GenerateWorker)``); it is a plain class, so it
    also runs in-process."""

    def __init__(self, bundle_path: str, sha256: str, settings: dict[str, Any]):
        from ..runtime.pipeline import Pipeline

        here = bundle_sha256(bundle_path) if Path(bundle_path, BUNDLE_MANIFEST).is_file() else None
        if here != sha256:
            import socket

            raise GenerateError(
                f"the bundle at {bundle_path} on {socket.gethostname()} is not the driver's (sha256 {sha256[:12]}..."
                f", found {here and here[:12]}): every node needs the same bundle at the same path"
            )
        self.settings = settings
        self.pipe = Pipeline.from_bundle(
            bundle_path,
            backend=settings["backend"],
            precision=settings["precision"],
            scheduler=settings["scheduler"],
            num_threads=settings["num_threads"],
        )

    def run(self, seeds: list[int], class_labels: list[int] | None) -> np.ndarray:
        """uint8[len(seeds), H, W, C]: image k with its own generator seeded ``seeds[k]``."""
        s = self.settings
        return self.pipe(
            num_images=len(seeds),
            num_inference_steps=s["num_inference_steps"],
            seed=seeds,
            guidance_scale=s["guidance_scale"],
            class_labels=class_labels,
            output_type="uint8",
        )


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("generate runs on Ray, which is not installed: pip install 'deploy-diff[serve]'") from None
    return ray


# -- the driver ---------------------------------------------------------------------------------------------------
def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest["shards"].sort(key=lambda e: e["index"])
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")


class _Driver:
    """Submits the chunks of the missing shards to the workers, assembles shards, writes each once."""

    def __init__(self, ray: Any, root: Path, manifest: dict[str, Any], bar: Any):
        self.ray, self.root, self.manifest, self.bar = ray, root, manifest, bar
        self.settings, self.run = manifest["settings"], manifest["runs"][-1]

    def write_shard(self, index: int, start: int, images: np.ndarray, labels: np.ndarray | None) -> None:
        s = self.settings
        arrays = {"images": images, "seeds": np.arange(start, start + len(images), dtype=np.int64) + s["seed_base"]}
        if labels is not None:
            arrays["class_labels"] = labels
        data = _npz_bytes(arrays)
        name = shard_name(index)
        atomic_write_bytes(self.root / name, data)
        entry = {
            "index": index,
            "file": name,
            "first_image": start,
            "num_images": len(images),
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        self.manifest["shards"] = [e for e in self.manifest["shards"] if e["index"] != index] + [entry]
        self.run["shards_computed"].append(index)
        self.run["images_computed"] += len(images)
        _write_manifest(self.root, self.manifest)

    def run_shards(self, actors: list[Any], todo: list[int], num_classes: int) -> None:
        ray, s = self.ray, self.settings
        ranges = _shard_ranges(s)
        queue = deque()
        for index in todo:
            start, count = ranges[index]
            for off in range(0, count, s["batch_size"]):
                queue.append((index, off, min(s["batch_size"], count - off)))
        parts: dict[int, dict[int, np.ndarray]] = {}
        inflight: dict[Any, tuple[int, int, int]] = {}
        load = [0] * len(actors)
        while queue or inflight:
            while queue:
                w = min(range(len(actors)), key=load.__getitem__)
                if load[w] >= IN_FLIGHT:
                    break
                index, off, count = queue.popleft()
                first = ranges[index][0] + off
                seeds = [s["seed_base"] + first + k for k in range(count)]
                labels = _labels(s["classes"], num_classes, first, count)
                ref = actors[w].run.remote(seeds, None if labels is None else labels.tolist())
                inflight[ref] = (w, index, off)
                load[w] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                w, index, off = inflight.pop(ref)
                load[w] -= 1
                images = _get(ray, ref, index)
                got = parts.setdefault(index, {})
                got[off] = images
                self.bar.update(len(images))
                start, count = ranges[index]
                if sum(len(a) for a in got.values()) == count:
                    shard = np.concatenate([got[k] for k in sorted(got)])
                    del parts[index]
                    self.write_shard(index, start, shard, _labels(s["classes"], num_classes, start, count))


def _get(ray: Any, ref: Any, index: int) -> np.ndarray:
    """The chunk's images; a worker's own error re-raised as itself, a worker dead past its restarts explained."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except ray.exceptions.RayActorError as e:
        if getattr(e, "actor_init_failed", False):  # the worker could not start: say why, in its own last line
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise RuntimeError(f"a generate worker failed to start: {lines[-1] if lines else e}") from None
        raise RuntimeError(
            f"a generate worker died more than {MAX_RESTARTS} times while computing shard {index} "
            f"({type(e).__name__}); the shards written so far are kept: rerun the same command to resume"
        ) from e


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def generate(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    num_images: int,
    *,
    seed_base: int = 0,
    shard_size: int = 1000,
    workers: int | None = None,
    scheduler: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    classes: str | Sequence[int] | None = None,
    num_threads: int = 1,
    address: str | None = None,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Generate ``num_images`` images from ``bundle`` into the folder ``out``; return the final manifest.

    ``seed_base``: image i uses seed ``seed_base + i``. ``shard_size``: images per ``.npz`` file. ``workers``:
    Ray actors, each with ``num_threads`` CPU threads (default: as many as the Ray cluster's CPUs allow).
    ``scheduler``: a scheduler name (None: the bundle's own). ``num_inference_steps``: None takes the bundle's
    ``default_inference_steps`` (else 50). ``classes`` (conditional bundles): ``"balanced"``
    (the default: label ``i % num_classes``) or a list of labels (image i gets ``classes[i % len(classes)]``).
    ``address``: a Ray cluster to join (None: a local Ray, unless Ray is already initialised in this process,
    which is then used and left running). ``log``: where notes on the folder go (None: nowhere).

    A folder that already holds this run (same bundle and settings) is resumed: the shards it lists and that
    match their sha256 are kept, the others computed. Raises ``ValueError`` (:class:`GenerateError` for the
    folder) before Ray starts for bad arguments, a bundle that is not a pixel-space UNet bundle, or a folder of
    another run, naming the setting that differs.
    """
    log = log or (lambda msg: None)
    if workers is not None:
        workers = _positive_int(workers, "workers")
    loaded = require_pixel_bundle(load_bundle(bundle))
    settings = _settings(
        loaded, num_images, seed_base, shard_size, scheduler, num_inference_steps, guidance_scale, classes, num_threads
    )
    root = Path(out)
    bundle_hash = bundle_sha256(loaded.path)
    manifest, kept = _prepare_folder(root, loaded, bundle_hash, settings, log)
    ranges = _shard_ranges(settings)
    done = {e["index"] for e in kept}
    todo = [i for i in range(len(ranges)) if i not in done]
    run = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workers": None,
        "address": address,
        "shards_kept": sorted(done),
        "shards_computed": [],
        "images_computed": 0,
        "seconds": None,
    }
    manifest["runs"].append(run)
    ray = _import_ray() if todo else None  # a missing Ray is said before the folder is made
    root.mkdir(parents=True, exist_ok=True)
    _write_manifest(root, manifest)  # first: the folder says what it holds before any shard is computed
    if not todo:
        manifest["complete"] = True
        run["workers"], run["seconds"] = 0, 0.0
        _write_manifest(root, manifest)
        return manifest

    started_ray = not ray.is_initialized()
    if started_ray:
        ray_init(address=address)
    t0 = time.perf_counter()
    actors: list[Any] = []
    bar: Any = _NoBar()
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        threads = settings["num_threads"]
        if workers is None:
            workers = max(1, cpus // threads)
        if workers * threads > cpus:
            raise ValueError(
                f"workers={workers} with num_threads={threads} need {workers * threads} CPUs; the Ray cluster has "
                f"{cpus}"
            )
        workers = min(workers, sum(-(-ranges[i][1] // BATCH_SIZE) for i in todo))  # no more workers than chunks
        run["workers"] = workers
        remote = ray.remote(GenerateWorker).options(
            num_cpus=threads, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS
        )
        actors = [remote.remote(str(loaded.path.resolve()), bundle_hash, settings) for _ in range(workers)]
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=settings["num_images"],
                initial=sum(ranges[i][1] for i in done),
                unit="img",
                desc="generate",
                dynamic_ncols=True,
            )
        _Driver(ray, root, manifest, bar).run_shards(actors, todo, loaded.model.num_classes)
        manifest["complete"] = True
        run["seconds"] = round(time.perf_counter() - t0, 3)
        _write_manifest(root, manifest)
    finally:
        bar.close()
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        if started_ray:
            ray.shutdown()
    return manifest
