"""Fuzzing bundle files (hypothesis): a randomly mutated ``deploy_diff.json`` (structural mutations of its JSON
tree, or byte mutations: truncation, junk, BOM, UTF-16, bad UTF-8, deep nesting, huge numbers), or a mutated
``scheduler_config.json`` whose hash is updated in the manifest, is refused with ``BundleError`` / ValueError /
TypeError carrying a message, or loads and samples cleanly; no other exception type escapes (never an uncaught
KeyError, OverflowError, RecursionError, OSError or UnicodeError).

Each bug this fuzzing found has its own test after the random ones, named after what it checks (the comments
give the bug's label, e.g. S1 or M4). A newly found bug's signature goes into ``_reliability.KNOWN_BUGS`` while it is
open, pinned by a strict xfail, so the random tests keep looking for others; it is empty now.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from _reliability import FUZZ, NAMES, assert_clean_refusal
from hypothesis import event, given
from hypothesis import strategies as st

from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.bundle import MANIFEST_NAME, BundleError, load_bundle

NASTY_PATHS = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "..",
    "../../../../../../../etc/passwd",
    "~/x",
    "C:\\x",
    "\\\\server\\share",
    "engines/../../x",
    "./unet.onnx",
    "unet.onnx/",
    "unet.onnx/..",
    "",
    " ",
    ".",
    "x\x00y",
    "a" * 300,
    "a/" * 2100,
    "é/ü",
    "engines/x.plan",
    "scheduler_config.json",
]
PATHS = st.sampled_from(NASTY_PATHS) | st.text(max_size=20)
HUGE = st.sampled_from([2**63, 2**64, 10**30, -(2**63), 10**400, float("inf"), float("-inf"), float("nan")])
JSON_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | HUGE | st.floats(allow_nan=True, allow_infinity=True) | PATHS,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8) | PATHS, c, max_size=4),
    max_leaves=8,
)
# scheduler configs: no integer between 10**4 and 10**18 (num_train_timesteps would allocate gigabytes: BUG S4)
JSON_SAFE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 3000)
    | st.sampled_from([2**64, 10**30, -(2**63)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | PATHS,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=8,
)
NO_DESCENT = {("export",), ("model", "source")}


def _paths(obj, path=()) -> list[tuple]:
    out = [path]
    if path in NO_DESCENT:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*path, i))
    return out


def _mutate_tree(tree, data):
    """Apply 1-3 random structural mutations (delete, replace, change type, rename a key) to a JSON tree."""
    tree = copy.deepcopy(tree)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(_paths(tree)), label="path")
        op = data.draw(st.sampled_from(["delete", "replace", "retype", "path", "rename"]), label="op")
        if op == "replace":
            value = data.draw(JSON_ANY, label="value")
        elif op == "path":
            value = data.draw(PATHS, label="value")
        else:
            old = tree
            for p in path:
                old = old[p]
            value = data.draw(st.sampled_from([str(old)[:40], [old], {"value": old}, None, 0, -1, ""]), label="value")
        if not path:  # the whole manifest
            tree = {} if op == "delete" else value
            continue
        parent = tree
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[data.draw(PATHS, label="new key")] = parent.pop(key)
        else:
            parent[key] = value
    return tree


def _mutate_bytes(raw: bytes, data) -> bytes:
    kind = data.draw(
        st.sampled_from(
            ["truncate", "insert", "overwrite", "binary", "bom", "utf16", "bad_utf8", "deep", "huge_number"]
        ),
        label="byte mutation",
    )
    if kind in ("truncate", "insert", "overwrite"):
        k = data.draw(st.integers(0, len(raw) - 1), label="offset")
        junk = data.draw(st.binary(min_size=1, max_size=8), label="junk")
        return {
            "truncate": raw[:k],
            "insert": raw[:k] + junk + raw[k:],
            "overwrite": raw[:k] + junk + raw[k + len(junk) :],
        }[kind]
    if kind == "binary":
        return data.draw(st.binary(max_size=64), label="bytes")
    if kind == "bom":
        return b"\xef\xbb\xbf" + raw
    if kind == "utf16":
        return raw.decode("utf-8").encode("utf-16")
    if kind == "bad_utf8":
        i = raw.index(b'"', data.draw(st.integers(0, len(raw) // 2), label="offset"))
        return raw[: i + 1] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + raw[i + 1 :]
    if kind == "deep":
        depth = data.draw(st.sampled_from([10, 500, 100_000]), label="depth")  # deep ones: BUG M4
        return b"[" * depth + b"]" * depth
    digits = data.draw(st.integers(10, 6000), label="digits")  # huge_number
    return re.sub(rb'"in_channels": \d+', b'"in_channels": ' + b"9" * digits, raw)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def _bundle_copy(bundle: Path):
    """A throw-away copy of ``bundle`` (hard links: files are only ever replaced, never written through)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-bundle-") as tmp:
        dst = Path(tmp) / "bundle"
        shutil.copytree(bundle, dst, copy_function=_link_or_copy)
        yield dst


def _replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # never write through a hard link into the session fixture
    path.write_bytes(data)


def _rehash(folder: Path, name: str) -> None:
    """Update the manifest's entry for ``name`` so that a mutated file still verifies."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _replace_file(folder / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())


def _exercise(folder: Path, what: str) -> None:
    """load_bundle, Pipeline.from_bundle and one 1-step call: works, or is refused cleanly."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown scheduler config keys warn (by design)
            bundle = load_bundle(folder)
            pipe = Pipeline.from_bundle(folder)
            out = pipe(num_images=1, num_inference_steps=1, seed=0)
    except Exception as e:  # noqa: BLE001 - classifying every exception is the point
        assert_clean_refusal(e, what)
        return
    event("loaded and sampled")
    h, w = bundle.model.sample_size
    assert out.shape == (1, h, w, bundle.model.in_channels) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_mutated_manifests_are_refused_cleanly(diffusers_bundle):
    raw = (diffusers_bundle / MANIFEST_NAME).read_bytes()
    base = json.loads(raw)

    @FUZZ
    @given(data=st.data())
    def check(data):
        if data.draw(st.integers(0, 3), label="structural?"):
            mutated = json.dumps(_mutate_tree(base, data)).encode()  # NaN / Infinity: Python's json reads them
        else:
            mutated = _mutate_bytes(raw, data)
        with _bundle_copy(diffusers_bundle) as folder:
            _replace_file(folder / MANIFEST_NAME, mutated)
            _exercise(folder, f"manifest {mutated[:300]!r}")

    check()
    load_bundle(diffusers_bundle)  # the session fixture is intact


def test_mutated_scheduler_configs_are_refused_cleanly(diffusers_bundle):
    """scheduler_config.json edited and re-hashed in the manifest (as a hand-edited bundle would be)."""
    raw = (diffusers_bundle / "scheduler_config.json").read_bytes()
    base = json.loads(raw)
    class_names = st.sampled_from(NAMES) | st.text(max_size=10) | st.none()

    @FUZZ
    @given(data=st.data())
    def check(data):
        kind = data.draw(st.sampled_from(["tree", "tree", "tree", "class", "unknown_key", "bytes"]), label="kind")
        if kind == "tree":
            cfg = copy.deepcopy(base)
            for _ in range(data.draw(st.integers(1, 3), label="mutations")):
                key = data.draw(st.sampled_from(sorted(cfg) or ["_class_name"]), label="key")
                if data.draw(st.booleans(), label="delete?"):
                    cfg.pop(key, None)
                else:
                    cfg[key] = data.draw(JSON_SAFE, label="value")
            mutated = json.dumps(cfg).encode()
        elif kind == "class":
            mutated = json.dumps({**base, "_class_name": data.draw(class_names, label="class")}).encode()
        elif kind == "unknown_key":
            mutated = json.dumps({**base, data.draw(st.text(max_size=10)): data.draw(JSON_SAFE)}).encode()
        else:
            mutated = data.draw(
                st.sampled_from([raw[: len(raw) // 2], b"[1, 2]", b'"x"', b"null", b"", b'{"beta_end": "\xff"}']),
                label="bytes",
            )
        with _bundle_copy(diffusers_bundle) as folder:
            _replace_file(folder / "scheduler_config.json", mutated)
            _rehash(folder, "scheduler_config.json")
            _exercise(folder, f"scheduler_config.json {mutated[:300]!r}")

    check()
    load_bundle(diffusers_bundle)


# -- bugs found (manifests) ----------------------------------------------------------------------------------------
def _with_manifest(bundle: Path, edit=None, text: str | None = None):
    manifest = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    if edit is not None:
        edit(manifest)
    return (text if text is not None else json.dumps(manifest)).encode()


def _inf_model_field(field):
    def edit(m):
        m["model"][field] = [float("inf"), 8] if field == "sample_size" else float("inf")

    return edit


@pytest.mark.parametrize("field", ["sample_size", "in_channels", "out_channels", "num_classes", "static_batch"])
def test_infinite_numbers_in_the_manifest_are_refused(diffusers_bundle, field):
    mutated = _with_manifest(diffusers_bundle, _inf_model_field(field)).replace(b"Infinity", b"1e400")
    with _bundle_copy(diffusers_bundle) as folder:
        _replace_file(folder / MANIFEST_NAME, mutated)
        with pytest.raises(BundleError, match="model"):
            load_bundle(folder)


@pytest.mark.parametrize("size", [[8], [], "8"], ids=["one", "empty", "string"])
def test_short_sample_size_is_refused(diffusers_bundle, size):
    mutated = _with_manifest(diffusers_bundle, lambda m: m["model"].__setitem__("sample_size", size))
    with _bundle_copy(diffusers_bundle) as folder:
        _replace_file(folder / MANIFEST_NAME, mutated)
        with pytest.raises(BundleError, match="sample_size"):
            load_bundle(folder)


def test_overlong_file_names_are_refused(diffusers_bundle):
    mutated = _with_manifest(diffusers_bundle, lambda m: m["files"].__setitem__("a" * 300, {"sha256": "0" * 64}))
    with _bundle_copy(diffusers_bundle) as folder:
        _replace_file(folder / MANIFEST_NAME, mutated)
        with pytest.raises(BundleError):
            load_bundle(folder)


def test_deeply_nested_manifest_is_refused(diffusers_bundle):
    with _bundle_copy(diffusers_bundle) as folder:
        _replace_file(folder / MANIFEST_NAME, b"[" * 100_000 + b"]" * 100_000)
        with pytest.raises(BundleError):
            load_bundle(folder)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"beta_end": "\xff"}', id="bad-utf8"),
        pytest.param(b'{"_class_name": ', id="truncated"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b"[" * 100_000, id="deep"),
    ],
)
def test_unreadable_scheduler_config_is_refused(diffusers_bundle, data):
    with _bundle_copy(diffusers_bundle) as folder:
        _replace_file(folder / "scheduler_config.json", data)
        _rehash(folder, "scheduler_config.json")
        with pytest.raises(BundleError, match="scheduler_config"):
            Pipeline.from_bundle(folder)
