"""Fake ``tensorrt`` and ``cuda-python`` modules for the TensorRT tests (no GPU here), and tiny real ONNX graphs.

The fakes follow the calls the project makes, for the two TensorRT majors it supports: 10.x (``BuilderFlag.FP16``
/ ``BF16`` exist) and 11.x (strongly typed: only ``TF32`` is left). The fake engine computes
``out = scale * sample + timestep`` in host memory behind fake device pointers, the same function as
:func:`tiny_onnx`'s graph for ``scale=2``, so a build can be validated against the real ONNX Runtime.
"""

import ctypes
import types

import numpy as np


def fake_builder(inputs, parse_ok=True, build_ok=True, version="10.3.0"):
    """A fake ``tensorrt`` recording what build_engine asks of the builder. ``inputs``: {name: shape}."""
    seen = {"flags": [], "cleared": [], "profiles": [], "cache_in": None}
    trt = types.SimpleNamespace(__version__=version, Logger=lambda level: None)
    trt.Logger.WARNING = 2
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    if int(version.split(".")[0]) >= 11:  # TensorRT 11 removed the weak-typing precision flags
        trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")
    elif version == "10.3.0":  # the precision flags only; "10.8.0" models TF32 as well
        trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", BF16="bf16")
    else:
        trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", BF16="bf16", TF32="tf32")
    network = types.SimpleNamespace(
        num_inputs=len(inputs),
        get_input=lambda i: types.SimpleNamespace(name=list(inputs)[i], shape=list(inputs.values())[i]),
    )

    class Parser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, net, logger):
            assert net is network

        def parse_from_file(self, path):
            seen["parsed"] = path
            return parse_ok

        get_error = staticmethod(lambda i: f"node {i}: unsupported op")

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        set_memory_pool_limit = staticmethod(lambda pool, size: seen.update(workspace=(pool, size)))
        set_flag = staticmethod(lambda flag: seen["flags"].append(flag))
        clear_flag = staticmethod(lambda flag: seen["cleared"].append(flag))
        add_optimization_profile = staticmethod(lambda profile: seen["profiles"].append(dict(profile)))
        set_timing_cache = staticmethod(lambda cache, ignore_mismatch: None)

        @staticmethod
        def create_timing_cache(data):
            seen["cache_in"] = bytes(data)
            return types.SimpleNamespace(serialize=lambda: b"cache:" + bytes(data))

    trt.OnnxParser = Parser
    trt.Builder = lambda logger: types.SimpleNamespace(
        create_network=lambda flags: network,
        create_builder_config=Config,
        create_optimization_profile=Profile,
        build_serialized_network=lambda net, config: b"engine" if build_ok else None,
    )
    return trt, seen


class NativeStream:
    """A cuda-python 13 stream object: ``int()`` on it is deprecated, so this fake refuses it."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __int__(self):
        raise AssertionError("int(cudaStream_t) is deprecated in cuda-python 13: use get_cuda_native_handle")


def fake_backend(lo, hi, out_dtype=np.float32, scale=2.0, native_handles=False):
    """Fake ``tensorrt`` and ``cuda`` modules: an engine computing out = scale * sample + timestep.

    Returns ``(trt, cuda, memory, calls)``: ``memory`` maps live fake device pointers to their host buffers,
    ``calls`` records the batch size of every execution and ``cuda.streams`` the stream handle it was given.
    ``native_handles``: model cuda-python 13, whose streams are objects read through
    ``cuda.bindings.utils.get_cuda_native_handle``.
    """
    trt = types.SimpleNamespace(__version__="10.0.0-fake", Logger=lambda level: None)
    trt.Logger.WARNING = 2
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = types.SimpleNamespace(FLOAT="f32", HALF="f16", INT32="i32", INT64="i64", BOOL="b")
    np_types = {"f32": np.float32, "f16": np.float16, "i64": np.int64}
    tensors = {
        "sample": ("in", "f32", (-1, 1, 4, 4)),
        "timestep": ("in", "f32", (-1,)),
        "out": ("out", {np.float32: "f32", np.float16: "f16"}[out_dtype], (-1, 1, 4, 4)),
    }
    memory, calls, streams = {}, [], []

    def view(ptr, name, shape):
        dtype = np.dtype(np_types[tensors[name][1]])
        n = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)

    class Context:
        def __init__(self):
            self.shapes, self.addr = {}, {}

        def set_input_shape(self, name, shape):
            ok = lo <= shape[0] <= hi
            self.shapes[name] = tuple(shape) if ok else self.shapes.get(name)
            return ok

        def get_tensor_shape(self, name):
            return self.shapes["sample"] if name == "out" else self.shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream):
            b = self.shapes["sample"][0]
            assert self.shapes["timestep"] == (b,)
            assert isinstance(stream, int)
            calls.append(b)
            streams.append(stream)
            x, t = view(self.addr["sample"], "sample", (b, 1, 4, 4)), view(self.addr["timestep"], "timestep", (b,))
            view(self.addr["out"], "out", (b, 1, 4, 4))[...] = scale * x + t[:, None, None, None]
            return True

    class Engine:
        num_io_tensors = 3
        get_tensor_name = staticmethod(lambda i: list(tensors)[i])
        get_tensor_mode = staticmethod(lambda n: tensors[n][0])
        get_tensor_dtype = staticmethod(lambda n: tensors[n][1])
        get_tensor_shape = staticmethod(lambda n: tensors[n][2])
        get_tensor_profile_shape = staticmethod(lambda n, p: [(b, *tensors[n][2][1:]) for b in (lo, lo, hi)])
        create_execution_context = staticmethod(Context)

    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: Engine())

    def malloc(n):
        buf = ctypes.create_string_buffer(n)
        memory[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    ok = 0
    cudart = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=ok),
        cudaGetErrorString=lambda e: (ok, b"fake error"),
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
        cudaSetDevice=lambda d: (ok,),
        cudaStreamDestroy=lambda s: (ok,),
        cudaStreamCreate=lambda: (ok, NativeStream(7) if native_handles else 7),
        cudaStreamSynchronize=lambda s: (ok,),
        cudaMalloc=malloc,
        cudaFree=lambda p: (memory.pop(p) and ok,),
        cudaMemcpyAsync=lambda dst, src, n, kind, s: (ctypes.memmove(dst, src, n) and ok,),
    )
    utils = types.SimpleNamespace(
        get_cuda_native_handle=lambda obj: (
            obj.ptr if isinstance(obj, NativeStream) else (_ for _ in ()).throw(TypeError(f"Unknown type: {type(obj)}"))
        )
    )
    return trt, types.SimpleNamespace(cudart=cudart, utils=utils, streams=streams), memory, calls


def tiny_onnx(path, fp16=False, batch="B", conditional=False):
    """out = sample * 2 + timestep[:, None, None, None]; sample [B,1,4,4] float, timestep [B] float; opset 18.

    ``fp16``: the same function computed in float16 between float32 inputs and output (Cast nodes and a float16
    weight), the shape of a bundle's ``unet.fp16.onnx``. ``batch``: an int fixes the batch size (a static-batch
    graph). ``conditional``: a third input ``class_labels`` int64[B], added to the output.
    """
    import onnx
    from onnx import TensorProto, helper

    wtype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    nodes = [helper.make_node("Unsqueeze", ["timestep", "axes"], ["t4"])]
    x, t = "sample", "t4"
    if fp16:
        nodes += [
            helper.make_node("Cast", ["sample"], ["x16"], to=wtype),
            helper.make_node("Cast", ["t4"], ["t16"], to=wtype),
        ]
        x, t = "x16", "t16"
    nodes += [helper.make_node("Mul", [x, "two"], ["doubled"]), helper.make_node("Add", ["doubled", t], ["sum"])]
    inputs = [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, [batch, 1, 4, 4]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [batch]),
    ]
    last = "sum"
    if conditional:
        inputs.append(helper.make_tensor_value_info("class_labels", TensorProto.INT64, [batch]))
        nodes += [
            helper.make_node("Cast", ["class_labels"], ["labels_f"], to=wtype),
            helper.make_node("Unsqueeze", ["labels_f", "axes"], ["l4"]),
            helper.make_node("Add", ["sum", "l4"], ["sum_l"]),
        ]
        last = "sum_l"
    nodes.append(
        helper.make_node("Cast" if fp16 else "Identity", [last], ["out"], **({"to": TensorProto.FLOAT} if fp16 else {}))
    )
    graph = helper.make_graph(
        nodes,
        "tiny",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 1, 4, 4])],
        initializer=[
            helper.make_tensor("two", wtype, [], [2.0]),
            helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def install_fake_cuda(monkeypatch, trt, cuda, flavour):
    """Put the fake modules in ``sys.modules`` as one cuda-python generation lays them out.

    ``"cuda.cudart"``: before 12.6 (``from cuda import cudart``); ``"cuda.bindings.runtime"``: 12.6 to 12.8
    (``from cuda.bindings import runtime``, no ``utils``); ``"cuda-python 13"``: ``cuda.bindings.utils`` holds
    ``get_cuda_native_handle`` and streams refuse ``int()``.
    """
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    if flavour == "cuda.cudart":
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
        return
    bindings = types.SimpleNamespace(runtime=cuda.cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    if flavour == "cuda-python 13":
        bindings.utils = cuda.utils
        monkeypatch.setitem(sys.modules, "cuda.bindings.utils", cuda.utils)
    cuda.cudart = None
