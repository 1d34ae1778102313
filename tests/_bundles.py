"""Small models and bundles shared by the export, pipeline and CLI tests (built once per session)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

SMALL_UNET = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8
)
WITH_ATTENTION = dict(
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")
)
NO_ATTENTION = dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def diffusers_unet(
    attention: bool = True, num_class_embeds: int | None = None, out_scale: float = 0.2, seed: int = 0, **overrides
):
    """A random diffusers UNet2DModel. ``out_scale`` shrinks the output layer so the model behaves like a
    trained denoiser (small, smooth epsilon): a raw random UNet makes DDIM's deterministic trajectory chaotic,
    so that a 1e-7 difference between any two correct forwards (even torch vs torch with another thread count)
    grows to 1e-3 over 50 steps, and no parity bound would mean anything."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    cfg = dict(SMALL_UNET, **(WITH_ATTENTION if attention else NO_ATTENTION), num_class_embeds=num_class_embeds)
    cfg.update(overrides)
    model = UNet2DModel(**cfg).eval()
    with torch.no_grad():
        model.conv_out.weight.mul_(out_scale)
        model.conv_out.bias.mul_(out_scale)
    return model


def save_diffusers_pipeline(model, folder: Path, scheduler_kwargs: dict | None = None) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        DDPMPipeline(unet=model, scheduler=DDPMScheduler(**(scheduler_kwargs or {}))).save_pretrained(folder)
    return folder


def train_tiny_run(folder: Path, num_classes: int = 0, steps: int = 30, prediction_type: str = "epsilon") -> Path:
    from deploy_diff.train.config import TrainConfig
    from deploy_diff.train.trainer import Trainer
    from deploy_diff.train.unet import UNetConfig

    model = UNetConfig(
        sample_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        attention_resolutions=(4,),
        num_heads=2,
        num_classes=num_classes,
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=16,
        log_every=10,
        save_every=0,
        sample_every=0,
        warmup_steps=5,
        device="cpu",
        prediction_type=prediction_type,
        label_dropout=0.2 if num_classes else 0.0,
    )
    Trainer(model, cfg, folder, progress=False).train()
    return folder


IMAGE_TOL = 1e-4  # max abs on [0, 1] images: our pipeline against diffusers' for the same seed


def diffusers_images(pipeline_dir, kind, seed, n=3, steps=50, eta=0.0):
    """Images from diffusers' own DDIMPipeline (``kind="ddim"``) or DDPMPipeline on the saved pipeline folder, for
    ``generator=torch.manual_seed(seed)`` (or one generator per seed of a list): the reference of every backend."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(pipeline_dir / "unet").eval()
    sched = DDPMScheduler.from_pretrained(pipeline_dir / "scheduler")
    generator = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    if kind == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=n, num_inference_steps=steps, eta=eta, generator=generator, output_type="np").images
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=n, num_inference_steps=steps, generator=generator, output_type="np").images


def call_in_threads(fn, jobs, repeats=1):
    """``fn(job)`` for every job, each job on its own thread (``repeats`` times in a row), all threads at once;
    the last result per job, in order. An exception in any thread is raised here."""
    import threading

    results, errors = [None] * len(jobs), []

    def work(i):
        try:
            for _ in range(repeats):
                results[i] = fn(jobs[i])
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
