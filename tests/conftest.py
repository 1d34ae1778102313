import os
import sys

import pytest
from hypothesis import settings

# CI runs must be reproducible: hypothesis draws the same examples every run (explore more locally with
# DEPLOY_DIFF_HYPOTHESIS_EXAMPLES=2000 and HYPOTHESIS_PROFILE=explore)
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tests/_parity.py is a helper module shared by the scheduler tests
sys.path.insert(0, os.path.dirname(__file__))

try:  # the test models are tiny: one thread is fastest, and immune to a busy machine (no spin-waiting)
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch absent or broken: no GPU tests
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- bundles shared by the export / pipeline / CLI tests (each export takes seconds: build them once) ------------
@pytest.fixture(scope="session")
def diffusers_pipeline_dir(tmp_path_factory):
    from _bundles import diffusers_unet, save_diffusers_pipeline

    return save_diffusers_pipeline(diffusers_unet(attention=True), tmp_path_factory.mktemp("dpipe") / "pipe")


@pytest.fixture(scope="session")
def diffusers_bundle(diffusers_pipeline_dir, tmp_path_factory):
    """The attention UNet2DModel pipeline exported with an fp16 graph (dynamic batch)."""
    from deploy_diff.export import export_bundle, load_diffusers_source

    out = tmp_path_factory.mktemp("dbundle") / "bundle"
    export_bundle(load_diffusers_source(diffusers_pipeline_dir), out, fp16=True, log=None)
    return out


@pytest.fixture(scope="session")
def diffusers_cond_unet_dir(tmp_path_factory):
    """A bare class-conditional UNet2DModel folder without attention (config.json + safetensors)."""
    from _bundles import diffusers_unet

    folder = tmp_path_factory.mktemp("dcond") / "unet"
    diffusers_unet(attention=False, num_class_embeds=10, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def cond_run_dir(tmp_path_factory):
    """Our conditional UNet (null label 10), trained for a few steps."""
    from _bundles import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("run") / "cond", num_classes=10)


@pytest.fixture(scope="session")
def cond_run_bundle(cond_run_dir, tmp_path_factory):
    from deploy_diff.export import export_bundle, load_run_source

    out = tmp_path_factory.mktemp("rbundle") / "bundle"
    export_bundle(load_run_source(cond_run_dir), out, log=None)
    return out


# -- the tiny Stable Diffusion pipeline (tests/_sd.py) and its text-to-image bundle, shared by the export, runtime
# and CLI tests of issue 14 (the export takes ~35 s on 2 shared cores: once per session) --------------------------
@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """The tiny random StableDiffusionPipeline folder (PNDM, seed 0, 8x8 latents, 16x16 images)."""
    from _sd import make_tiny_sd_folder

    return make_tiny_sd_folder(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="session")
def sd_bundle(sd_folder, tmp_path_factory):
    """``sd_folder`` exported through the CLI (``deploy-diff export --from-diffusers DIR --out B --fp16``)."""
    from deploy_diff.cli import main

    out = tmp_path_factory.mktemp("sdbundle") / "bundle"
    if main(["export", "--from-diffusers", str(sd_folder), "--out", str(out), "--fp16"]) != 0:
        raise RuntimeError("exporting the tiny Stable Diffusion pipeline failed (see the captured stderr)")
    return out
