"""Fixtures of the reliability tests: the shared conditional run and its bundle (session fixtures of
tests/conftest.py); tests change copies only."""

import pytest


# `cond_run_dir`: our conditional UNet trained 30 steps (top level and checkpoints/step_0000030);
# `cond_run_bundle`: its bundle
@pytest.fixture
def run_dir(cond_run_dir):
    return cond_run_dir


@pytest.fixture
def bundle(cond_run_bundle):
    return cond_run_bundle
