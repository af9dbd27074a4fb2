"""AMSS / AMSS+: rebalance multimodal training by updating an importance-sampled subnetwork.

Yang et al., "Learning to Rebalance Multi-Modal Optimization by Adaptively Masking
Subnetworks" (TPAMI 2025). Semantics, and where the public code and the stated method differ:
specs/amss.md; the readable version is reference/amss.py.

    ratios = ek.amss.update_ratios(logits, labels, features)   # (M,), one per modality
    loss.backward()
    masker.step(ratios)          # masks every .grad of every modality's parameters in place
    optimizer.step()

Backends: on CPU tensors the fused C++ op (csrc/cpu/amss.cpp: one pass over all gradients for
the unit importances, the selection on the small per-unit arrays, one pass that rewrites only
the units that change); on CUDA tensors the fused Triton kernels (triton/amss.py: the same
three stages, one launch each per dtype whatever the number of tensors, no host read);
otherwise (unit_dim != 0, non-contiguous gradients, no Triton) the reference, a per-tensor
loop like the public code. `masked_sgd_step` is the fused SGD step of the idealised rule
(only the sampled units move). `step` reads the ratios on the host to validate them (one
synchronisation when they are a CUDA tensor; pass a list of floats to avoid it).
"""

import collections.abc
import numbers

import torch

from . import _dispatch, _extension
from ._checks import (check_choice, check_class_labels, check_finite_real, check_int,
                      check_non_negative_real)
from ._triton_support import triton_import_error
from .reference.amss import (MODES, SCALINGS, mask_gradients_reference,
                             masked_sgd_step_reference, update_ratios_reference)


def update_ratios(logits, labels, features, *, temperature=0.2, offset=0.5, bias=0.0,
                  clip=(0.1, 0.9)):
    """Update ratios rho (M,) from M modalities' unimodal logits (B, K) and features (B, F).

    rho = clip(1 - softmax(r / temperature) + bias), r_m = (H(Y) - CE_m + offset) / Hz_m; the
    dominant modality gets the smaller ratio. Every ratio is 0.5 when some H(Y) - CE_m +
    offset <= 0 or anything is NaN. No gradient flows through it; no host synchronisation.
    """
    op = "update_ratios"
    logits, features = list(logits), list(features)
    if not logits:
        raise ValueError(f"{op}: logits must hold one (B, K) tensor per modality, got none")
    if len(features) != len(logits):
        raise ValueError(f"{op}: got {len(logits)} logits but {len(features)} features; one "
                         "of each per modality")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise TypeError(f"{op}: labels must be a (B,) integer tensor")
    B = labels.shape[0]
    for m, (out, z) in enumerate(zip(logits, features)):
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != B:
            raise ValueError(f"{op}: logits[{m}] must be a (B, K) = ({B}, K) tensor, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)}")
        if out.shape[1] != logits[0].shape[1]:
            raise ValueError(f"{op}: logits[{m}] has {out.shape[1]} classes, logits[0] has "
                             f"{logits[0].shape[1]}")
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != B:
            raise ValueError(f"{op}: features[{m}] must be a (B, F) = ({B}, F) tensor, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z)}")
    # (on a GPU a device assert: no host synchronisation)
    check_class_labels(labels, logits[0].shape[1], "labels", op)
    # Python numbers, not tensors: hyper-parameters, and no host read in the fast path.
    for name, value in (("temperature", temperature), ("offset", offset), ("bias", bias)):
        check_finite_real(value, name, op)
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if not (isinstance(clip, (tuple, list)) and len(clip) == 2):
        raise ValueError(f"{op}: clip must be a pair (low, high), got {clip!r}")
    for value in clip:
        check_finite_real(value, "clip", op)
    if not 0.0 <= clip[0] <= clip[1] <= 1.0:
        raise ValueError(f"{op}: clip must be (low, high) with 0 <= low <= high <= 1, got {clip}")
    with torch.no_grad():
        return update_ratios_reference([o.detach() for o in logits], labels,
                                       [z.detach() for z in features], temperature, offset, bias,
                                       clip)


_OP = "amss"
_MODE_CODES = {"amss": 0, "amss+": 1, "uniform": 2, "topk": 3}
_SCALING_CODES = {"paper": 0, "reference-code": 1}
_CPU_BACKENDS = ()
if _extension.cpp_available and hasattr(torch.ops.ether_kernels, "amss_mask_gradients"):
    _CPU_BACKENDS = ("cpp",)

    @torch.library.register_fake("ether_kernels::amss_mask_gradients")
    def _mask_fake(grads, group_of_tensor, ratios, sampling, scaling, seed, step, unit_size):
        return None

    @torch.library.register_fake("ether_kernels::amss_masked_sgd_step")
    def _sgd_fake(params, grads, buffers, fresh, group_of_tensor, ratios, sampling, scaling,
                  seed, step, unit_size, lr, momentum, dampening, weight_decay, nesterov):
        return None


_GPU_BACKENDS = ()
if triton_import_error is None:
    from .triton import amss as _triton_amss

    _GPU_BACKENDS = ("triton",)


def _backend_for(tensors, unit_dim, op):
    """The backend that runs a fused step on `tensors`: the fused kernels need contiguous
    tensors of one device, units along dim 0 (and for Triton fp16 / bf16 / fp32 / fp64);
    otherwise the reference (or an error when a fused backend was forced)."""
    device = tensors[0].device
    backend = _dispatch.select(_OP, device, cpu_backends=_CPU_BACKENDS,
                               gpu_backends=_GPU_BACKENDS)
    if backend == "reference":
        return backend
    triton = backend == "triton"
    # one pass over the tensors (this runs every step)
    if all(t.is_contiguous() and t.device == device
           and (not triton or t.dtype in _triton_amss.SUPPORTED_DTYPES)
           and (unit_dim == 0 or unit_dim == -t.dim()) for t in tensors):
        return backend
    if _dispatch.forced_backend() == backend:
        raise _dispatch.BackendUnavailableError(
            f"{op}: backend {backend!r} was forced, but it needs contiguous tensors on one "
            "device with unit_dim=0" + (" (fp16, bf16, fp32 or fp64)" if backend == "triton"
                                        else ""))
    return "reference"


def _current_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode()


_PLAIN_TENSORS = {torch.Tensor, torch.nn.Parameter}


def _triton_step(op, function, mutated):
    """The Triton op, or in eager mode the function behind it without the op's argument
    checks (the public functions have checked a superset): the custom op's Python dispatch
    layers took most of a step's host time on an H100 (0.2 ms of kernels in a 0.7 ms step,
    40 tensors). Called directly, the mutated tensors' version counters are bumped as the
    op would bump them."""
    if _tracing(mutated):  # torch.compile, make_fx / fake tensors, tensor subclasses: the op
        return op

    def run_eagerly(*args):
        function(*args)
        _bump_versions(mutated)
    return run_eagerly


def _bump_versions(tensors):
    """Bumps the version counter of every tensor, one at a time (torch before 2.5 takes one
    tensor per call); inference tensors have no counter and are skipped."""
    for tensor in tensors:
        if not tensor.is_inference():
            torch.autograd.graph.increment_version(tensor)


def _tracing(tensors):
    return (torch.compiler.is_compiling() or _current_dispatch_mode() is not None
            or not set(map(type, tensors)) <= _PLAIN_TENSORS)


def _cpp_step(op, mutated):
    """The C++ op, then, in eager mode, the mutated tensors' version counters bumped: an op
    declared in C++ with mutable arguments gets no ADInplaceOrView kernel, so autograd would
    not see the change, and a backward through a tensor it saved before the step (a
    parameter the step moved) would silently read the new values instead of raising."""
    def run(*args):
        op(*args)
        if not _tracing(mutated):
            _bump_versions(mutated)
    return run


def _run_mask(groups, ratios, mode, scaling, seed, step, unit_dim, unit_size):
    """Masks the gradients of `groups` (lists of tensors) in place on the chosen backend."""
    flat = [g for group in groups for g in group]
    if not flat:
        return
    backend = _backend_for(flat, unit_dim, "mask_gradients")
    with torch.no_grad():
        if backend in ("cpp", "triton"):
            owner = [m for m, group in enumerate(groups) for _ in group]
            op = (_cpp_step(torch.ops.ether_kernels.amss_mask_gradients, mutated=flat)
                  if backend == "cpp" else
                  _triton_step(torch.ops.ether_kernels.amss_mask_gradients_triton,
                               _triton_amss.mask_gradients_unchecked, mutated=flat))
            op(flat, owner, [float(r) for r in ratios], _MODE_CODES[mode],
               _SCALING_CODES[scaling], _as_int64(seed), _as_int64(step), int(unit_size))
        else:
            mask_gradients_reference(groups, ratios, mode, scaling, int(seed), int(step),
                                     unit_dim, unit_size)


def _as_int64(value):
    """The 64 bits of a non-negative seed or step as a signed int64 (the C++ op's type); the
    generator uses the same bits either way."""
    value = int(value) % 2**64
    return value - 2**64 if value >= 2**63 else value


def _check_ratios(ratios, groups, op):
    """The M ratios as floats: a tensor of M values, or a sequence of M numbers (0-d tensors
    too)."""
    if isinstance(ratios, torch.Tensor):
        if ratios.is_complex() or ratios.dtype == torch.bool:
            raise TypeError(f"{op}: ratios must be a real tensor of {groups} values, got "
                            f"{ratios.dtype}")
        values = ratios.detach().flatten().tolist()
    elif isinstance(ratios, (str, bytes)) or not isinstance(ratios, collections.abc.Iterable):
        raise TypeError(f"{op}: ratios must be {groups} numbers in [0, 1] (a sequence or a "
                        f"tensor), got {type(ratios).__name__}")
    else:
        values = [r.item() if isinstance(r, torch.Tensor) and r.numel() == 1 else r
                  for r in ratios]
    if len(values) != groups:
        raise ValueError(f"{op}: got {len(values)} ratios for {groups} modalities")
    for m, r in enumerate(values):
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise TypeError(f"{op}: ratios[{m}] must be a number in [0, 1], got "
                            f"{type(r).__name__}")
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{op}: ratios[{m}] = {r} is outside [0, 1]")
    return [float(r) for r in values]


def _as_groups(groups, what, op):
    """Lists of tensors, one per modality, from an iterable of iterables (or a dict name ->
    iterable, in its order), each read once; a bare tensor is refused (iterating it would
    give its rows)."""
    if isinstance(groups, collections.abc.Mapping):
        groups = groups.values()
    if isinstance(groups, torch.Tensor):
        raise TypeError(f"{op}: {what} must hold one iterable of tensors per modality, got a "
                        "tensor (wrap it in a list: [[tensor]])")
    out = []
    for m, group in enumerate(groups):
        if isinstance(group, torch.Tensor):
            raise TypeError(f"{op}: {what}[{m}] must be an iterable of tensors, got a tensor "
                            f"(wrap it in a list: [tensor])")
        out.append(list(group))
    return out


def _check_distinct(tensors, what, op):
    """The same tensor twice (one parameter in two modalities, or twice in one) would be
    masked twice, or stepped twice, and the backends would disagree on it: refused. (Items
    that are not tensors are left to the type checks.)"""
    if len(set(map(id, tensors))) == len(tensors):
        return
    seen = {}
    for index, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            continue
        if id(t) in seen:
            raise ValueError(f"{op}: {what} holds the same tensor twice (items {seen[id(t)]} "
                             f"and {index} of the flattened groups); each may appear once")
        seen[id(t)] = index


def _check_dense(tensor, name, op):
    if tensor.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout "
                        f"{tensor.layout}")


def _scaling(mode, scaling, op):
    check_choice(mode, "mode", MODES, op)
    if mode != "amss+":
        if scaling is not None:
            raise ValueError(f"{op}: scaling applies to mode 'amss+' only, got scaling="
                             f"{scaling!r} with mode={mode!r}")
        return "paper"
    scaling = "paper" if scaling is None else scaling
    check_choice(scaling, "scaling", SCALINGS, op)
    return scaling


def _units_fit(tensor, unit_dim, unit_size):
    """Whether tensor has a dimension unit_dim whose size unit_size divides (the quick test
    of the checks that run every step; _check_units then says what is wrong)."""
    dims = tensor.dim()
    return -dims <= unit_dim < dims and tensor.shape[unit_dim] % unit_size == 0


def _check_units(tensor, unit_dim, unit_size, name, op):
    if tensor.dim() == 0 or not (-tensor.dim() <= unit_dim < tensor.dim()):
        raise ValueError(f"{op}: unit_dim {unit_dim} is out of range for {name} of shape "
                         f"{tuple(tensor.shape)}")
    if tensor.shape[unit_dim] % unit_size != 0:
        raise ValueError(f"{op}: {name} has {tensor.shape[unit_dim]} slices along unit_dim "
                         f"{unit_dim}, not a multiple of unit_size {unit_size}")


def mask_gradients(grads_per_group, ratios, *, mode="amss", scaling=None, seed=0, step=0,
                   unit_dim=0, unit_size=1):
    """Masks gradient tensors in place: the functional form of SubnetworkMasker.step.

    grads_per_group: one sequence of gradient tensors per modality; ratios: M values in
    [0, 1]. Each tensor keeps ceil(rho_m * units) units (slices of unit_size along unit_dim)
    chosen by `mode`; (seed, step) fix the random choice.
    """
    op = "mask_gradients"
    scaling = _scaling(mode, scaling, op)
    seed, step = check_int(seed, "seed", op), check_int(step, "step", op, minimum=0)
    groups = _as_groups(grads_per_group, "grads_per_group", op)
    ratios = _check_ratios(ratios, len(groups), op)
    unit_size = check_int(unit_size, "unit_size", op, minimum=1)
    unit_dim = check_int(unit_dim, "unit_dim", op)
    _check_distinct([g for group in groups for g in group], "grads_per_group", op)
    # every step: one quick pass, and the loop that names the culprit only when it fails
    if not all(isinstance(grad, torch.Tensor) and grad.is_floating_point()
               and grad.layout == torch.strided and _units_fit(grad, unit_dim, unit_size)
               for group in groups for grad in group):
        for m, group in enumerate(groups):
            for t, grad in enumerate(group):
                if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
                    raise TypeError(f"{op}: grads_per_group[{m}][{t}] must be a floating-point "
                                    "tensor")
                _check_dense(grad, f"grads_per_group[{m}][{t}]", op)
                _check_units(grad, unit_dim, unit_size, f"grads_per_group[{m}][{t}]", op)
    _run_mask(groups, ratios, mode, scaling, seed, step, unit_dim, unit_size)


def _buffer_fits(buf, p):
    """A momentum buffer (None: not created yet) that the fused step can use for p."""
    return buf is None or (isinstance(buf, torch.Tensor) and buf.shape == p.shape
                           and buf.dtype == p.dtype and buf.device == p.device
                           and buf.is_contiguous())


def masked_sgd_step(params_per_group, ratios, *, lr, momentum=0.0, dampening=0.0,
                    weight_decay=0.0, nesterov=False, momentum_buffers=None, mode="amss",
                    scaling=None, seed=0, step=0, unit_size=1):
    """One SGD step (torch.optim.SGD's rule) that moves only the sampled units.

    The idealised AMSS update: each modality's tensors keep ceil(rho_m * units) units (chosen
    by `mode` from the gradients, as mask_gradients would), and only those units' parameters
    and momentum buffers change; the gradients are left as they are. Units are dim-0 slices
    of unit_size rows. momentum_buffers: the previous call's return value (None at first).
    As in torch.optim.SGD, a tensor's buffer is created on the first call (buf = g on the
    units kept then, 0 on the others); afterwards buf = momentum buf + (1 - dampening) g on
    kept units.
    Returns the momentum buffers (lists like params_per_group; None without momentum).
    """
    op = "masked_sgd_step"
    scaling = _scaling(mode, scaling, op)
    seed, step = check_int(seed, "seed", op), check_int(step, "step", op, minimum=0)
    groups = _as_groups(params_per_group, "params_per_group", op)
    ratios = _check_ratios(ratios, len(groups), op)
    _check_distinct([p for group in groups for p in group], "params_per_group", op)
    if not all(isinstance(p, torch.Tensor) for group in groups for p in group):
        for m, group in enumerate(groups):
            for t, p in enumerate(group):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"{op}: params_per_group[{m}][{t}] must be a tensor (a "
                                    f"parameter), got {type(p).__name__}")
    for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                        ("weight_decay", weight_decay)):
        check_non_negative_real(value, name, op)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{op}: nesterov needs momentum > 0 and dampening = 0")
    unit_size = check_int(unit_size, "unit_size", op, minimum=1)
    # the checks that run every step: one quick pass, and the loop that names the culprit only
    # when it fails
    grads = [[p.grad for p in group] for group in groups]
    if not all(grad is not None and _units_fit(p, 0, unit_size) and grad.dtype == p.dtype
               and grad.shape == p.shape and grad.layout == torch.strided
               for group, group_grads in zip(groups, grads)
               for p, grad in zip(group, group_grads)):
        for m, group in enumerate(groups):
            for t, p in enumerate(group):
                if p.grad is None:
                    raise RuntimeError(f"{op}: params_per_group[{m}][{t}] has no .grad")
                _check_dense(p.grad, f"params_per_group[{m}][{t}].grad", op)
                _check_units(p, 0, unit_size, f"params_per_group[{m}][{t}]", op)
                if p.grad.dtype != p.dtype or p.grad.shape != p.shape:
                    raise ValueError(f"{op}: params_per_group[{m}][{t}].grad must match the "
                                     f"parameter's dtype and shape")
    if momentum_buffers is None:
        momentum_buffers = [[None] * len(group) for group in groups]
    else:  # read once (any iterables), into new lists: the caller's containers stay as given
        momentum_buffers = _as_groups(momentum_buffers, "momentum_buffers", op)
    if [len(b) for b in momentum_buffers] != [len(g) for g in groups]:
        raise ValueError(f"{op}: momentum_buffers must match params_per_group")
    if not all(_buffer_fits(buf, p) for group_buffers, group in zip(momentum_buffers, groups)
               for buf, p in zip(group_buffers, group)):
        for m, (group_buffers, group) in enumerate(zip(momentum_buffers, groups)):
            for t, (buf, p) in enumerate(zip(group_buffers, group)):
                if not _buffer_fits(buf, p):
                    raise ValueError(f"{op}: momentum_buffers[{m}][{t}] must be a contiguous "
                                     "tensor with the parameter's shape, dtype and device")
    flat = [p for group in groups for p in group]
    if not flat:
        raise ValueError(f"{op}: params_per_group holds no parameters")
    flat_grads = [grad for group_grads in grads for grad in group_grads]
    backend = _backend_for(flat + flat_grads, 0, op)
    with torch.no_grad():
        if backend in ("cpp", "triton"):
            fresh, buffers = [], []
            if momentum != 0:
                fresh = [int(buf is None) for group_buffers in momentum_buffers
                         for buf in group_buffers]
                if any(fresh):  # as torch.optim.SGD, a buffer is created on first use
                    for group_buffers, group in zip(momentum_buffers, groups):
                        for t, p in enumerate(group):
                            if group_buffers[t] is None:
                                group_buffers[t] = torch.zeros_like(
                                    p, memory_format=torch.contiguous_format)
                buffers = [buf for group_buffers in momentum_buffers for buf in group_buffers]
            owner = [m for m, group in enumerate(groups) for _ in group]
            step_op = (_cpp_step(torch.ops.ether_kernels.amss_masked_sgd_step,
                                 mutated=flat + buffers) if backend == "cpp" else
                       _triton_step(torch.ops.ether_kernels.amss_masked_sgd_step_triton,
                                    _triton_amss.masked_sgd_step_unchecked,
                                    mutated=flat + buffers))
            step_op(
                flat, flat_grads, buffers, fresh, owner, [float(r) for r in ratios],
                _MODE_CODES[mode], _SCALING_CODES[scaling], _as_int64(seed), _as_int64(step),
                int(unit_size), float(lr), float(momentum), float(dampening),
                float(weight_decay), bool(nesterov))
            return momentum_buffers if momentum != 0 else None
        buffers = masked_sgd_step_reference(groups, grads, momentum_buffers, ratios, lr,
                                            momentum, dampening, weight_decay, nesterov, mode,
                                            scaling, int(seed), int(step), unit_size)
        return buffers if momentum != 0 else None


class SubnetworkMasker:
    """Masks the gradients of each modality's parameters to an importance-sampled subnetwork.

    groups: one iterable of parameters per modality (or a dict name -> parameters). Modes
    "amss" (units sampled proportionally to their importance), "amss+" (rescaled to be
    unbiased: scaling "paper", the default, or "reference-code"), "uniform", "topk".
    Call step(ratios) between backward() and optimizer.step().
    """

    def __init__(self, groups, *, mode="amss", scaling=None, unit_dim=0, unit_size=1, seed=0):
        op = "SubnetworkMasker"
        self.scaling = _scaling(mode, scaling, op)
        self.mode = mode
        names = None
        if isinstance(groups, collections.abc.Mapping):
            names = [str(k) for k in groups]
            groups = list(groups.values())
        self.groups = _as_groups(groups, "groups", op)
        self.names = names or [str(m) for m in range(len(self.groups))]
        if not self.groups:
            raise ValueError(f"{op}: groups must hold one iterable of parameters per modality")
        unit_size = check_int(unit_size, "unit_size", op, minimum=1)
        unit_dim = check_int(unit_dim, "unit_dim", op)
        _check_distinct([p for group in self.groups for p in group], "groups", op)
        for name, group in zip(self.names, self.groups):
            if not group:
                raise ValueError(f"{op}: modality {name!r} has no parameters")
            for t, p in enumerate(group):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"{op}: modality {name!r} item {t} is not a tensor")
                _check_units(p, unit_dim, unit_size, f"modality {name!r} parameter {t}", op)
        self.unit_dim, self.unit_size = unit_dim, unit_size
        self.seed = check_int(seed, "seed", op)
        self.step_count = 0

    def step(self, ratios):
        """Masks every .grad in place with this step's masks, then advances the step."""
        op = "SubnetworkMasker.step"
        ratios = _check_ratios(ratios, len(self.groups), op)
        grads = [[p.grad for p in group] for group in self.groups]
        if any(grad is None or grad.layout != torch.strided
               for group_grads in grads for grad in group_grads):
            for name, group in zip(self.names, self.groups):
                for t, p in enumerate(group):
                    if p.grad is None:
                        raise RuntimeError(f"{op}: modality {name!r} parameter {t} (shape "
                                           f"{tuple(p.shape)}) has no .grad; call step() "
                                           "after backward(), on parameters that received a "
                                           "gradient")
                    _check_dense(p.grad, f"modality {name!r} parameter {t}'s .grad", op)
        _run_mask(grads, ratios, self.mode, self.scaling, self.seed, self.step_count,
                  self.unit_dim, self.unit_size)
        self.step_count += 1

    def _layout(self):
        """What a state must match to reproduce this masker's masks: the units of every
        tensor of every modality."""
        return {"unit_dim": self.unit_dim, "unit_size": self.unit_size,
                "units": [[int(p.shape[self.unit_dim]) // self.unit_size for p in group]
                          for group in self.groups]}

    def state_dict(self):
        return {"step": self.step_count, "seed": self.seed, "mode": self.mode,
                "scaling": self.scaling, **self._layout()}

    def load_state_dict(self, state):
        op = "SubnetworkMasker.load_state_dict"
        missing = [key for key in ("step", "seed", "mode", "scaling") if key not in state]
        if missing:
            raise ValueError(f"{op}: the state lacks {missing}; expected a state_dict() of a "
                             "SubnetworkMasker")
        if state["mode"] != self.mode or state["scaling"] != self.scaling:
            raise ValueError(f"{op}: the state is for mode {state['mode']!r} / scaling "
                             f"{state['scaling']!r}, this masker is {self.mode!r} / "
                             f"{self.scaling!r}")
        # (states saved before the layout was recorded carry none of these keys)
        for key, value in self._layout().items():
            if key in state and state[key] != value:
                raise ValueError(f"{op}: the state's {key} ({state[key]}) differs from this "
                                 f"masker's ({value}): it was saved for other parameters, so "
                                 "its masks would not be reproduced")
        step = check_int(state["step"], "state['step']", op, minimum=0)
        seed = check_int(state["seed"], "state['seed']", op)
        self.step_count, self.seed = step, seed  # both checked first: all or nothing


__all__ = ["update_ratios", "SubnetworkMasker", "mask_gradients", "masked_sgd_step"]
