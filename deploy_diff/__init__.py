"""deploy-diff: train a diffusion UNet in PyTorch, export it, sample it without torch.

Importing this package imports nothing heavy: each of its three parts (``runtime``, ``train``,
``export``) is imported on its own, so an app that only samples never loads torch.
"""

__version__ = "0.1.0"
