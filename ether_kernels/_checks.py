"""Argument checks shared by the public ops: every message names the argument at fault."""

import math
import numbers

import torch


def check_tensor(value, name, op_name=None):
    if not isinstance(value, torch.Tensor):
        where = f"{op_name}: " if op_name else ""
        raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(value).__name__}")


def check_loss_pair(first, second, first_name, second_name, op_name):
    """Both tensors, floating point, same dtype, shape and device."""
    check_tensor(first, first_name, op_name)
    check_tensor(second, second_name, op_name)
    for value, name in ((first, first_name), (second, second_name)):
        if not value.is_floating_point():
            raise TypeError(f"{op_name}: {name} must be a floating-point tensor "
                            f"(float32, float64, float16 or bfloat16), got {value.dtype}")
    if first.dtype != second.dtype:
        raise TypeError(f"{op_name}: {first_name} ({first.dtype}) and {second_name} "
                        f"({second.dtype}) must have the same dtype")
    if first.shape != second.shape:
        raise ValueError(f"{op_name}: {first_name} has shape {tuple(first.shape)} but "
                         f"{second_name} has shape {tuple(second.shape)}; they must match")
    if first.device != second.device:
        raise RuntimeError(f"{op_name}: {first_name} is on {first.device} but {second_name} is "
                           f"on {second.device}; they must be on the same device")


def check_choice(value, name, choices, op_name):
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{op_name}: {name} must be one of {options}, got {value!r}")


def is_finite_number(value):
    """math.isfinite for a real number, written so that torch.compile can also trace it on a
    symbolic float (a float argument that changed between calls: math.isfinite(SymFloat) is
    not traceable and breaks a fullgraph compile)."""
    return value == value and abs(value) != math.inf


def _check_real_type(value, name, op_name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op_name}: {name} must be a real number, got {type(value).__name__}")


def check_finite_real(value, name, op_name):
    """A finite real number (bool and tensors are refused); returns it as a float."""
    _check_real_type(value, name, op_name)
    if not is_finite_number(value):
        raise ValueError(f"{op_name}: {name} must be finite, got {value}")
    return float(value)


def check_non_negative_real(value, name, op_name):
    """A finite real number >= 0 (bool and tensors are refused); returns it as a float."""
    _check_real_type(value, name, op_name)
    if not is_finite_number(value) or value < 0:
        raise ValueError(f"{op_name}: {name} must be a finite number >= 0, got {value}")
    return float(value)


def check_positive_real(value, name, op_name, allow_inf=False):
    """A real number > 0, finite unless allow_inf (bool and tensors are refused); returns it
    unchanged (a symbolic float under torch.compile stays symbolic)."""
    _check_real_type(value, name, op_name)
    if not value > 0 or (not allow_inf and not is_finite_number(value)):
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{op_name}: {name} must be {kind} > 0, got {value}")
    return value


def check_class_labels(labels, num_classes, name, op_name):
    """Every label in [0, num_classes): for CPU labels a ValueError naming the first bad
    value; on a GPU, and while compiling (a host read breaks a fullgraph compile), an
    asynchronous device assert (no host synchronisation), as F.cross_entropy's."""
    if labels.numel() == 0:
        return
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = labels.min().item(), labels.max().item()
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"{op_name}: {name} must be class indices in [0, {num_classes}), "
                             f"got {bad}")
    else:
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"{op_name}: {name} must be class indices in [0, {num_classes})")


def check_bool(value, name, op_name):
    """A bool (an int, a string or None is refused: squared="no" ran as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op_name}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_int(value, name, op_name, minimum=None):
    """An int (bool refused), at least `minimum` when given; returns it as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op_name}: {name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op_name}: {name} must be an int >= {minimum}, got {value}")
    return int(value)
