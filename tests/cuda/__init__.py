"""GPU tests. `ANYQUANT_TEST_DEVICE=cpu` runs the same checks on CPU (a dry run of their logic
and budgets on a machine without a GPU; what they are for is CUDA, the default)."""

import os

import torch

DEVICE = torch.device(os.environ.get("ANYQUANT_TEST_DEVICE", "cuda"))
