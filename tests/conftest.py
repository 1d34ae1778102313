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
