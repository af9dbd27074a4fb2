"""Small helpers shared by the Triton kernels' host code."""

import torch
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def accumulator_dtype(dtype):
    """fp64 inputs accumulate in fp64; fp32, fp16 and bf16 in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_tl_dtype(dtype):
    return _TL_DTYPES[dtype]
