"""deploy-diff: train a diffusion UNet in PyTorch, export it, sample it without torch.

Importing this package imports nothing heavy; each room (``runtime``, ``train``, ``export``) is
imported on its own.
"""

__version__ = "0.1.0"
