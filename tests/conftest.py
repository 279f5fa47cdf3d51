import os
import sys

import torch

# Triton kernels run on CPU tensors only under the interpreter, and the variable must be set before
# any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
# The README's offline pipelines (examples/offline_pipeline.py) are the tests' tiny components too.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

torch.set_num_threads(min(2, torch.get_num_threads()))
