"""Shared test setup: deterministic seeds, and the transformers oracle for parity tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
