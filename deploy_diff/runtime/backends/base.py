"""What every backend runner shares: the call contract, the input check, batching, device strings, the precision
vocabulary, and the error raised when a backend's libraries are missing.

A runner is a callable object over one graph, a UNet unless it was opened with ``unet=False`` (Polygraphy's runners
are the model):

- ``runner(sample, timestep, class_labels=None) -> float32[B, C_out, H, W]`` with ``sample`` float32[B, C, H, W],
  ``timestep`` float32[B] (or one scalar for every row) and ``class_labels`` int64[B] (class-conditional graphs
  only). Arrays of another float / integer dtype are cast; anything else is refused by :func:`check_inputs`, the
  same rules for every backend.
- ``runner.close()`` frees what the runner holds (sessions, device buffers, threads); ``with runner: ...`` closes
  it on exit. Calling a closed runner raises ``RuntimeError``.
- ``runner.precision``: what the runner computes in, ``"fp32"``, ``"fp16"`` or ``"bf16"`` (:data:`PRECISIONS`;
  :data:`SUPPORTED_PRECISIONS` says which backend offers which).
- ``runner.input_names`` (the graph's input names), ``runner.sample_shape`` ((C, H, W), None where symbolic) and
  ``runner.static_batch`` (the one batch size the graph takes, or None): a batch of another size is split into
  chunks and padded by :func:`run_in_batches`.
- ``runner.run({name: array}) -> float32 array``: any graph by its named inputs (a text encoder, a VAE decoder, a
  UNet with ``encoder_hidden_states``), checked by :func:`check_feeds` against ``runner.input_shapes`` and the
  graph's dtypes, batched like a UNet call (every input's first dimension is the batch); the graph's first output
  (``runner.output_name``). A runner built with ``unet=False`` opens any graph and is called through ``run`` only;
  with ``unet=True`` (the default) the graph must be a UNet of this protocol and both calls work.

Runners check array structure only. Value rules (the range of class labels, the null label, guidance, ``eta``,
the step count) belong to the public entry points (``sample()``, ``Pipeline``), which check them once.

Importing this module needs numpy only.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..precisions import PRECISIONS, SUPPORTED_PRECISIONS, check_precision

__all__ = [
    "PRECISIONS",
    "SUPPORTED_PRECISIONS",
    "BackendUnavailableError",
    "Runner",
    "check_feeds",
    "check_graph_inputs",
    "check_inputs",
    "check_num_threads",
    "check_precision",
    "graph_layout",
    "import_backend_module",
    "parse_device",
    "run_in_batches",
]

#: the dtype each UNet input is fed as, unless the graph declares another
INPUT_DTYPES = {"sample": np.dtype(np.float32), "timestep": np.dtype(np.float32), "class_labels": np.dtype(np.int64)}


def check_num_threads(num_threads: Any) -> int | None:
    """``num_threads`` as an int, or None (the library's default); ``ValueError`` unless a positive integer."""
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None; got {num_threads!r}")
    return int(num_threads)


class BackendUnavailableError(ImportError):
    """A backend's libraries (onnxruntime, openvino, tensorrt, cuda-python) cannot be imported; the message says what to
    install. An ``ImportError``, so ``except ImportError`` handles it."""


def import_backend_module(name: str, message: str) -> Any:
    """Import and return module ``name``, or raise :class:`BackendUnavailableError` with ``message``.

    A module set to None in ``sys.modules`` (how tests hide an installed library) counts as missing.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise BackendUnavailableError(message) from e


_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def parse_device(device: Any) -> tuple[str, int]:
    """``"cpu"`` -> ``("cpu", 0)``, ``"cuda"`` -> ``("cuda", 0)``, ``"cuda:N"`` -> ``("cuda", N)``.

    Raises ``ValueError`` for anything else (``"cpu:1"`` included: there is one CPU device).
    """
    match = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'); got {device!r}")
    return match.group(1), int(match.group(2) or 0)


def check_inputs(
    sample: Any,
    timestep: Any,
    class_labels: Any,
    *,
    sample_shape: Sequence[int | None],
    conditional: bool,
    dtypes: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """The one input check of every runner: the arrays by input name, contiguous, in the graph's dtypes.

    ``sample_shape``: (C, H, W) the graph takes, None where it leaves a dimension symbolic. ``conditional``:
    whether the graph has a ``class_labels`` input. ``dtypes``: the graph's dtype per input name where it
    differs from float32 / float32 / int64. A scalar ``timestep`` is repeated for every row. Raises
    ``ValueError`` naming the argument, the expected shape or dtype, and what was given.
    """
    dtypes = {**INPUT_DTYPES, **{k: np.dtype(v) for k, v in (dtypes or {}).items() if v is not None}}
    sample = np.asarray(sample)
    if sample.ndim != 4:
        raise ValueError(f"sample must be a [B, C, H, W] array; got shape {sample.shape}")
    batch = sample.shape[0]
    if batch == 0:
        raise ValueError("sample is an empty batch: pass at least one image, [B >= 1, C, H, W]")
    expected = tuple(sample_shape)
    if any(e is not None and e != s for e, s in zip(expected, sample.shape[1:])):
        want = tuple(
            batch if i == 0 else int(d) if d is not None else s
            for i, (d, s) in enumerate(zip((batch, *expected), sample.shape))
        )
        raise ValueError(
            f"sample has shape {sample.shape}; this model takes [B, {', '.join(map(str, expected))}], "
            f"so sample must have shape {want}"
        )
    if sample.dtype.kind != "f":
        raise ValueError(
            f"sample has dtype {sample.dtype}, which does not cast to float32: sample must be a float array"
        )
    timestep = np.asarray(timestep)
    if timestep.ndim == 0:
        timestep = np.broadcast_to(timestep, (batch,))
    if timestep.shape != (batch,):
        raise ValueError(f"timestep must have shape [{batch}] (one per image) or be a scalar; got {timestep.shape}")
    if timestep.dtype.kind not in "fiu":
        raise ValueError(
            f"timestep has dtype {timestep.dtype}, which does not cast to float32: timestep must be numeric"
        )
    arrays = {"sample": sample, "timestep": timestep}
    if conditional:
        if class_labels is None:
            raise ValueError("this model is class-conditional: pass class_labels int64[B]")
        labels = np.asarray(class_labels)
        if labels.shape != (batch,) or labels.dtype.kind not in "iu":
            raise ValueError(
                f"class_labels must be an integer array of shape [{batch}]; got {labels.dtype} {labels.shape}"
            )
        arrays["class_labels"] = labels
    elif class_labels is not None:
        raise ValueError("this model is unconditional: class_labels must be None (got unexpected class_labels)")
    return {name: np.ascontiguousarray(a, dtype=dtypes[name]) for name, a in arrays.items()}


def check_graph_inputs(input_names: Sequence[str], where: str) -> None:
    """A UNet graph takes ``sample`` and ``timestep``, and ``class_labels`` when class-conditional; nothing else.

    ``where`` names the graph in the error (a file name, "the engine").
    """
    names = list(input_names)
    if "sample" not in names or "timestep" not in names or set(names) - set(INPUT_DTYPES):
        raise ValueError(
            f"{where} has inputs {names}; a UNet graph takes `sample` and `timestep` (and `class_labels` when "
            "class-conditional), nothing else"
        )


def graph_layout(
    input_shapes: Mapping[str, Sequence[int | None]], unet: bool, where: str
) -> tuple[tuple[int | None, ...] | None, int | None]:
    """``(sample_shape, static_batch)`` of a graph with these inputs (dimensions, None where symbolic).

    ``unet=True``: the inputs must be a UNet's (:func:`check_graph_inputs`); ``sample_shape`` is (C, H, W) of
    ``sample`` and ``static_batch`` its first dimension when fixed. ``unet=False``: any inputs; ``sample_shape`` is
    None and ``static_batch`` the first dimension every input fixes to one size, else None.
    """
    if unet:
        check_graph_inputs(list(input_shapes), where)
        sample = tuple(input_shapes["sample"])
        batch = sample[0] if sample else None
        return sample[1:], batch if isinstance(batch, int) and batch > 0 else None
    firsts = {tuple(dims)[0] if len(dims) else None for dims in input_shapes.values()}
    batch = next(iter(firsts)) if len(firsts) == 1 else None
    return None, batch if isinstance(batch, int) and batch > 0 else None


def check_feeds(
    feeds: Mapping[str, Any],
    input_shapes: Mapping[str, Sequence[int | None]],
    dtypes: Mapping[str, Any],
    where: str = "the graph",
) -> dict[str, np.ndarray]:
    """The input check of :meth:`Runner.run`: the arrays by input name, contiguous, in the graph's dtypes.

    ``input_shapes``: every input's dimensions, None where symbolic; ``dtypes``: the graph's dtype per input (None:
    float32). Every input must be given and nothing else, with the graph's rank and static sizes, at least one row,
    and one batch size (the first dimension) across inputs; a float input takes any real array (cast), an integer
    input integers only (a float would be truncated silently), a bool input bools. Raises ``ValueError`` naming
    the input, what the graph takes and what was given (``where`` names the graph).
    """
    if not isinstance(feeds, Mapping):
        raise TypeError(f"feeds must be a mapping of input name -> array; got {type(feeds).__name__}")
    missing = [n for n in input_shapes if n not in feeds]
    extra = [n for n in feeds if n not in input_shapes]
    if missing or extra:
        wrong = [f"missing {missing}"] if missing else []
        wrong += [f"unexpected {extra}"] if extra else []
        raise ValueError(f"{where} takes inputs {list(input_shapes)}; {'; '.join(wrong)}")
    arrays: dict[str, np.ndarray] = {}
    batch = None
    for name, dims in input_shapes.items():
        a = np.asarray(feeds[name])
        want = np.dtype(dtypes.get(name) or np.float32)
        dims = tuple(dims)
        spelled = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        if a.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, a.shape)):
            raise ValueError(f"{where}: input {name!r} must have shape {spelled}; got {a.shape}")
        kinds = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}.get(want.kind, want.kind)
        if a.dtype.kind not in kinds:
            raise ValueError(f"{where}: input {name!r} takes {want} values; got an array of dtype {a.dtype}")
        if a.ndim == 0 or a.shape[0] == 0:
            raise ValueError(f"{where}: input {name!r} needs a batch of at least one row; got shape {a.shape}")
        if batch is not None and a.shape[0] != batch[1]:
            raise ValueError(
                f"{where}: every input is batched along its first dimension; {batch[0]!r} has {batch[1]} rows "
                f"but {name!r} has {a.shape[0]}"
            )
        batch = batch or (name, a.shape[0])
        arrays[name] = np.ascontiguousarray(a, dtype=want)
    return arrays


def run_in_batches(
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    arrays: Mapping[str, np.ndarray],
    min_batch: int = 1,
    max_batch: int | None = None,
) -> np.ndarray:
    """``run`` over chunks of at most ``max_batch`` rows, each padded up to ``min_batch`` rows; the outputs of the
    real rows, concatenated, as float32.

    For graphs whose batch size is fixed (``min_batch == max_batch``) or bounded (a TensorRT profile). Padding
    repeats a chunk's last row, so padded rows are valid inputs; their outputs are dropped. ``max_batch=None``:
    one call for the whole batch.
    """
    batch = len(next(iter(arrays.values())))
    step = batch if max_batch is None else max_batch
    outs = []
    for start in range(0, batch, step):
        chunk = {k: v[start : start + step] for k, v in arrays.items()}
        n = len(next(iter(chunk.values())))
        if n < min_batch:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], min_batch - n, axis=0)]) for k, v in chunk.items()}
        outs.append(np.asarray(run(chunk))[:n])
    out = outs[0] if len(outs) == 1 else np.concatenate(outs)
    return out if out.dtype == np.float32 else out.astype(np.float32)


class Runner:
    """The base of the backend runners: the context-manager protocol, the shared checks and the two calls.

    A subclass sets ``input_names``, ``input_shapes``, ``output_name``, ``sample_shape`` (UNets), ``static_batch``,
    ``precision``, ``unet`` and ``_dtypes`` (the graph's dtype per input name) and implements ``_execute`` (checked
    arrays by name -> the output, batching included) and ``_release`` (free what it holds; called once, by
    :meth:`close`).
    """

    input_names: Sequence[str] = ()
    input_shapes: Mapping[str, tuple[int | None, ...]] = {}  # per input: its dimensions, None where symbolic
    output_name: str = "out"
    precision: str = "fp32"  # what the runner computes in (see PRECISIONS)
    sample_shape: tuple[int | None, ...] = (None, None, None)
    static_batch: int | None = None
    unet: bool = True  # the graph is a UNet of the runner protocol (``runner(sample, timestep, class_labels)``)
    _dtypes: Mapping[str, Any] = {}
    _closed = False

    @property
    def conditional(self) -> bool:
        """Whether the graph takes ``class_labels``."""
        return "class_labels" in self.input_names

    def _check(self, sample: Any, timestep: Any, class_labels: Any) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} was closed")
        return check_inputs(
            sample,
            timestep,
            class_labels,
            sample_shape=self.sample_shape,
            conditional=self.conditional,
            dtypes=self._dtypes,
        )

    def __call__(self, sample: Any, timestep: Any, class_labels: Any = None) -> np.ndarray:
        """The UNet call of the runner protocol (see the module docstring)."""
        if not self.unet:
            raise TypeError(
                f"this {type(self).__name__} was opened with unet=False: call runner.run({{name: array}}) with "
                f"its inputs {list(self.input_names)}"
            )
        return self._execute(self._check(sample, timestep, class_labels))

    def run(self, feeds: Mapping[str, Any]) -> np.ndarray:
        """Run the graph on ``feeds`` (input name -> array, every input batched along its first dimension); its
        first output as float32. Checked by :func:`check_feeds`; batched like the UNet call."""
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} was closed")
        where = self.path.name if getattr(self, "path", None) is not None else type(self).__name__
        return self._execute(check_feeds(feeds, self.input_shapes, self._dtypes, where))

    def _execute(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free the session / engine and its buffers; calls afterwards raise ``RuntimeError``. Idempotent."""
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
