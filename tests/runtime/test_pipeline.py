"""The runtime pipeline: equal to diffusers' pipelines for the same seed, equal to the torch runner, guidance,
threads, batching, output types and clear errors."""

import json
import shutil

import numpy as np
import pytest
from _bundles import IMAGE_TOL, call_in_threads, diffusers_images

from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.bundle import BundleError, load_bundle
from deploy_diff.runtime.sampling import NonFiniteError
from deploy_diff.runtime.schedulers import SCHEDULER_NAMES, DDIMScheduler


@pytest.mark.parametrize(
    "kind, eta, seed", [("ddim", 0.0, 0), ("ddim", 0.0, 11), ("ddim", 1.0, 3), ("ddpm", 0.0, 0), ("ddpm", 0.0, 5)]
)
def test_equals_diffusers_pipelines_for_the_same_seed(diffusers_pipeline_dir, diffusers_bundle, kind, eta, seed):
    ref = diffusers_images(diffusers_pipeline_dir, kind, seed, eta=eta)
    ours = Pipeline.from_bundle(diffusers_bundle, scheduler=kind)(
        num_images=3, num_inference_steps=50, seed=seed, eta=eta
    )
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= IMAGE_TOL


def test_a_list_of_seeds_gives_one_generator_per_image(diffusers_pipeline_dir, diffusers_bundle):
    pipe = Pipeline.from_bundle(diffusers_bundle, scheduler="ddpm")
    seeds = [4, 9, 2]
    batch = pipe(num_images=3, num_inference_steps=20, seed=seeds)
    ref = diffusers_images(diffusers_pipeline_dir, "ddpm", seeds, steps=20)
    assert np.abs(batch - ref).max() <= IMAGE_TOL
    for i, s in enumerate(seeds):  # an image does not change with the batch it is in
        alone = pipe(num_images=1, num_inference_steps=20, seed=[s])
        np.testing.assert_allclose(alone[0], batch[i], atol=1e-6)


def test_the_bundles_own_scheduler_is_the_default(diffusers_bundle):
    pipe = Pipeline.from_bundle(diffusers_bundle)
    assert type(pipe.make_scheduler()).__name__ == "DDPMScheduler"
    a = pipe(num_images=2, num_inference_steps=10, seed=1)
    b = Pipeline.from_bundle(diffusers_bundle, scheduler="ddpm")(num_images=2, num_inference_steps=10, seed=1)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
def test_every_scheduler_by_name_samples(diffusers_bundle, name):
    images = Pipeline.from_bundle(diffusers_bundle, scheduler=name)(num_images=2, num_inference_steps=6, seed=0)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_a_scheduler_instance_is_copied_per_call(diffusers_bundle):
    inst = DDIMScheduler.from_config(load_bundle(diffusers_bundle).scheduler_config())
    pipe = Pipeline.from_bundle(diffusers_bundle, scheduler=inst)
    a = pipe(num_images=2, num_inference_steps=10, seed=3)
    b = pipe(num_images=2, num_inference_steps=25, seed=3)
    assert not np.array_equal(a, b)
    assert inst.num_inference_steps is None  # the caller's instance was never stepped
    np.testing.assert_array_equal(pipe(num_images=2, num_inference_steps=10, seed=3), a)


def test_fp16_graph_samples_close_to_fp32(diffusers_bundle):
    a = Pipeline.from_bundle(diffusers_bundle, scheduler="ddim")(num_images=2, num_inference_steps=20, seed=0)
    b = Pipeline.from_bundle(diffusers_bundle, scheduler="ddim", precision="fp16")(
        num_images=2, num_inference_steps=20, seed=0
    )
    # per forward the fp16 graph is within 2e-2 (export validation); over 20 deterministic steps the error drifts
    diff = np.abs(a - b)
    assert diff.mean() < 2e-2 and diff.max() < 0.1, (diff.mean(), diff.max())


# -- our UNet: ORT equals the torch runner; guidance ------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_pipe(cond_run_dir, cond_run_bundle):
    from deploy_diff.train.checkpoint import find_checkpoint
    from deploy_diff.train.runner import TorchRunner
    from deploy_diff.train.unet import UNet

    ckpt = find_checkpoint(cond_run_dir)
    unet = UNet(ckpt.model_config).eval()
    unet.load_state_dict(ckpt.ema_state)
    bundle = load_bundle(cond_run_bundle)
    return lambda scheduler: Pipeline(TorchRunner(unet), bundle.model, bundle.scheduler_config(), scheduler=scheduler)


@pytest.mark.parametrize(
    "scheduler, kw",
    [
        ("ddim", dict(guidance_scale=3.0, class_labels=[1, 5, 9])),
        ("ddpm", dict(class_labels=7)),
        ("dpmsolver++", dict()),
        ("euler_a", dict(guidance_scale=2.0, class_labels=[0, 0, 3])),
    ],
)
def test_onnxruntime_pipeline_equals_the_torch_runner(cond_run_bundle, torch_pipe, scheduler, kw):
    ours = Pipeline.from_bundle(cond_run_bundle, scheduler=scheduler)(
        num_images=3, num_inference_steps=20, seed=2, **kw
    )
    ref = torch_pipe(scheduler)(num_images=3, num_inference_steps=20, seed=2, **kw)
    assert np.abs(ours - ref).max() <= IMAGE_TOL


class CountingRunner:
    def __init__(self, runner):
        self.runner = runner
        self.batches = []

    def __call__(self, x, t, labels=None):
        self.batches.append((x.shape[0], None if labels is None else labels.copy()))
        return self.runner(x, t, labels)


def test_guidance(cond_run_bundle):
    pipe = Pipeline.from_bundle(cond_run_bundle, scheduler="ddim")
    counting = CountingRunner(pipe.runner)
    counted = Pipeline(counting, pipe.model, pipe.scheduler_config, scheduler="ddim")
    cond = counted(num_images=2, num_inference_steps=5, seed=0, class_labels=[3, 4])
    assert {b for b, _ in counting.batches} == {2}
    counting.batches.clear()
    g1 = counted(num_images=2, num_inference_steps=5, seed=0, class_labels=[3, 4], guidance_scale=1.0)
    np.testing.assert_array_equal(g1, cond)  # scale 1 is the conditional model alone: no doubled batch
    assert {b for b, _ in counting.batches} == {2}
    counting.batches.clear()
    counted(num_images=2, num_inference_steps=5, seed=0, class_labels=[3, 4], guidance_scale=3.0)
    assert {b for b, _ in counting.batches} == {4}  # conditional and null halves in one model call
    np.testing.assert_array_equal(counting.batches[0][1], [3, 4, 10, 10])
    g0 = pipe(num_images=2, num_inference_steps=5, seed=0, class_labels=[3, 4], guidance_scale=0.0)
    uncond = pipe(num_images=2, num_inference_steps=5, seed=0)  # class_labels=None: the null label
    np.testing.assert_allclose(g0, uncond, atol=1e-5)


def test_static_batch_bundles_chunk_and_pad(cond_run_dir, cond_run_bundle, tmp_path):
    from deploy_diff.export import export_bundle, load_run_source

    static = tmp_path / "static"
    manifest = export_bundle(load_run_source(cond_run_dir), static, static_batch=2, log=None)
    assert manifest["model"]["inputs"]["sample"]["shape"][0] == 2
    pipe = Pipeline.from_bundle(static, scheduler="ddim")
    assert pipe.runner.static_batch == 2
    ref = Pipeline.from_bundle(cond_run_bundle, scheduler="ddim")
    for n, kw in [(5, {}), (1, {}), (3, dict(guidance_scale=2.0, class_labels=[1, 2, 3]))]:
        a = pipe(num_images=n, num_inference_steps=4, seed=1, **kw)
        b = ref(num_images=n, num_inference_steps=4, seed=1, **kw)
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="sample has shape"):
        pipe.runner(np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.float32), np.zeros(2, np.int64))


def test_threads_sharing_one_pipeline_give_the_serial_images(cond_run_bundle):
    pipe = Pipeline.from_bundle(cond_run_bundle, scheduler="dpmsolver++")
    jobs = [dict(seed=s, class_labels=s % 10, guidance_scale=None if s % 2 else 2.5) for s in range(8)]
    serial = [pipe(num_images=2, num_inference_steps=8, **job) for job in jobs]
    results = call_in_threads(lambda job: pipe(num_images=2, num_inference_steps=8, **job), jobs)
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_output_types_and_latents(diffusers_bundle):
    pipe = Pipeline.from_bundle(diffusers_bundle, scheduler="ddim")
    kw = dict(num_images=2, num_inference_steps=5, seed=0)
    arr = pipe(**kw)
    assert arr.dtype == np.float32 and arr.shape == (2, 8, 8, 1)
    u8 = pipe(output_type="uint8", **kw)
    assert u8.dtype == np.uint8 and np.abs(u8.astype(int) - np.round(arr * 255)).max() == 0
    pil = pipe(output_type="pil", **kw)
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"
    lat = pipe(output_type="latent", **kw)
    assert lat.shape == (2, 1, 8, 8)
    from deploy_diff.runtime.rng import TorchGenerator

    given = TorchGenerator(0).randn((2, 1, 8, 8))
    np.testing.assert_array_equal(pipe(num_images=2, num_inference_steps=5, latents=given), arr)


def test_latents_are_scaled_by_init_noise_sigma(diffusers_bundle):
    pipe = Pipeline.from_bundle(diffusers_bundle, scheduler="euler")
    seen = []
    from deploy_diff.runtime.rng import TorchGenerator

    given = TorchGenerator(0).randn((1, 1, 8, 8))
    first = {}

    def runner(x, t, labels=None):
        first.setdefault("x", x.copy())
        return pipe.runner(x, t, labels)

    euler = Pipeline(runner, pipe.model, pipe.scheduler_config, scheduler="euler")
    euler(num_images=1, num_inference_steps=4, latents=given, callback=lambda i, t, x: seen.append(i))
    sched = pipe.make_scheduler()
    sched.set_timesteps(4)
    expected = sched.scale_model_input(given * np.float32(sched.init_noise_sigma), sched.timesteps[0])
    np.testing.assert_allclose(first["x"], expected, rtol=1e-6)
    assert seen == [0, 1, 2, 3]


# -- errors ---------------------------------------------------------------------------------------------------
def test_class_label_rules(diffusers_bundle, cond_run_bundle, diffusers_cond_unet_dir, tmp_path):
    uncond = Pipeline.from_bundle(diffusers_bundle)
    with pytest.raises(ValueError, match="unconditional: class_labels must be None"):
        uncond(class_labels=3, num_inference_steps=2)
    with pytest.raises(ValueError, match="unconditional, so pass guidance_scale=None"):
        uncond(guidance_scale=2.0, num_inference_steps=2)
    ours = Pipeline.from_bundle(cond_run_bundle)
    with pytest.raises(ValueError, match=r"class_labels must lie in 0..9"):
        ours(class_labels=11, num_inference_steps=2)
    with pytest.raises(ValueError, match="2 class_labels for num_images=3"):
        ours(num_images=3, class_labels=[1, 2], num_inference_steps=2)
    from deploy_diff.export import export_bundle, load_diffusers_source

    out = tmp_path / "dcond"
    export_bundle(load_diffusers_source(diffusers_cond_unet_dir), out, log=None)
    dcond = Pipeline.from_bundle(out)
    with pytest.raises(ValueError, match="no null label"):
        dcond(guidance_scale=3.0, class_labels=1, num_inference_steps=2)
    with pytest.raises(ValueError, match="pass class_labels"):
        dcond(num_inference_steps=2)
    assert dcond(class_labels=[1, 2], num_images=2, num_inference_steps=2, seed=0).shape == (2, 8, 8, 1)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(num_images=0), ValueError, "num_images"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(seed=-1), ValueError, r"seed must lie in \[0, 2\*\*64\)"),
        (dict(seed="a"), TypeError, "seed must be an int"),
        (dict(seed=[1, 2], num_images=3), ValueError, "2 seeds for num_images=3"),
        (dict(output_type="tensor"), ValueError, "output_type"),
        (dict(eta=0.5), ValueError, "only used by DDIM"),
        (dict(latents=np.zeros((1, 1, 4, 4), np.float32)), ValueError, "latents have shape"),
    ],
)
def test_bad_call_arguments(diffusers_bundle, kw, err, match):
    with pytest.raises(err, match=match):
        Pipeline.from_bundle(diffusers_bundle, scheduler="ddpm")(**{"num_inference_steps": 2, **kw})


def test_bad_pipeline_arguments(diffusers_bundle):
    with pytest.raises(ValueError, match="unknown scheduler 'plms'"):
        Pipeline.from_bundle(diffusers_bundle, scheduler="plms")
    with pytest.raises(ValueError, match="backend must be one of"):
        Pipeline.from_bundle(diffusers_bundle, backend="tvm")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        Pipeline.from_bundle(diffusers_bundle, device="tpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        Pipeline.from_bundle(diffusers_bundle, precision="int8")
    with pytest.raises(ValueError, match="cuda_graph=True needs the CUDA"):
        Pipeline.from_bundle(diffusers_bundle, cuda_graph=True)
    with pytest.raises(ValueError, match="prediction_type"):
        Pipeline.from_bundle(diffusers_bundle, scheduler=DDIMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="no TensorRT engine"):
        Pipeline.from_bundle(diffusers_bundle, backend="tensorrt")


def test_non_finite_model_output_names_the_step(diffusers_bundle):
    pipe = Pipeline.from_bundle(diffusers_bundle, scheduler="ddim")
    calls = []

    def overflowing(x, t, labels=None):
        calls.append(1)
        out = pipe.runner(x, t, labels)
        if len(calls) == 3:
            out[0, 0, 0, 0] = np.inf  # what an fp16 overflow looks like
        return out

    with pytest.raises(NonFiniteError, match="step 2"):
        Pipeline(overflowing, pipe.model, pipe.scheduler_config, scheduler="ddim")(num_inference_steps=5, seed=0)


def test_runner_input_checks(cond_run_bundle):
    runner = Pipeline.from_bundle(cond_run_bundle).runner
    x, t = np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        runner(x, t)
    with pytest.raises(ValueError, match=r"timestep must have shape \[2\]"):
        runner(x, np.zeros(3, np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        runner(x[0], t, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="integer array"):
        runner(x, t, np.zeros(2, np.float32))
    assert runner(x.astype(np.float64), 5, np.zeros(2, np.int64)).dtype == np.float32


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format_version=99), "format_version 99"),
        (lambda m: m.update(format="something/else"), "expected 'deploy-diff/bundle'"),
        (lambda m: m["files"].update({"../outside.txt": {"sha256": "0" * 64, "bytes": 1}}), "outside the bundle"),
        (lambda m: m["files"].update({"/etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "outside the bundle"),
        (lambda m: m["files"].pop("unet.onnx"), "lists no unet.onnx"),
        (lambda m: m["files"].update({"missing.bin": {"sha256": "0" * 64, "bytes": 1}}), "missing missing.bin"),
    ],
)
def test_bad_bundles_are_refused(diffusers_bundle, tmp_path, edit, match):
    b = tmp_path / "b"
    shutil.copytree(diffusers_bundle, b)
    manifest = json.loads((b / "deploy_diff.json").read_text())
    edit(manifest)
    (b / "deploy_diff.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=match):
        Pipeline.from_bundle(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no deploy_diff.json"):
        load_bundle(tmp_path)
    (tmp_path / "deploy_diff.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


def _rehash(bundle_dir):
    from deploy_diff.runtime.bundle import sha256_file

    manifest = json.loads((bundle_dir / "deploy_diff.json").read_text())
    for name, entry in manifest["files"].items():
        entry.update(sha256=sha256_file(bundle_dir / name), bytes=(bundle_dir / name).stat().st_size)
    (bundle_dir / "deploy_diff.json").write_text(json.dumps(manifest))
    return manifest


def test_a_graph_that_is_not_onnx_is_a_clear_error(diffusers_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(diffusers_bundle, b)
    data = (b / "unet.onnx").read_bytes()
    (b / "unet.onnx").write_bytes(data[: len(data) // 3])  # truncated, with a manifest that agrees
    _rehash(b)
    with pytest.raises(ValueError, match="ONNX Runtime cannot load"):
        Pipeline.from_bundle(b)


def test_a_graph_that_differs_from_its_manifest_is_refused(diffusers_bundle, cond_run_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(diffusers_bundle, b)
    shutil.copy(cond_run_bundle / "unet.onnx", b / "unet.onnx")  # a conditional graph in an unconditional bundle
    _rehash(b)
    with pytest.raises(BundleError, match="graph's inputs"):
        Pipeline.from_bundle(b)


def test_huge_sizes_in_a_manifest_are_refused_before_allocating(diffusers_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(diffusers_bundle, b)
    manifest = json.loads((b / "deploy_diff.json").read_text())
    manifest["model"]["sample_size"] = [10**6, 10**6]
    (b / "deploy_diff.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="out of range"):
        load_bundle(b)


def test_symlinks_leaving_the_bundle_are_refused(diffusers_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(diffusers_bundle, b)
    (tmp_path / "outside.json").write_text((b / "scheduler_config.json").read_text())
    (b / "scheduler_config.json").unlink()
    (b / "scheduler_config.json").symlink_to(tmp_path / "outside.json")
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(b)
