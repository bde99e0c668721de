"""segrepro's harness: config, models, data, training, inference, metrics, benchmark, CLI."""
import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter. Triton decides this when its
# own language modules are first imported (timm imports them early), so the variable must be
# set before anything imports triton, not only before the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
