"""ether_kernels: fused multimodal-learning ops for PyTorch.

Every op has a pure-PyTorch reference, a C++ CPU kernel and GPU kernels (Triton, CUDA C++
where it pays); the backend is chosen by device and can be forced (see use_backend).
"""

from importlib import metadata as _metadata

import torch

from . import _extension  # loads ether_kernels._C (or warns once and carries on)
from . import amss  # AMSS / AMSS+: ek.amss.update_ratios, SubnetworkMasker, mask_gradients
from .alignment import (GradientReversal, batch_all_triplet_loss, batch_hard_triplet_loss,
                        cca_loss, contrastive_loss, cross_modal_triplet_loss, grad_reverse,
                        pairwise_distances, triplet_loss)
from ._dispatch import BACKENDS, BackendUnavailableError, available_backends, use_backend
from ._triton_support import triton_import_error, triton_interpret, triton_version
from .dynamic_time_warping import (SoftDTWLoss, cdist_dtw, dtw, dtw_from_cost, dtw_path, soft_dtw,
                  soft_dtw_alignment, soft_dtw_divergence, soft_dtw_from_cost)
from .ether_loss import ModalityGroups, ether_loss
from .modules import EtherLoss, FusedMSELoss
from .mse_loss import fused_mse_loss
from .multimodal_loss import MultiModalLoss

try:
    __version__ = _metadata.version("ether_kernels")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


def info():
    """What loaded and how the kernels run: backends, SIMD level, threads, versions."""
    build = _extension.build_info
    return {
        "version": __version__,
        "cpp": _extension.cpp_available,
        "cpp_error": _extension.load_error,
        "cuda": _extension.cuda_built and torch.cuda.is_available(),
        "cuda_built": _extension.cuda_built,
        "triton": triton_import_error is None,
        "triton_error": triton_import_error,
        "triton_interpret": triton_interpret,
        "simd": build.get("simd"),
        "simd_compiled": list(build.get("simd_compiled", ())),
        "openmp": build.get("openmp"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_built_with": build.get("torch_built_with"),
        "torch_cuda": torch.version.cuda,
        "triton_version": triton_version,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": {"cpu": available_backends("cpu"),
                     "cuda": available_backends("cuda") if torch.cuda.is_available() else []},
    }


__all__ = [
    "BACKENDS", "BackendUnavailableError", "EtherLoss", "FusedMSELoss", "GradientReversal",
    "ModalityGroups", "MultiModalLoss", "batch_all_triplet_loss", "batch_hard_triplet_loss",
    "cca_loss", "contrastive_loss", "cross_modal_triplet_loss", "grad_reverse",
    "pairwise_distances", "triplet_loss",
    "SoftDTWLoss", "__version__", "available_backends", "cdist_dtw", "dtw", "dtw_from_cost",
    "dtw_path", "ether_loss", "fused_mse_loss", "info", "soft_dtw", "soft_dtw_alignment",
    "soft_dtw_divergence", "soft_dtw_from_cost", "use_backend",
]
