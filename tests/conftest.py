"""Shared test setup: deterministic seeds, one intra-op thread, and GPU-marked tests skipped (with a reason shown) without CUDA."""

import os

import pytest
import torch

# Set to 1 to run the gpu-marked tests on the CPU: checks the tests' own logic where no GPU is at hand.
GPU_TESTS_ON_CPU = os.environ.get("DSV2_GPU_TESTS_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or GPU_TESTS_ON_CPU:
        return
    skip = pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False (benchmarks/gpu_check.sh runs "
                                   "these on a CUDA machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tests run tiny models: a second intra-op thread gains nothing, and OpenMP threads spin and collapse when the
    cores are shared. Tests that measure or need threads set them inside the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
