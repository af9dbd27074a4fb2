"""Small helpers shared by the Triton kernels' host code."""

import contextlib
import functools

import torch
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def accumulator_dtype(dtype):
    """fp64 inputs accumulate in fp64; fp32, fp16 and bf16 in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_tl_dtype(dtype):
    return _TL_DTYPES[dtype]


def device_of(tensor):
    """Makes the tensor's GPU the current device (Triton launches on the current one)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device):
    """How many programs a reduction grid should have: about 4 per SM (all SMs busy with
    latency hidden, few partials to fold); a small fixed number off the GPU (interpreter)."""
    if device.type != "cuda":
        return 16
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
