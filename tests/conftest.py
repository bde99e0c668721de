import os
from pathlib import Path

import pytest
import torch

# The Triton source runs under its interpreter where there is no GPU; this must be set before
# any kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"
PARITY_DIRS = ["vit_mask", "vit_linear", "deit_distilled_mask"]


@pytest.fixture(params=PARITY_DIRS)
def parity_dir(request) -> Path:
    return FIXTURES / request.param
