"""TextToImagePipeline: a tiny random StableDiffusionPipeline exported once per session; our images equal diffusers'
for the same seed (every scheduler, negative prompts, batches, sizes, given latents, no guidance), each graph equals
its torch module on its own, errors are clear, threads share one pipeline, and torch is never imported."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _bundles import IMAGE_TOL, call_in_threads

from deploy_diff.runtime import Pipeline, TextToImagePipeline, load
from deploy_diff.runtime.bundle import BundleError, load_bundle
from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.sampling import NonFiniteError

GRAPH_TOL = 1e-5  # relative error of one graph against its torch module (measured: text encoder 5e-7, VAE 7e-7)
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "", "Portrait of a CAT, oil painting 🎨 café"]
SCHEDULERS = {  # runtime name -> diffusers class (built from the folder's PNDM config, as the runtime builds it)
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
}


@pytest.fixture(scope="module")
def sd_pipe(sd_bundle):
    return TextToImagePipeline.from_bundle(sd_bundle)


@pytest.fixture(scope="module")
def reference(sd_folder):
    from _sd import load_diffusers_sd

    return load_diffusers_sd(sd_folder)


def diffusers_images(reference, scheduler, seed, **kwargs):
    """diffusers' StableDiffusionPipeline on the same folder, with ``scheduler`` built from its config."""
    import diffusers

    sched = getattr(diffusers, SCHEDULERS[scheduler]).from_config(reference.scheduler.config)
    pipe = diffusers.StableDiffusionPipeline(**{**reference.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    generator = (  # torch.manual_seed returns the one global generator: a list needs generators of its own
        [torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list) else torch.manual_seed(seed)
    )
    images = pipe(generator=generator, **{"output_type": "np", **kwargs}).images
    return images.numpy() if isinstance(images, torch.Tensor) else images


CASES = {
    "negative-prompt": dict(prompt="a cat in the garden", negative_prompt="blurry, ugly"),
    "list-of-prompts-2-each": dict(
        prompt=["a dog", "a horse on the moon"], negative_prompt=["sketch", "neon"], num_images_per_prompt=2
    ),
    "other-size": dict(prompt="a landscape with mountains", height=32, width=24),  # diffusers: multiples of 8
    "no-guidance": dict(prompt="a river at sunset", guidance_scale=1.0, negative_prompt="ignored"),
    "low-guidance": dict(prompt="a river at sunset", guidance_scale=0.5),
    "seed-per-image": dict(prompt=["a vase", "a house"], guidance_scale=3.0, seed=[5, 9]),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_images_equal_diffusers_for_every_scheduler(sd_bundle, reference, scheduler):
    pipe = TextToImagePipeline.from_bundle(sd_bundle, scheduler=None if scheduler == "pndm" else scheduler)
    kw = dict(prompt="a photo of an astronaut riding a horse", negative_prompt="low quality", num_inference_steps=8)
    ours = pipe(**kw, seed=3)
    theirs = diffusers_images(reference, scheduler, 3, **kw)
    assert ours.shape == theirs.shape == (1, 16, 16, 3)
    assert np.abs(ours - theirs).max() <= IMAGE_TOL


@pytest.mark.parametrize("case", list(CASES))
def test_images_equal_diffusers_for_every_kind_of_call(sd_pipe, reference, case):
    kw = dict(CASES[case])
    seed = kw.pop("seed", 11)
    ours = sd_pipe(**kw, num_inference_steps=6, seed=seed)
    theirs = diffusers_images(reference, "pndm", seed, **kw, num_inference_steps=6)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= IMAGE_TOL


def test_the_prompt_matters_beyond_the_tolerance(sd_pipe):
    """The parity bound means something: another prompt, negative prompt or guidance moves the images 27-86 times
    IMAGE_TOL (measured; the UNet's output layer is scaled down, so the prompt's pull on the noise is small)."""
    base = sd_pipe("a cat", num_inference_steps=6, seed=0)
    for kw in (dict(prompt="a dog"), dict(negative_prompt="a dog"), dict(guidance_scale=2), dict(guidance_scale=1)):
        other = sd_pipe(**{"prompt": "a cat", **kw}, num_inference_steps=6, seed=0)
        assert np.abs(other - base).max() > 10 * IMAGE_TOL, kw


def test_given_latents_output_types_and_the_latent_output(sd_pipe, reference):
    latents = TorchGenerator(4).randn((2, 4, 8, 8))
    given = dict(latents=torch.from_numpy(latents))
    kw = dict(prompt="still life with flowers", num_inference_steps=5, num_images_per_prompt=2)
    ours = sd_pipe(**kw, latents=latents)
    assert np.abs(ours - diffusers_images(reference, "pndm", 0, **kw, **given)).max() <= IMAGE_TOL
    np.testing.assert_array_equal(sd_pipe(**kw, seed=4), ours)  # seed 4 draws these latents
    euler = TextToImagePipeline(sd_pipe.text_encoder, sd_pipe.unet, sd_pipe.vae_decoder, sd_pipe.tokenizer,
                                sd_pipe.model, sd_pipe.scheduler_config, scheduler="euler")  # fmt: skip
    theirs = diffusers_images(reference, "euler", 0, **kw, **given)  # Euler scales them by init_noise_sigma = 14.6
    assert np.abs(euler(**kw, latents=latents) - theirs).max() <= IMAGE_TOL
    u8 = sd_pipe(**kw, latents=latents, output_type="uint8")
    assert u8.dtype == np.uint8 and np.array_equal(u8, np.round(ours * 255).astype(np.uint8))
    pil = sd_pipe(**kw, latents=latents, output_type="pil")
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    lat = sd_pipe(**kw, latents=latents, output_type="latent")
    theirs = diffusers_images(reference, "pndm", 0, **kw, **given, output_type="latent")
    assert lat.shape == (2, 4, 8, 8) and np.abs(lat - theirs).max() <= IMAGE_TOL


# -- each graph on its own -----------------------------------------------------------------------------------
def _relative(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def test_tokenizer_equals_the_pipelines_and_truncation_is_logged(sd_pipe, reference, caplog):
    long = " ".join(f"w{i}" for i in range(100))
    want = reference.tokenizer(PROMPTS + [long], padding="max_length", max_length=77, truncation=True)
    np.testing.assert_array_equal(sd_pipe.tokenizer(PROMPTS + [long]), np.array(want.input_ids))
    with caplog.at_level("WARNING", logger="deploy_diff.runtime.text_to_image"):
        sd_pipe.encode_prompt(PROMPTS + [long])
    assert len(caplog.records) == 1 and "truncated" in caplog.text and "w99" in caplog.text and "w0 " not in caplog.text


def test_text_encoder_equals_transformers(sd_pipe, reference):
    ids = sd_pipe.tokenizer(PROMPTS)
    with torch.no_grad():
        want = reference.text_encoder(torch.from_numpy(ids))[0].numpy()
    got = sd_pipe.text_encoder.run({"input_ids": ids})
    assert got.shape == (3, 77, 32) and _relative(got, want) <= GRAPH_TOL
    np.testing.assert_array_equal(sd_pipe.encode_prompt(PROMPTS), got)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 4, 12, 6)])
def test_vae_decoder_equals_diffusers(sd_pipe, reference, shape):
    latents = TorchGenerator(1).randn(shape)
    with torch.no_grad():
        want = reference.vae.decode(torch.from_numpy(latents) / reference.vae.config.scaling_factor).sample.numpy()
    got = sd_pipe.decode_latents(latents)
    assert got.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3]) and _relative(got, want) <= GRAPH_TOL


def test_openvino_equals_onnxruntime(sd_bundle, sd_pipe):
    pytest.importorskip("openvino")
    ov = TextToImagePipeline.from_bundle(sd_bundle, backend="openvino", num_threads=1)
    assert type(ov.runner).__name__ == "OpenVINORunner" and ov.precisions == dict.fromkeys(ov.precisions, "fp32")
    kw = dict(prompt=["a dog", "a cat"], num_inference_steps=4, seed=2)
    assert np.abs(ov(**kw) - sd_pipe(**kw)).max() <= IMAGE_TOL
    ov.close()
    with pytest.raises(RuntimeError, match="closed"):
        ov(**kw)


def test_fp16_graphs_sample_close_to_fp32_and_each_component_falls_back_alone(sd_bundle, sd_pipe):
    from deploy_diff.runtime.bundle import GraphInfo
    from deploy_diff.runtime.text_to_image import component_precision

    half = TextToImagePipeline.from_bundle(sd_bundle, precision="fp16")
    assert half.precision == "fp16" and half.precisions == dict.fromkeys(half.precisions, "fp16")
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=8, seed=0)
    assert np.abs(half(**kw) - sd_pipe(**kw)).max() < 2e-3  # measured 3.5e-4 .. 5.4e-4 over 4 seeds
    bundle = load_bundle(sd_bundle)
    no_fp16_vae = dict(bundle.graphs, vae_decoder=GraphInfo({"fp32": "vae_decoder.onnx"}))
    bundle = dataclasses.replace(bundle, graphs=no_fp16_vae)  # export left the VAE's fp16 graph out (an overflow)
    want = {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    assert {c: component_precision(bundle, c, "onnxruntime", "fp16") for c in want} == want
    assert component_precision(bundle, "text_encoder", "openvino", "bf16") == "fp32"
    assert component_precision(bundle, "unet", "openvino", "bf16") == "bf16"
    assert TextToImagePipeline.from_bundle(bundle, precision="fp16").precisions == want


# -- runner.run: any graph on every backend -----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_run_takes_any_graph_by_its_named_inputs(sd_bundle, sd_pipe, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
        from deploy_diff.runtime.backends.openvino import OpenVINORunner as Runner
    else:
        from deploy_diff.runtime.backends.onnxruntime import OnnxRuntimeRunner as Runner
    graph = sd_bundle / "vae_decoder.onnx"
    runner = Runner(graph, unet=False)
    assert runner.input_names == ("latent_sample",) and runner.input_shapes == {"latent_sample": (None, 4, None, None)}
    assert runner.output_name == "sample" and runner.static_batch is None and runner.sample_shape is None
    latents = TorchGenerator(2).randn((2, 4, 6, 4))
    out = runner.run({"latent_sample": latents.astype(np.float64)})  # cast to the graph's float32
    assert out.dtype == np.float32 and out.shape == (2, 3, 12, 8)
    np.testing.assert_allclose(out, sd_pipe.vae_decoder.run({"latent_sample": latents}), rtol=0, atol=1e-5)
    for feeds, match in [
        ({}, r"takes inputs \['latent_sample'\]; missing \['latent_sample'\]"),
        ({"latent_sample": latents, "mask": latents}, r"unexpected \['mask'\]"),
        ({"latent_sample": latents[0]}, r"input 'latent_sample' must have shape \[\?, 4, \?, \?\]; got \(4, 6, 4\)"),
        ({"latent_sample": latents[:, :3]}, "must have shape"),
        ({"latent_sample": latents[:0]}, "at least one row"),
        ({"latent_sample": latents.astype(np.complex64)}, "takes float32 values; got an array of dtype complex64"),
    ]:
        with pytest.raises(ValueError, match=match):
            runner.run(feeds)
    with pytest.raises(TypeError, match="opened with unet=False: call runner.run"):
        runner(latents, 1.0)
    with pytest.raises(ValueError, match="a UNet graph takes `sample` and `timestep`"):
        Runner(graph)  # unet=True (the default) checks the graph is a UNet
    text = Runner(sd_bundle / "text_encoder.onnx", unet=False)
    ids = sd_pipe.tokenizer(["a", "b"])
    with pytest.raises(ValueError, match="input 'input_ids' takes int64 values; got an array of dtype float32"):
        text.run({"input_ids": ids.astype(np.float32)})  # a float would be truncated silently
    unet = Runner(sd_bundle / "unet.onnx", unet=False)
    feeds = dict(sample=latents, timestep=np.ones(3), encoder_hidden_states=np.zeros((2, 77, 32), np.float32))
    with pytest.raises(ValueError, match="'sample' has 2 rows but 'timestep' has 3"):
        unet.run(feeds)
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.run({"latent_sample": latents})


def test_tensorrt_run_takes_named_inputs(monkeypatch, tmp_path):
    """TensorRT's run() against the fake TensorRT + cuda-python of the backend tests (no GPU here)."""
    sys.path.insert(0, str(Path(__file__).parent / "backends"))
    from _trt_fakes import fake_backend, install_fake_cuda

    from deploy_diff.runtime.backends.tensorrt import TensorRTRunner

    trt, cuda, memory, calls = fake_backend(1, 2)  # an engine computing out = 2 * sample + timestep, batches 1..2
    install_fake_cuda(monkeypatch, trt, cuda, "cuda.bindings.runtime")
    (tmp_path / "fake.plan").write_bytes(b"plan")
    runner = TensorRTRunner(tmp_path / "fake.plan", unet=False)
    assert runner.input_shapes == {"sample": (None, 1, 4, 4), "timestep": (None,)}
    assert runner.profile["sample"] == ((1, 1, 4, 4), (2, 1, 4, 4)) and runner.sample_shape is None
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    out = runner.run({"sample": x, "timestep": np.arange(3)})  # 3 rows: chunks of 2 and 1
    np.testing.assert_allclose(out, 2 * x + np.arange(3)[:, None, None, None], rtol=1e-6)
    assert calls == [2, 1]
    with pytest.raises(ValueError, match="missing \\['timestep'\\]"):
        runner.run({"sample": x})
    with pytest.raises(TypeError, match="unet=False"):
        runner(x, np.arange(3))
    runner.close()
    assert not memory


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(prompt=None), TypeError, "prompt must be a str or a list of str; got NoneType"),
        (dict(prompt=["a", 1]), TypeError, "the list holds a int"),
        (dict(prompt="a", negative_prompt=3), TypeError, "negative_prompt must be a str or a list of str"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "got 1 negative prompts for 2 prompts"),
        (dict(prompt="a", negative_prompt=["c", "d"]), ValueError, "got 2 negative prompts for 1 prompts"),
        (dict(prompt="a", height=15), ValueError, "height must be a positive int divisible by 4 \\(the VAE's factor"),
        (dict(prompt="a", height=18), ValueError, "divisible by 4 \\(the VAE's factor 2 times the UNet's downsampling"),
        (dict(prompt="a", width=0), ValueError, "width must be a positive int divisible"),
        (dict(prompt="a", width=16.0), ValueError, "width must be a positive int"),
        (dict(prompt="a", num_images_per_prompt=0), ValueError, "num_images_per_prompt must be a positive int"),
        (dict(prompt="a", guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
        (dict(prompt="a", output_type="pt"), ValueError, "output_type='pt'"),
        (dict(prompt=["a", "b"], seed=[1, 2, 3]), ValueError, "got 3 seeds for num_images=2"),
        (dict(prompt="a", seed="0"), TypeError, "seed must be an int"),
        (dict(prompt="a", eta=0.5), ValueError, "eta=0.5 is only used by DDIM"),
        (dict(prompt="a", latents=np.zeros((1, 4, 4, 4), np.float32)), ValueError, r"expected \(1, 4, 8, 8\)"),
        (dict(prompt="a", height=1 << 16, width=1 << 16), ValueError, "ask for more than"),
    ],
)
def test_bad_call_arguments(sd_pipe, kw, err, match):
    with pytest.raises(err, match=match):
        sd_pipe(**kw, num_inference_steps=2)


def test_image_sides_are_multiples_of_the_bundles_size_multiple(sd_pipe):
    """The tiny UNet halves its latents once, so it takes even latent sides: images in multiples of 4 (18 would
    reach ONNX Runtime as 9x8 latents and fail inside the UNet's Concat). A bundle that does not record
    size_multiple is checked against the VAE's factor alone."""
    assert sd_pipe.image_size() == (16, 16) and sd_pipe.image_size(20, 12) == (20, 12)
    assert sd_pipe("a", height=20, width=12, num_inference_steps=2, seed=0).shape == (1, 20, 12, 3)
    old = dataclasses.replace(sd_pipe.model, size_multiple=None)
    assert old.size_multiple == 2
    pipe = TextToImagePipeline(sd_pipe.text_encoder, sd_pipe.unet, sd_pipe.vae_decoder, sd_pipe.tokenizer, old,
                               sd_pipe.scheduler_config)  # fmt: skip
    assert pipe.image_size(18, 14) == (18, 14)
    with pytest.raises(ValueError, match=r"width must be a positive int divisible by 2 \(the VAE's factor: one latent"):
        pipe.image_size(16, 15)


def test_non_finite_latents_name_the_step(sd_pipe):
    bad = TorchGenerator(0).randn((1, 4, 8, 8))
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="latents has 1 non-finite value"):
        sd_pipe("a", latents=bad, num_inference_steps=3)

    class Overflowing:  # the real UNet, with what an fp16 overflow looks like in its third output
        def __init__(self):
            self.calls = 0

        def run(self, feeds):
            self.calls += 1
            out = sd_pipe.unet.run(feeds)
            if self.calls == 3:
                out[0, 0, 0, 0] = np.inf
            return out

    pipe = TextToImagePipeline(sd_pipe.text_encoder, Overflowing(), sd_pipe.vae_decoder, sd_pipe.tokenizer,
                               sd_pipe.model, sd_pipe.scheduler_config, scheduler="ddim")  # fmt: skip
    with pytest.raises(NonFiniteError, match="model output has 1 non-finite value.*step 2"):
        pipe("a", num_inference_steps=5, seed=0)


def test_bundles_of_the_other_kind_are_refused_and_load_picks_the_class(sd_bundle, diffusers_bundle):
    assert isinstance(load(sd_bundle, scheduler="ddim"), TextToImagePipeline)
    assert isinstance(load(diffusers_bundle), Pipeline)
    with pytest.raises(BundleError, match="not a text-to-image one: open it with Pipeline.from_bundle"):
        TextToImagePipeline.from_bundle(diffusers_bundle)
    with pytest.raises(ValueError, match="load it with deploy_diff.runtime.TextToImagePipeline.from_bundle"):
        Pipeline.from_bundle(sd_bundle)
    with pytest.raises(ValueError, match="unknown scheduler 'plms'"):
        TextToImagePipeline.from_bundle(sd_bundle, scheduler="plms")
    with pytest.raises(ValueError, match="no fp32 TensorRT engine for its text_encoder"):
        TextToImagePipeline.from_bundle(load_bundle(sd_bundle), backend="tensorrt")


# -- threads and torch ---------------------------------------------------------------------------------------
def test_threads_sharing_one_pipeline_give_the_serial_images(sd_pipe):
    jobs = [
        dict(prompt=p, negative_prompt=n, seed=s, guidance_scale=g)
        for s, (p, n, g) in enumerate([("a cat", None, 7.5), ("a dog", "blur", 3.0), ("sea", None, 1.0)] * 2)
    ]
    serial = [sd_pipe(**job, num_inference_steps=4) for job in jobs]
    results = call_in_threads(lambda job: sd_pipe(**job, num_inference_steps=4), jobs, repeats=2)
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_sampling_and_the_cli_never_import_torch(sd_bundle, tmp_path):
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'diffusers'):\n"
        "    sys.modules[name] = None\n"
        "from deploy_diff.runtime import load\n"
        f"pipe = load({str(sd_bundle)!r})\n"
        "images = pipe(['a cat', 'a dog'], num_inference_steps=3, seed=0, output_type='uint8')\n"
        "assert images.shape == (2, 16, 16, 3), images.shape\n"
        "from deploy_diff.cli import main\n"
        f"assert main(['sample', {str(sd_bundle)!r}, '--prompt', 'a cat', '--steps', '2', '--no-progress', "
        f"'--out', {str(tmp_path / 'g.png')!r}]) == 0\n"
        "assert not {'torch', 'transformers', 'diffusers'} & {k for k, v in sys.modules.items() if v is not None}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok") and (tmp_path / "g.png").is_file()
