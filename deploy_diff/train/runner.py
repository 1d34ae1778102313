"""The torch runner: a torch UNet behind the runtime's runner interface, so the training side samples
through ``deploy_diff.runtime.sampling.sample`` like every other backend."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchRunner:
    """``runner(sample float32[B,C,H,W], timestep float32[B], class_labels int64[B] | None)
    -> float32[B,C_out,H,W]`` over a torch module (evaluated under ``torch.no_grad`` in eval mode)."""

    def __init__(
        self, model: nn.Module, device: str | torch.device | None = None, autocast_dtype: torch.dtype | None = None
    ):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray | None = None) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)).to(self.device)
            t = torch.from_numpy(np.ascontiguousarray(timestep, dtype=np.float32)).to(self.device)
            labels = (
                None
                if class_labels is None
                else torch.from_numpy(np.ascontiguousarray(class_labels, dtype=np.int64)).to(self.device)
            )
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    out = self.model(x, t, labels)
            else:
                out = self.model(x, t, labels)
            return out.float().cpu().numpy()
        finally:
            self.model.train(was_training)
