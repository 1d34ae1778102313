"""One UNet call, timed and compared, in every variant the GPU check measures (``benchmarks/gpu_check.py``).

``BatchCheck(...).run_all()`` records one latency row per variant for one static batch size: torch eager (fp32
with TF32 off, fp16), a torch CUDA graph (fp16), our ``OnnxRuntimeRunner`` (host arrays in and out, so its time
includes the host<->device copies) and raw ONNX Runtime with every tensor resident on the device (the pure model
latency). Each row's error is :func:`deploy_diff.runtime._numeric.relative_error` against torch fp32 and against
torch in the row's own precision, on the same inputs. docs/gpu.md lists the variants and what each one shows.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any

import numpy as np
from gpu_report import Report, log

from deploy_diff.analysis.bench import time_call
from deploy_diff.runtime._numeric import relative_error


def make_cases(batch: int, shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batch 1: three calls at t = 999, 500, 10. Larger batches: two calls, timesteps 999, 500, 10 then uniform
    (fractional) ones, the second call with other noise and reversed timesteps."""
    rng = np.random.RandomState(0)
    if batch == 1:
        return [
            (rng.standard_normal((1, *shape)).astype(np.float32), np.array([t], dtype=np.float32))
            for t in (999.0, 500.0, 10.0)
        ]
    cases = []
    for _ in range(2):
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        t = rng.uniform(0, 999, size=batch).astype(np.float32)
        t[:3] = np.array([999.0, 500.0, 10.0], dtype=np.float32)[:batch]
        cases.append((x, t))
    cases[1] = (cases[1][0], cases[1][1][::-1].copy())
    return cases


def time_per_call(fn, warmup: int, iters: int, sync=None, max_s: float = 15.0) -> dict[str, Any]:
    """``fn`` (then ``sync``, e.g. ``torch.cuda.synchronize``) timed by the library's ``time_call``: ``warmup``
    untimed calls, then ``iters`` timed ones, fewer when the first timed call says they would take over ``max_s``."""

    def call():
        fn()
        if sync is not None:
            sync()

    first, _, _ = time_call(call, repeats=1, warmup=warmup)
    n = max(1, min(iters - 1, int(max_s / max(first, 1e-9))))
    _, runs, _ = time_call(call, repeats=n, warmup=0)
    ms = np.array([first, *runs]) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
        "n": len(ms),
        "warmup": warmup,
    }


def _max_error(outs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    # np.max, not max(): a NaN error must win over every finite one
    return float(np.max([relative_error(o, r) for o, r in zip(outs, refs)]))


def _provider_options(session: Any) -> Any:
    try:
        opts = session.get_provider_options()
        keep = ("device_id", "use_tf32", "enable_cuda_graph", "cudnn_conv_algo_search", "arena_extend_strategy")
        return {p: {k: v for k, v in o.items() if k in keep} for p, o in opts.items()}
    except Exception as e:
        return f"unavailable: {type(e).__name__}"


class BatchCheck:
    """The latency rows of one static batch size (see the module docstring)."""

    def __init__(
        self,
        rep: Report,
        args: Any,
        torch: Any,
        src: Any,
        batch: int,
        bundle: Path | None,
        cuda: bool,
        models: dict[str, Any],
    ):
        self.rep, self.args, self.torch, self.src, self.batch = rep, args, torch, src, batch
        self.bundle, self.cuda, self.models = bundle, cuda, models
        self.dev = "cuda" if cuda else "cpu"
        self.cases = make_cases(batch, (src.in_channels, *src.sample_size))
        self._pristine = [(x.copy(), t.copy()) for x, t in self.cases]  # to catch a variant writing into them
        self.ref: dict[str, list[np.ndarray]] = {}  # precision -> torch outputs per case
        self.sessions: dict[str, Any] = {}  # variant -> live runner, reused by the raw variants
        self._keep: Any = None  # the torch CUDA graph and its buffers
        self.reserve_later_s = 0.0  # time the optional variants leave to later batches

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def record(self, variant: str, precision: str, host_copies: bool, fn, note: str = "", optional: bool = False):
        """Run ``fn() -> (outputs per case, timing dict, extra)`` as its own stage and record one latency row.
        ``optional`` variants also leave time for the later batches' main variants (``reserve_later_s``)."""
        row: dict[str, Any] = {
            "variant": variant,
            "batch": self.batch,
            "precision": precision,
            "includes_host_copies": host_copies,
            "note": note,
        }
        self.rep.data["latency"].append(row)

        def run():
            try:
                outs, timing, extra = fn()
            finally:
                changed = [
                    i
                    for i, ((x, t), (x0, t0)) in enumerate(zip(self.cases, self._pristine))
                    if not (np.array_equal(x, x0) and np.array_equal(t, t0))
                ]
                self.cases = [(x.copy(), t.copy()) for x, t in self._pristine]
            if changed:
                raise RuntimeError(f"{variant} wrote into its input arrays (cases {changed}); results discarded")
            row.update(timing, **(extra or {}))
            if "fp32" in self.ref:
                row["max_error_vs_torch_fp32"] = _max_error(outs, self.ref["fp32"])
                row["errors_per_case_vs_torch_fp32"] = [relative_error(o, r) for o, r in zip(outs, self.ref["fp32"])]
            if precision in self.ref:
                row["max_error_vs_torch_same_precision"] = _max_error(outs, self.ref[precision])
            log(
                f"  {variant} b{self.batch}: median {row['median_ms']:.3f} ms, min {row['min_ms']:.3f} ms, "
                f"err fp32 {row.get('max_error_vs_torch_fp32', float('nan')):.2e}"
            )

        reserve = 5 + (self.reserve_later_s if optional else 0)
        self.rep.stage(f"b{self.batch}:{variant}", run, budget_s=self.args.budget_s, reserve_s=reserve)
        rec = self.rep.data["stages"][-1]
        if not rec.get("ok"):
            row["error" if "error" in rec else "skipped"] = rec.get("error") or rec.get("skipped")

    def skip(self, variant: str, precision: str, reason: str) -> None:
        self.rep.data["latency"].append(
            {"variant": variant, "batch": self.batch, "precision": precision, "skipped": reason}
        )
        self.rep.skip(f"b{self.batch}:{variant}", reason)

    def _time(self, fn, sync=None) -> dict[str, Any]:
        return time_per_call(fn, self.args.warmup, self.args.iters, sync)

    # -- torch ---------------------------------------------------------------------------------------------
    def torch_eager(self, precision: str):
        torch = self.torch
        model = self.models[precision]
        dtype = torch.float16 if precision == "fp16" else torch.float32
        xs = [torch.from_numpy(x).to(self.dev, dtype) for x, _ in self.cases]
        ts = [torch.from_numpy(t).to(self.dev) for _, t in self.cases]
        with torch.no_grad():
            outs = [model(x, t).float().cpu().numpy() for x, t in zip(xs, ts)]
            self.ref[precision] = outs
            timing = self._time(lambda: model(xs[0], ts[0]), torch.cuda.synchronize if self.cuda else None)
        return outs, timing, {}

    def torch_cuda_graph(self):
        """torch.cuda.CUDAGraph of the fp16 forward: static buffers, warm-up on a side stream, capture, replay."""
        torch = self.torch
        model = self.models["fp16"]
        xs = [torch.from_numpy(x).to("cuda", torch.float16) for x, _ in self.cases]
        ts = [torch.from_numpy(t).to("cuda") for _, t in self.cases]
        static_x, static_t = xs[0].clone(), ts[0].clone()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    model(static_x, static_t)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model(static_x, static_t)
        outs = []
        for x, t in zip(xs, ts):
            static_x.copy_(x)
            static_t.copy_(t)
            graph.replay()
            outs.append(static_out.float().cpu().numpy())
        static_x.copy_(xs[0])
        static_t.copy_(ts[0])
        timing = self._time(graph.replay, torch.cuda.synchronize)
        self._keep = (graph, static_x, static_t, static_out)  # alive until the batch is done
        return outs, timing, {}

    # -- ONNX Runtime through our runner -----------------------------------------------------------------
    def providers(self, tf32: bool | None, graph: bool) -> list:
        """Explicit providers: on CUDA with ``use_tf32=0`` when ``tf32`` is False and ``enable_cuda_graph=1`` when
        ``graph`` (the raw sessions need it here; the runner adds it itself for ``cuda_graph=True``)."""
        if not self.cuda:
            return ["CPUExecutionProvider"]
        opts = {"device_id": "0"}
        if tf32 is False:
            opts["use_tf32"] = "0"
        if graph:
            opts["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]

    def _graph_path(self, precision: str) -> Path:
        return self.bundle / ("unet.fp16.onnx" if precision == "fp16" else "unet.onnx")

    def ort_runner(self, variant: str, precision: str, graph: bool, tf32: bool | None):
        from deploy_diff.runtime.backends.onnxruntime import OnnxRuntimeRunner

        path = self._graph_path(precision)
        providers = None if (tf32 is None and self.cuda) else self.providers(tf32, graph)
        create_s, _, runner = time_call(
            lambda: OnnxRuntimeRunner(path, device=self.dev, cuda_graph=graph, providers=providers), repeats=1, warmup=0
        )
        # the runner's loader refuses a CUDA session that fell back to the CPU
        first_s, _, outs = time_call(lambda: [runner(x, t) for x, t in self.cases], repeats=1, warmup=0)
        x0, t0 = self.cases[0]  # the first call above captured the CUDA graph; these replay it
        timing = self._time(lambda: runner(x0, t0))
        self.sessions[variant] = runner
        extra = {
            "session_create_s": round(create_s, 3),
            "first_calls_s": round(first_s, 3),
            "providers": runner.session.get_providers(),
            "provider_options": _provider_options(runner.session),
            "graph": path.name,
            "runner_cuda_graph": graph,
        }
        return outs, timing, extra

    # -- raw ONNX Runtime: everything on the device -------------------------------------------------------
    def ort_raw(self, precision: str, graph: bool, tf32: bool | None, reuse: str | None = None):
        import onnxruntime as ort

        from deploy_diff.runtime.backends.onnxruntime import load_session

        path = self._graph_path(precision)
        create_s = None
        if reuse is not None:
            if reuse not in self.sessions:
                raise RuntimeError(f"the session of {reuse} to reuse is not there (that variant failed)")
            session = self.sessions[reuse].session
        else:
            # the library's loader: enable_fallback=0 and a check that the CUDA provider is active, so a session
            # that cannot run on CUDA (a capture refused because a node is not on it) raises its own error
            create_s, _, session = time_call(
                lambda: load_session(path, providers=self.providers(tf32, graph), cuda_graph=graph and self.cuda),
                repeats=1,
                warmup=0,
            )
        active = session.get_providers()
        out_meta = session.get_outputs()[0]
        out_dtype = np.float16 if out_meta.type == "tensor(float16)" else np.float32
        types = {i.name: (np.float16 if i.type == "tensor(float16)" else np.float32) for i in session.get_inputs()}

        def host(a: np.ndarray, name: str) -> np.ndarray:
            # a copy: on "cpu" an OrtValue wraps the numpy array's memory, which update_inplace would overwrite
            return np.array(a, dtype=types[name], copy=True)

        x0, t0 = self.cases[0]
        xv = ort.OrtValue.ortvalue_from_numpy(host(x0, "sample"), self.dev, 0)
        tv = ort.OrtValue.ortvalue_from_numpy(host(t0, "timestep"), self.dev, 0)
        shape = [self.batch, self.src.out_channels, *self.src.sample_size]
        yv = ort.OrtValue.ortvalue_from_shape_and_type(shape, out_dtype, self.dev, 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input("sample", xv)
        binding.bind_ortvalue_input("timestep", tv)
        binding.bind_ortvalue_output(out_meta.name, yv)
        outs = []
        for i, (x, t) in enumerate(self.cases):
            if i:
                xv.update_inplace(host(x, "sample"))
                tv.update_inplace(host(t, "timestep"))
            session.run_with_iobinding(binding)  # the first run of a graph session captures; later ones replay
            outs.append(yv.numpy().astype(np.float32))
        xv.update_inplace(host(x0, "sample"))
        tv.update_inplace(host(t0, "timestep"))
        timing = self._time(lambda: session.run_with_iobinding(binding))
        self.sessions[f"_raw_{precision}_{graph}_{reuse}"] = (session, binding, xv, tv, yv)
        extra = {
            "providers": active,
            "provider_options": _provider_options(session),
            "graph": path.name,
            "session_create_s": None if create_s is None else round(create_s, 3),
            "reuses_session_of": reuse,
        }
        return outs, timing, extra

    # -- all of it ------------------------------------------------------------------------------------------
    def run_all(self) -> None:
        a, cuda, rn = self.args, self.cuda, "ort_runner"
        no_cuda = "needs CUDA (cpu-smoke run)" if a.cpu_smoke else "needs CUDA (no CUDA device in this run)"

        def cuda_only(variant: str, precision: str, fn, **kw) -> None:
            if cuda:
                self.record(variant, precision, kw.pop("host_copies", False), fn, **kw)
            else:
                self.skip(variant, precision, no_cuda)

        self.record(
            "torch_eager_fp32" + ("_notf32" if cuda else ""),
            "fp32",
            False,
            lambda: self.torch_eager("fp32"),
            note="reference; TF32 off" if cuda else "reference",
        )
        self.record("torch_eager_fp16", "fp16", False, lambda: self.torch_eager("fp16"))
        cuda_only("torch_cudagraph_fp16", "fp16", self.torch_cuda_graph)
        if self.bundle is None:
            self.rep.skip(f"b{self.batch}:onnxruntime", "no bundle (the export failed or was skipped)")
            return
        cuda_only(
            f"{rn}_fp16_iobinding_cudagraph",
            "fp16",
            lambda: self.ort_runner(f"{rn}_fp16_iobinding_cudagraph", "fp16", True, None),
            host_copies=True,
            note="OnnxRuntimeRunner(cuda_graph=True), default providers",
        )
        self.record(
            f"{rn}_fp16_iobinding" if cuda else f"{rn}_fp16_cpu",
            "fp16",
            True,
            lambda: self.ort_runner(f"{rn}_fp16", "fp16", False, None if cuda else False),
        )
        self.record(
            f"{rn}_fp32_iobinding_notf32" if cuda else f"{rn}_fp32_cpu",
            "fp32",
            True,
            lambda: self.ort_runner(f"{rn}_fp32", "fp32", False, False),
            note="use_tf32=0" if cuda else "",
        )
        if not a.quick:
            cuda_only(
                f"{rn}_fp32_iobinding_cudagraph_notf32",
                "fp32",
                lambda: self.ort_runner(f"{rn}_fp32_graph", "fp32", True, False),
                host_copies=True,
                note="use_tf32=0, enable_cuda_graph=1 passed explicitly",
                optional=True,
            )
            if cuda:
                self.record(
                    f"{rn}_fp32_iobinding_tf32default",
                    "fp32",
                    True,
                    lambda: self.ort_runner(f"{rn}_fp32_tf32", "fp32", False, None),
                    note="ORT's default provider options (TF32 on)",
                    optional=True,
                )
        cuda_only(
            "ort_raw_fp16_iobinding_cudagraph",
            "fp16",
            lambda: self.ort_raw("fp16", True, None),
            note="OrtValues on the device, run_with_iobinding only",
        )
        self.record(
            "ort_raw_fp16_iobinding" if cuda else "ort_raw_fp16_cpu",
            "fp16",
            False,
            lambda: self.ort_raw("fp16", False, None, reuse=f"{rn}_fp16"),
            note="session of the fp16 runner, own device-resident binding",
        )
        if not a.quick:
            self.record(
                "ort_raw_fp32_iobinding_notf32" if cuda else "ort_raw_fp32_cpu",
                "fp32",
                False,
                lambda: self.ort_raw("fp32", False, False, reuse=f"{rn}_fp32"),
                note="session of the fp32 no-TF32 runner",
                optional=True,
            )

    def close(self) -> None:
        self.sessions.clear()
        self._keep = None
        gc.collect()
        if self.cuda:
            with contextlib.suppress(Exception):
                self.torch.cuda.synchronize()
                self.torch.cuda.empty_cache()
