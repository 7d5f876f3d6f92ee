"""What every op shares: the floating dtypes the kernels take, and the argument check that names the argument.

(The backend table and the dispatcher are :mod:`fastpeft.backends`.)"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t: object, *, dims: int | None = None) -> torch.Tensor:
    """``t`` itself when it is a float16/bfloat16/float32 tensor (of ``dims`` dimensions when given); else a
    TypeError or ValueError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t
