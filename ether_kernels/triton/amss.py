"""AMSS / AMSS+ fused over every gradient of a step, in Triton (CUDA tensors; CPU tensors
under TRITON_INTERPRET=1). Semantics: reference/amss.py (the oracle), specs/amss.md.

A step is three stages, whatever the number of tensors (no per-tensor launch, no host read):
  1. importance (one launch per gradient dtype, usually one): a program per unit sums the
     unit's grad^2 in fp64 (u_j) and draws the unit's Gumbel noise from the counter-based
     generator (the same 32-bit hash chain as the reference, so the same numbers); the first
     unit of each tensor also draws the tensor's systematic-sampling start (AMSS+ "paper").
     The tensors are reached through a table of their addresses (one launch over all).
  2. selection, on the small per-unit arrays only (one launch, a program per tensor, fp64):
     q_j = (u_j + eps) / sum (u + eps), then per mode the k = ceil(rho N) units of the tensor
     by their rank in a stable sort (Gumbel-top-k, top-k; ranks counted pairwise, no sort)
     or, for AMSS+ "paper", the capped inclusion probabilities in closed form (below) and
     one systematic sample in the order of the Gumbel noise; the result is one fp64 factor
     per unit. Tensors of more than MAX_FUSED_SELECT_UNITS units (the pairwise count grows
     as N^2) take a few batched torch ops over a (tensors, max units) matrix instead.
  3. apply (one launch per dtype): a program per unit multiplies the unit by its factor.
     A factor of 1 (every kept unit in "amss", "uniform", "topk") writes nothing and a
     factor of 0 stores zeros without reading, so those modes read the gradients once (in
     stage 1) and write only the units they drop.
Stages 1 and 3 (and the SGD step) access a tensor in 16-byte vectors when its address and
unit length allow (see _vectorisable), element by element otherwise.
masked_sgd_step replaces stage 3 by the SGD update of the kept units (parameters and
momentum buffers), leaving the other units untouched.

Inclusion probabilities: pi_j = min(1, c q_j) with sum pi = k. Sorted decreasingly, the capped
units are the first r of the order, where r is the smallest r with (k - r) q_(r) <=
sum_{i >= r} q_(i) (0-based); then pi = (k - r) q / sum_{i >= r} q for the others. The
reference's loop (cap whatever exceeds 1, recompute, repeat) reaches the same r (the tests
compare the two on heavy-tailed importances).
"""

import torch
import triton
import triton.language as tl

from ..reference.amss import EPS, kept_units

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
       torch.float64: tl.float64}
SUPPORTED_DTYPES = tuple(_TL)
_VEC = {dtype: 16 // dtype.itemsize for dtype in _TL}  # elements per 16-byte vector
# Warps per program, and 16-byte vectors per thread in each iteration of a unit's loop:
# BLOCK = 32 NUM_WARPS VEC elements (fp32 512, fp16 / bf16 1024, fp64 256). On an H100
# (2026-11-27, bench/results/h100-run3/profile-amss-triton.txt, 22.3M fp32 gradients, 4
# warps) the importance pass took 43.4 / 46.6 / 51.3 us at 1 / 2 / 4 vectors a thread (512 /
# 1024 / 2048 elements), the apply pass 14.6 / 15.5 / 17.6 us; 8 warps at 2048 or 4096 and
# 16 warps at 8192 elements were slower still.
NUM_WARPS = 4
VECTORS_PER_THREAD = 1


def _block(dtype):
    """Elements per iteration of a unit's loop for gradients of `dtype`."""
    return 32 * NUM_WARPS * _VEC[dtype] * VECTORS_PER_THREAD


# ----------------------------------------------------------- counter-based generator

@triton.jit
def _mix32(x):
    """lowbias32 (reference.amss.mix32) on uint32: the multiplies wrap modulo 2^32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _word(unit, tensor_index, step_lo, step_hi, seed_lo, seed_hi, STREAM: tl.constexpr):
    """32 random bits (reference.amss._word): a hash chain over (stream, unit, tensor, step,
    seed). unit: uint32; the keys: uint32 scalars."""
    salt: tl.constexpr = (0x9E3779B9 * (STREAM + 1)) & 0xFFFFFFFF
    h = _mix32(unit + salt)
    h = _mix32(h ^ tensor_index)
    h = _mix32(h ^ step_lo)
    h = _mix32(h ^ step_hi)
    h = _mix32(h ^ seed_lo)
    return _mix32(h ^ seed_hi)


@triton.jit
def _uniform(unit, tensor_index, step_lo, step_hi, seed_lo, seed_hi, STREAM: tl.constexpr):
    """A uniform in (0, 1), fp64 (reference.amss.uniform): 52 bits from two words."""
    high = _word(unit, tensor_index, step_lo, step_hi, seed_lo, seed_hi, 2 * STREAM)
    low = _word(unit, tensor_index, step_lo, step_hi, seed_lo, seed_hi, 2 * STREAM + 1)
    bits = high.to(tl.float64) * 1048576.0 + (low >> 12).to(tl.float64)  # exact: < 2^52
    return (bits + 0.5) / 4503599627370496.0


# ----------------------------------------------------------------------- kernels

@triton.jit
def _locate(g, unit_slot_ptr, first_unit_ptr, unit_len_ptr):
    """Global unit g: its tensor (slot), its index j inside the tensor, its length."""
    slot = tl.load(unit_slot_ptr + g)
    j = g - tl.load(first_unit_ptr + slot)
    return slot, j, tl.load(unit_len_ptr + slot)


# 16-byte vector access. The tensors are reached through a table of raw addresses, so the
# compiler cannot know their alignment and emits one 2-, 4- or 8-byte access per element.
# When a tensor starts on a 16-byte boundary and its unit length is a multiple of VEC = 16 /
# element size (every unit then starts on one: j * length * size is a multiple of 16), a
# branch of the kernel (a run-time test, the same for the whole program) tells the compiler
# so, and its loads and stores become 128-bit ones (ld.global.v4.b32 for fp32, .v2.b64 for
# fp64). The other tensors (e.g. a first conv layer's units of 3 * 7 * 7 = 147) take the
# generic branch.

@triton.jit
def _vectorisable(address, length, VEC: tl.constexpr):
    """Whether the units of `length` elements of the tensor at byte `address` can be accessed
    in 16-byte vectors."""
    return (address % 16 == 0) & (length % VEC == 0)


@triton.jit
def _known_multiple(x, m: tl.constexpr):
    """x, a multiple of m at run time, written (x // m) * m: the same value, which the
    compiler's alignment analysis knows to be a multiple of m (a loaded value has no known
    divisibility). Only inside a branch where _vectorisable holds."""
    return (x // m) * m


@triton.jit
def _unit_base(address, j, length, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to unit j (of `length` elements) of the tensor at byte `address`. ALIGNED
    (only where _vectorisable holds, with length = _known_multiple(length, VEC)): the
    compiler is told that the address is a multiple of 16. The hint sits on the pointer made
    here, in the caller's aligned branch only; the analysis loses it through an integer to
    pointer conversion, hence on the pointer and not on the integer."""
    base = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    return base + j.to(tl.int64) * length


@triton.jit
def _sum_of_squares(base, length, BLOCK: tl.constexpr):
    """sum_i base[i]^2 over i < length, in fp64."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for offset in range(0, length, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        x = tl.load(base + idx, mask=idx < length, other=0.0).to(tl.float64)
        acc += x * x
    return tl.sum(acc, axis=0)


# do_not_specialize: Triton would turn an int argument equal to 1 into a compile-time
# constant (no .to()) and compile again for each step; the step and seed words vary.
@triton.jit(do_not_specialize=["step_lo", "step_hi", "seed_lo", "seed_hi"])
def _importance_kernel(units_ptr, unit_slot_ptr, addr_ptr, unit_len_ptr, first_unit_ptr,
                       num_units_ptr, tensor_index_ptr, u_ptr, gumbel_ptr, start_ptr,
                       step_lo, step_hi, seed_lo, seed_hi,
                       DTYPE: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    # One unit: u = sum of grad^2 (fp64), its Gumbel noise; the tensor's start if first.
    g = tl.load(units_ptr + tl.program_id(0))          # global unit index
    slot, j, length = _locate(g, unit_slot_ptr, first_unit_ptr, unit_len_ptr)
    address = tl.load(addr_ptr + slot)
    if _vectorisable(address, length, VEC):  # the same sum, in 16-byte loads
        n = _known_multiple(length, VEC)
        u = _sum_of_squares(_unit_base(address, j, n, DTYPE, True), n, BLOCK)
    else:
        u = _sum_of_squares(_unit_base(address, j, length, DTYPE, False), length, BLOCK)
    tl.store(u_ptr + g, u)
    tensor_index = tl.load(tensor_index_ptr + slot).to(tl.uint32)
    u0 = _uniform(j.to(tl.uint32), tensor_index, step_lo.to(tl.uint32), step_hi.to(tl.uint32),
                  seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), 0)
    tl.store(gumbel_ptr + g, -tl.log(-tl.log(u0)))
    # The systematic sample's start: uniform stream 1 at unit index N (reference.amss).
    n = tl.load(num_units_ptr + slot)
    start = _uniform(n.to(tl.uint32), tensor_index, step_lo.to(tl.uint32),
                     step_hi.to(tl.uint32), seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), 1)
    tl.store(start_ptr + slot, start, mask=j == 0)


@triton.jit
def _scale(base, length, f, BLOCK: tl.constexpr):
    """base[i] *= f for i < length (f != 1; fp64 product rounded once, as the reference).
    f = 0 stores zeros without reading the unit: the exact zeros of a left-out unit whatever
    it held (NaN, inf), and half the traffic of a load and a store."""
    if f == 0.0:
        for offset in range(0, length, BLOCK):
            idx = offset + tl.arange(0, BLOCK)
            tl.store(base + idx, tl.zeros((BLOCK,), dtype=base.dtype.element_ty),
                     mask=idx < length)
    else:
        for offset in range(0, length, BLOCK):
            idx = offset + tl.arange(0, BLOCK)
            mask = idx < length
            x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float64)
            tl.store(base + idx, _narrow(x * f, base.dtype.element_ty), mask=mask)


@triton.jit
def _narrow(x, dtype: tl.constexpr):
    """fp64 x in dtype, rounded as the reference and the C++ kernel round it: fp16 / bf16
    through fp32 (as ATen converts a double), so every backend stores the same bits. (The
    Triton interpreter's direct fp64 -> bf16 conversion is also wrong: denormal garbage.)"""
    if dtype == tl.float64:
        return x
    return x.to(tl.float32).to(dtype)


@triton.jit
def _apply_kernel(units_ptr, unit_slot_ptr, addr_ptr, unit_len_ptr, first_unit_ptr,
                  factor_ptr, DTYPE: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    # grad_unit *= factor; 0 gives exact zeros (NaN / inf included); 1 writes nothing.
    g = tl.load(units_ptr + tl.program_id(0))
    f = tl.load(factor_ptr + g)
    if f != 1.0:
        slot, j, length = _locate(g, unit_slot_ptr, first_unit_ptr, unit_len_ptr)
        address = tl.load(addr_ptr + slot)
        if _vectorisable(address, length, VEC):  # the same, in 16-byte accesses
            n = _known_multiple(length, VEC)
            _scale(_unit_base(address, j, n, DTYPE, True), n, f, BLOCK)
        else:
            _scale(_unit_base(address, j, length, DTYPE, False), length, f, BLOCK)


@triton.jit
def _sgd_unit(p_base, g_base, b_base, length, f, fresh, lr, momentum, dampening,
              weight_decay, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
              BLOCK: tl.constexpr):
    """The SGD update of one unit (see _sgd_kernel) through its three pointers."""
    dtype = p_base.dtype.element_ty
    for offset in range(0, length, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        mask = idx < length
        p = tl.load(p_base + idx, mask=mask, other=0.0).to(tl.float64)
        grad = tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float64)
        d = grad * f + weight_decay * p
        if MOMENTUM:
            buf = tl.load(b_base + idx, mask=mask, other=0.0).to(tl.float64)
            new_buf = tl.where(fresh != 0, d, momentum * buf + (1.0 - dampening) * d)
            tl.store(b_base + idx, _narrow(new_buf, dtype), mask=mask)
            if NESTEROV:
                d = d + momentum * new_buf
            else:
                d = new_buf
        tl.store(p_base + idx, _narrow(p - lr * d, dtype), mask=mask)


@triton.jit
def _sgd_kernel(units_ptr, unit_slot_ptr, param_addr_ptr, grad_addr_ptr, buf_addr_ptr,
                fresh_ptr, unit_len_ptr, first_unit_ptr, factor_ptr, hyper_ptr,
                DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                VEC: tl.constexpr, BLOCK: tl.constexpr):
    # torch.optim.SGD's rule on a kept unit (factor f != 0), in fp64, rounded once, launched
    # without multiply-add contraction: each product and sum rounded as the reference's
    # separate torch ops round them (an fma would change the last bit of fp64 parameters).
    #   g = f grad + wd p; buf = g (fresh buffer) or momentum buf + (1 - dampening) g;
    #   p -= lr (g + momentum buf if nesterov else buf)   (buf = g without momentum).
    # hyper: lr, momentum, dampening, weight_decay in fp64 (a Python float argument would
    # arrive as fp32). Without momentum the buffer table repeats the parameters' addresses.
    lr = tl.load(hyper_ptr)
    momentum = tl.load(hyper_ptr + 1)
    dampening = tl.load(hyper_ptr + 2)
    weight_decay = tl.load(hyper_ptr + 3)
    g_unit = tl.load(units_ptr + tl.program_id(0))
    f = tl.load(factor_ptr + g_unit)
    if f != 0.0:
        slot, j, length = _locate(g_unit, unit_slot_ptr, first_unit_ptr, unit_len_ptr)
        fresh = tl.load(fresh_ptr + slot)
        p_address = tl.load(param_addr_ptr + slot)
        g_address = tl.load(grad_addr_ptr + slot)
        b_address = tl.load(buf_addr_ptr + slot)
        if (_vectorisable(p_address, length, VEC) & _vectorisable(g_address, length, VEC)
                & _vectorisable(b_address, length, VEC)):
            n = _known_multiple(length, VEC)  # the same update, in 16-byte accesses
            _sgd_unit(_unit_base(p_address, j, n, DTYPE, True),
                      _unit_base(g_address, j, n, DTYPE, True),
                      _unit_base(b_address, j, n, DTYPE, True), n, f, fresh,
                      lr, momentum, dampening, weight_decay, MOMENTUM, NESTEROV, BLOCK)
        else:
            _sgd_unit(_unit_base(p_address, j, length, DTYPE, False),
                      _unit_base(g_address, j, length, DTYPE, False),
                      _unit_base(b_address, j, length, DTYPE, False), length, f, fresh,
                      lr, momentum, dampening, weight_decay, MOMENTUM, NESTEROV, BLOCK)


EPS_IN_KERNEL = tl.constexpr(EPS)  # globals a compiled kernel reads are constexprs
NAN_TOO = tl.constexpr(tl.PropagateNan.ALL)  # tl.minimum / maximum default to dropping NaN


# Stage 2. A unit's place in a stable sort of its tensor's units is its rank: the number of
# units that precede it. A program takes JB units of one tensor and counts, IB units at a
# time, how many of all the tensor's units precede each (a (JB, IB) tile, summed along its
# rows): n^2 comparisons per tensor, spread over the tensor's n / JB programs, and no sort
# or permutation. Every program of a tensor computes the same sums in the same order, so
# they agree bit for bit on shared quantities (the tensor's sum of importances).

@triton.jit
def _tensor_total(u_ptr, first, n, IB: tl.constexpr):
    """sum over the tensor's units of (u + eps), in a fixed order."""
    acc = tl.zeros((IB,), dtype=tl.float64)
    for i0 in range(0, n, IB):
        i = i0 + tl.arange(0, IB)
        acc += tl.where(i < n, tl.load(u_ptr + first + i, mask=i < n, other=0.0)
                        + EPS_IN_KERNEL, 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _unit_keys(u_ptr, noise_ptr, first, idx, n, total, KEY: tl.constexpr):
    """q and the ranking key of units idx of one tensor (-inf past its n units). KEY: 0
    Gumbel-top-k log q + noise, 2 the noise alone (uniform), 3 q (topk; AMSS+'s capping)."""
    valid = idx < n
    u = tl.load(u_ptr + first + idx, mask=valid, other=0.0)
    q = (u + EPS_IN_KERNEL) / total
    if KEY == 3:
        key = q
    else:
        noise = tl.load(noise_ptr + first + idx, mask=valid, other=0.0)
        if KEY == 2:
            key = noise
        else:
            key = tl.log(q) + noise
    key = tl.where(key != key, float("inf"), key)  # NaN (a NaN gradient) first, as torch.sort
    return tl.where(valid, key, -float("inf")), q


@triton.jit
def _preceded_by(key_j, j, key_i, i, n):
    """(JB, IB): unit i (one of the tensor's n) comes before unit j in the decreasing order
    of the key, ties to the lower index (a stable descending sort)."""
    return ((key_i[None, :] > key_j[:, None])
            | ((key_i[None, :] == key_j[:, None]) & (i[None, :] < j[:, None]))) \
        & (i < n)[None, :]


@triton.jit
def _rank_kernel(u_ptr, noise_ptr, k_ptr, first_unit_ptr, num_units_ptr, factor_ptr,
                 rank_ptr, tail_ptr, MODE: tl.constexpr, KEY: tl.constexpr,
                 PAPER: tl.constexpr, JB: tl.constexpr, IB: tl.constexpr):
    # Units j0 .. j0 + JB of tensor s: their rank by KEY. Not PAPER: the factor (kept: rank <
    # k). PAPER (key q): the rank and the sum of q from the unit's rank on, for _pi_kernel.
    s = tl.program_id(0)
    n = tl.load(num_units_ptr + s)
    j0 = tl.program_id(1) * JB
    if j0 < n:
        first = tl.load(first_unit_ptr + s)
        total = _tensor_total(u_ptr, first, n, IB)
        j = j0 + tl.arange(0, JB)
        valid = j < n
        key_j, q = _unit_keys(u_ptr, noise_ptr, first, j, n, total, KEY)
        rank = tl.zeros((JB,), dtype=tl.int32)
        tail = tl.zeros((JB,), dtype=tl.float64)
        for i0 in range(0, n, IB):
            i = i0 + tl.arange(0, IB)
            key_i, q_i = _unit_keys(u_ptr, noise_ptr, first, i, n, total, KEY)
            before = _preceded_by(key_j, j, key_i, i, n)
            rank += tl.sum(before.to(tl.int32), axis=1)
            if PAPER:
                tail += tl.sum(tl.where(before | (i >= n)[None, :], 0.0, q_i[None, :]), axis=1)
        if PAPER:
            tl.store(rank_ptr + first + j, rank, mask=valid)
            tl.store(tail_ptr + first + j, tail, mask=valid)
        else:
            k = tl.load(k_ptr + s)
            if MODE == 1:  # AMSS+ with the public code's scaling 1 / (q + 1 / N)
                value = 1.0 / (q + 1.0 / n.to(tl.float64))
            else:
                value = tl.full((JB,), 1.0, dtype=tl.float64)
            tl.store(factor_ptr + first + j, tl.where(rank < k, value, 0.0), mask=valid)


@triton.jit
def _pi_kernel(u_ptr, k_ptr, first_unit_ptr, num_units_ptr, rank_ptr, tail_ptr, pi_ptr,
               WIDTH: tl.constexpr, IB: tl.constexpr):
    # AMSS+ "paper", tensor s: the capped inclusion probabilities (module docstring): r, the
    # smallest rank where (k - rank) q <= tail (or rank >= k - 1), is the number of capped
    # units; pi = 1 for them, (k - r) q / (tail at rank r) for the others.
    s = tl.program_id(0)
    first = tl.load(first_unit_ptr + s)
    n = tl.load(num_units_ptr + s)
    k = tl.load(k_ptr + s)
    j = tl.arange(0, WIDTH)
    valid = j < n
    q = (tl.load(u_ptr + first + j, mask=valid, other=0.0) + EPS_IN_KERNEL) \
        / _tensor_total(u_ptr, first, n, IB)
    rank = tl.load(rank_ptr + first + j, mask=valid, other=0).to(tl.int64)
    tail = tl.load(tail_ptr + first + j, mask=valid, other=0.0)
    # a NaN q (a NaN or inf gradient) caps nothing, as in the reference's capping rounds
    consistent = ((k - rank).to(tl.float64) * q <= tail) | (rank >= k - 1) | (q != q)
    r = tl.min(tl.where(valid & consistent, rank, n), axis=0)
    free_mass = tl.sum(tl.where(valid & (rank == r), tail, 0.0), axis=0)
    # NaN (a NaN or inf gradient) propagates as in torch.clamp: such a tensor keeps no unit
    pi = tl.minimum((k - r).to(tl.float64) * q / free_mass, 1.0, propagate_nan=NAN_TOO)
    tl.store(pi_ptr + first + j, tl.where(rank < r, 1.0, pi), mask=valid)


@triton.jit
def _systematic_kernel(noise_ptr, start_ptr, k_ptr, first_unit_ptr, num_units_ptr, pi_ptr,
                       factor_ptr, JB: tl.constexpr, IB: tl.constexpr):
    # AMSS+ "paper", units j0 .. j0 + JB of tensor s: systematic sampling in the increasing
    # order of the Gumbel noise. Unit j is chosen when a point start + m (m = 0..k-1) falls
    # in (sum of pi before j, that + pi_j]. Both sums are taken over sets of units by the
    # same tiles, so j's predecessor's "through" sum equals j's "before" sum bit for bit and
    # exactly k points land. Factor 1 / pi for a chosen unit.
    s = tl.program_id(0)
    n = tl.load(num_units_ptr + s)
    j0 = tl.program_id(1) * JB
    if j0 < n:
        first = tl.load(first_unit_ptr + s)
        j = j0 + tl.arange(0, JB)
        valid = j < n
        later_j = -tl.load(noise_ptr + first + j, mask=valid, other=float("inf"))
        pi = tl.load(pi_ptr + first + j, mask=valid, other=1.0)
        sum_before = tl.zeros((JB,), dtype=tl.float64)
        sum_through = tl.zeros((JB,), dtype=tl.float64)
        for i0 in range(0, n, IB):
            i = i0 + tl.arange(0, IB)
            later_i = -tl.load(noise_ptr + first + i, mask=i < n, other=float("inf"))
            pi_i = tl.load(pi_ptr + first + i, mask=i < n, other=0.0)[None, :]
            before = _preceded_by(later_j, j, later_i, i, n)
            through = before | ((i[None, :] == j[:, None]) & (i < n)[None, :])
            sum_before += tl.sum(tl.where(before, pi_i, 0.0), axis=1)
            sum_through += tl.sum(tl.where(through, pi_i, 0.0), axis=1)
        start = tl.load(start_ptr + s)
        kf = tl.load(k_ptr + s).to(tl.float64)
        points_before = tl.minimum(tl.maximum(tl.ceil(sum_before - start), 0.0,
                                              propagate_nan=NAN_TOO), kf, propagate_nan=NAN_TOO)
        points_through = tl.minimum(tl.maximum(tl.ceil(sum_through - start), 0.0,
                                               propagate_nan=NAN_TOO), kf, propagate_nan=NAN_TOO)
        chosen = points_through - points_before > 0
        tl.store(factor_ptr + first + j, tl.where(chosen, 1.0 / tl.where(chosen, pi, 1.0), 0.0),
                 mask=valid)


# --------------------------------------------------------------------- host side

def _split64(value):
    """The low and high 32 bits of a 64-bit seed or step (any sign: its two's complement)."""
    value = int(value) % 2**64
    return value & 0xFFFFFFFF, value >> 32


class _Plan:
    """Where every unit lives: per tensor (slot) its units, unit length, first global unit
    and generator index; per unit its slot; the (tensors, max units) padding map."""

    def __init__(self, tensors, unit_size, device):
        slots = [t for t, x in enumerate(tensors) if x.numel() > 0]
        self.slots, self.device = slots, device
        self.num_units = [tensors[t].shape[0] // unit_size for t in slots]
        self.unit_len = [tensors[t].numel() // n for t, n in zip(slots, self.num_units)]
        firsts, total = [], 0
        for n in self.num_units:
            firsts.append(total)
            total += n
        self.first_unit, self.total = firsts, total
        self.max_units = max(self.num_units, default=0)
        as_i64 = dict(dtype=torch.int64, device=device)
        self.unit_len_t = torch.tensor(self.unit_len, **as_i64)
        self.first_unit_t = torch.tensor(firsts, **as_i64)
        self.num_units_t = torch.tensor(self.num_units, **as_i64)
        self.tensor_index_t = torch.tensor(slots, **as_i64)
        self.num_units_f64 = torch.tensor(self.num_units, dtype=torch.float64, device=device)
        slot_of_unit = torch.repeat_interleave(torch.arange(len(slots)),
                                               torch.tensor(self.num_units, dtype=torch.int64))
        self.unit_slot_t = slot_of_unit.to(device=device, dtype=torch.int64)
        within = torch.arange(total) - torch.tensor(firsts, dtype=torch.int64)[slot_of_unit]
        # unit g sits at row slot, column j of the padded (tensors, max units) matrices
        self.padded_pos = (slot_of_unit * self.max_units + within).to(device)
        self.valid = torch.zeros(len(slots) * self.max_units, dtype=torch.bool, device=device)
        self.valid[self.padded_pos] = True
        self.valid = self.valid.view(len(slots), self.max_units)
        # the units of each dtype: one launch per dtype
        self.units_by_dtype = {}
        for s, t in enumerate(slots):
            self.units_by_dtype.setdefault(tensors[t].dtype, []).append(
                torch.arange(firsts[s], firsts[s] + self.num_units[s]))
        self.units_by_dtype = {d: torch.cat(u).to(device) for d, u in self.units_by_dtype.items()}
        self.no_rank = torch.empty(0, dtype=torch.int32, device=device)  # rank unused
        self._kept = {}    # kept_units per (owners, ratios)
        self._tables = {}  # device copies of int64 host tables, by their values

    def kept_units(self, owner, ratios):
        """k = kept_units(ratio of its modality, its units) per tensor (slot), memoised: the
        ratios often repeat from step to step, and k = ceil(rho N) changes more rarely still;
        a miss computes each distinct (ratio, N) pair once."""
        key = (tuple(owner), tuple(ratios))
        ks = self._kept.get(key)
        if ks is None:
            pairs = [(ratios[owner[t]], n) for t, n in zip(self.slots, self.num_units)]
            k_of = {pair: kept_units(*pair) for pair in set(pairs)}
            if len(self._kept) >= 64:
                self._kept.clear()
            ks = self._kept[key] = [k_of[pair] for pair in pairs]
        return ks

    def device_table(self, values, sizes):
        """An int64 host list on the plan's device (_to_device) split into parts of `sizes`,
        memoised by its values: a step's tables (addresses, k, fresh flags) usually repeat
        those of the step before (the caching allocator hands the gradients the same
        blocks), and a hit saves the copy. The cached tensors are only ever read."""
        # by stream as well: a table is copied on the stream current at its creation, and a
        # kernel on another stream must not read it before that copy (nor after its reuse)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        key = (tuple(values), stream)
        parts = self._tables.get(key)
        if parts is None:
            if len(self._tables) >= 8:
                self._tables.clear()
            parts = self._tables[key] = \
                _to_device(values, torch.int64, self.device).split_with_sizes(sizes)
        return parts


_plans = {}  # by the tensors' shapes, dtypes, unit size and device: rebuilt only when they change


def _plan_for(tensors, unit_size):
    key = (tuple([(x.shape, x.dtype) for x in tensors]), unit_size, tensors[0].device)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 16:
            _plans.clear()
        plan = _plans[key] = _Plan(tensors, unit_size, tensors[0].device)
    return plan


def _to_device(values, dtype, device):
    """A small per-step host list on the device without a host synchronisation: a plain
    torch.tensor(..., device="cuda") copies from pageable memory and waits for the stream
    (the whole backward pass); a pinned non-blocking copy is queued behind it instead (the
    caching host allocator keeps the pinned block alive until the copy has run)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _grid_launch(kernel, units, *args, **meta):
    if units.numel() > 0:
        kernel[(units.numel(),)](units, *args, num_warps=NUM_WARPS, **meta)


class _Workspace:
    """A step's fp64 arrays, views of one allocation (one allocator call instead of six):
    u, noise, factors (U each), start (T); tail and pi (U each) for AMSS+ "paper" only."""

    def __init__(self, plan, paper):
        U, T = plan.total, len(plan.slots)
        sizes = [U, U, U, T] + ([U, U] if paper else [0, 0])
        memory = torch.empty(sum(sizes), dtype=torch.float64, device=plan.device)
        self.u, self.noise, self.factors, self.start, self.tail, self.pi = \
            memory.split_with_sizes(sizes)


def _importance(grads, plan, addresses, seed, step, work):
    """Stage 1 into work.u (U,), work.noise (U,) and work.start (T,): the unit importances,
    their Gumbel noise and the tensors' systematic-sampling starts."""
    step_lo, step_hi = _split64(step)
    seed_lo, seed_hi = _split64(seed)
    for dtype, units in plan.units_by_dtype.items():
        _grid_launch(_importance_kernel, units, plan.unit_slot_t, addresses, plan.unit_len_t,
                     plan.first_unit_t, plan.num_units_t, plan.tensor_index_t, work.u,
                     work.noise, work.start, step_lo, step_hi, seed_lo, seed_hi,
                     DTYPE=_TL[dtype], VEC=_VEC[dtype], BLOCK=_block(dtype))


def _padded(plan, values, fill):
    out = torch.full((len(plan.slots) * plan.max_units,), fill, dtype=values.dtype,
                     device=values.device)
    out[plan.padded_pos] = values
    return out.view(len(plan.slots), plan.max_units)


def capped_inclusion_probabilities(q, k):
    """pi = min(1, c q) with sum pi = k, for every row of q (T, W) at once (k: (T, 1) int64;
    q >= 0, padding 0). Sorted decreasingly, the capped units are the first r, r the smallest
    with (k - r) q_(r) <= sum_{i >= r} q_(i); the others get (k - r) q / sum_{i >= r} q."""
    rank = torch.arange(q.shape[1], device=q.device)[None, :]
    # NaN first on every device (reference.amss._nan_first): then every pi of the row is NaN
    by_q = torch.sort(torch.where(torch.isnan(q), float("inf"), q), dim=1, descending=True,
                      stable=True).indices
    q_sorted = torch.gather(q, 1, by_q)
    tail = torch.flip(torch.cumsum(torch.flip(q_sorted, [1]), dim=1), [1])
    consistent = ((k - rank) * q_sorted <= tail) | (rank >= k - 1) | torch.isnan(q_sorted)
    capped_count = torch.argmax(consistent.to(torch.int8), dim=1, keepdim=True)  # first True
    free_mass = torch.gather(tail, 1, capped_count)
    pi = torch.clamp((k - capped_count) * q / free_mass, max=1.0)
    capped = torch.zeros_like(consistent).scatter_(1, by_q, rank < capped_count)
    return torch.where(capped, 1.0, pi)


MAX_FUSED_SELECT_UNITS = 2048  # larger tensors (by dim-0 units): the batched torch path
SELECT_ROWS = 16     # JB: units of one tensor ranked per program
SELECT_COLUMNS = 256  # IB: units compared against them per step
SELECT_WARPS = 4


def _factors(plan, work, k, mode, scaling):
    """Stage 2: one fp64 factor per unit (0: left out; in work.factors) from the per-unit
    arrays of work (k: the units to keep per tensor, int64 on the device; for AMSS+ "paper"
    work must hold tail and pi): one launch of _rank_kernel,
    or for AMSS+ "paper" three (ranks by q, capped pi per tensor, systematic sample), when
    every tensor has at most MAX_FUSED_SELECT_UNITS units. The work per tensor grows as
    n^2, so beyond that the batched torch ops take over."""
    u, noise, start, factors = work.u, work.noise, work.start, work.factors
    if plan.max_units > MAX_FUSED_SELECT_UNITS:
        return _factors_batched(plan, u, noise, start, k, mode, scaling)
    T = len(plan.slots)
    grid = (T, triton.cdiv(plan.max_units, SELECT_ROWS))
    width = max(16, triton.next_power_of_2(plan.max_units))  # _pi_kernel's lanes
    columns = min(SELECT_COLUMNS, width)
    paper = mode == "amss+" and scaling == "paper"
    key = 3 if (paper or mode == "topk") else 2 if mode == "uniform" else 0
    rank = torch.empty(plan.total, dtype=torch.int32, device=u.device) if paper else plan.no_rank
    _rank_kernel[grid](u, noise, k, plan.first_unit_t, plan.num_units_t, factors, rank, work.tail,
                       MODE=_MODES.index(mode), KEY=key, PAPER=paper, JB=SELECT_ROWS,
                       IB=columns, num_warps=SELECT_WARPS)
    if paper:
        _pi_kernel[(T,)](u, k, plan.first_unit_t, plan.num_units_t, rank, work.tail, work.pi,
                         WIDTH=width, IB=columns, num_warps=SELECT_WARPS)
        _systematic_kernel[grid](noise, start, k, plan.first_unit_t, plan.num_units_t, work.pi,
                                 factors, JB=SELECT_ROWS, IB=columns,
                                 num_warps=SELECT_WARPS)
    return factors


def _factors_batched(plan, u, noise, start, k, mode, scaling):
    """Stage 2 by a few batched torch ops over the (tensors, max units) padded matrix."""
    device = u.device
    T, width = len(plan.slots), plan.max_units
    k = k[:, None]
    rank = torch.arange(width, device=device)[None, :]
    w = _padded(plan, u + EPS, 0.0)
    q = w / w.sum(dim=1, keepdim=True)
    factors = torch.zeros(T, width, dtype=torch.float64, device=device)
    if mode == "amss+" and scaling == "paper":
        # capped inclusion probabilities (module docstring), then systematic sampling in
        # the random order of the Gumbel noise (reference.amss.unit_factors)
        pi = torch.where(plan.valid, capped_inclusion_probabilities(q, k), 0.0)
        order = torch.sort(_padded(plan, noise, float("inf")), dim=1, stable=True).indices
        pi_in_order = torch.gather(pi, 1, order)
        cumulated = torch.cumsum(pi_in_order, dim=1)
        points_below = torch.minimum(torch.clamp(torch.ceil(cumulated - start[:, None]), min=0),
                                     k.to(torch.float64))
        previous = torch.cat([points_below.new_zeros(T, 1), points_below[:, :-1]], dim=1)
        chosen = (points_below - previous) > 0
        factors.scatter_(1, order, torch.where(chosen, 1.0 / pi_in_order, 0.0))
    else:
        if mode == "topk":
            keys = torch.where(plan.valid, q, -1.0)  # ties to the lower index: stable sort
        else:
            noise_padded = _padded(plan, noise, 0.0)
            keys = noise_padded if mode == "uniform" else torch.log(q) + noise_padded
            keys = torch.where(plan.valid, keys, -float("inf"))
        # NaN keys first on every device (reference.amss._nan_first)
        keys = torch.where(torch.isnan(keys), float("inf"), keys)
        order = torch.sort(keys, dim=1, descending=True, stable=True).indices
        keep = rank < k
        if mode == "amss+":  # scaling "reference-code": 1 / (q + 1 / N)
            n = plan.num_units_f64[:, None]
            value = 1.0 / (torch.gather(q, 1, order) + 1.0 / n)
        else:
            value = torch.ones_like(q)
        factors.scatter_(1, order, torch.where(keep, value, 0.0))
    return factors.view(-1)[plan.padded_pos]


def _check_mask_args(op, grads, owner, ratios, sampling, scaling, unit_size):
    """The ops can be called directly (torch.ops): the C++ op's checks, the same messages."""
    T = len(grads)
    if len(owner) != T:
        raise RuntimeError(f"{op}: group_of_tensor must give the modality of each of the {T} "
                           "tensors")
    if not 0 <= sampling <= 3:
        raise RuntimeError(f"{op}: sampling must be 0..3, got {sampling}")
    if scaling not in (0, 1):
        raise RuntimeError(f"{op}: scaling must be 0 or 1, got {scaling}")
    if unit_size < 1:
        raise RuntimeError(f"{op}: unit_size must be >= 1, got {unit_size}")
    device = grads[0].device if grads else None
    for t, g in enumerate(grads):
        if not (g.device == device and g.is_contiguous() and g.dim() >= 1):
            raise RuntimeError(f"{op}: grads[{t}] must be a contiguous tensor with at least "
                               f"one dimension, on {device} like grads[0]")
        if g.dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(f"{op}: grads[{t}] must be fp16, bf16, fp32 or fp64, got "
                               f"{g.dtype}")
        if g.shape[0] % unit_size != 0:
            raise RuntimeError(f"{op}: grads[{t}] has {g.shape[0]} rows, not a multiple of "
                               f"unit_size {unit_size}")
        if not 0 <= owner[t] < len(ratios):
            raise RuntimeError(f"{op}: group_of_tensor[{t}] = {owner[t]} has no ratio")
        if not 0.0 <= ratios[owner[t]] <= 1.0:
            raise RuntimeError(f"{op}: ratios[{owner[t]}] = {ratios[owner[t]]} is outside "
                               "[0, 1]")


def _unit_factors(plan, grads, owner, ratios, sampling, scaling, seed, step):
    """(addresses, factors) of one step: stages 1 and 2 (grads: at least one non-empty)."""
    # the step's two host lists in one table: the gradients' addresses and k
    T = len(plan.slots)
    addresses, k = plan.device_table([grads[t].data_ptr() for t in plan.slots]
                                     + plan.kept_units(owner, ratios), (T, T))
    mode, scaling = _MODES[sampling], _SCALINGS[scaling]
    work = _Workspace(plan, paper=mode == "amss+" and scaling == "paper")
    _importance(grads, plan, addresses, seed, step, work)
    return addresses, _factors(plan, work, k, mode, scaling)


_MODES = ("amss", "amss+", "uniform", "topk")  # the ops' sampling codes
_SCALINGS = ("paper", "reference-code")


def mask_gradients_triton(grads, group_of_tensor, ratios, sampling, scaling, seed, step,
                          unit_size):
    """The body of the op amss_mask_gradients_triton (below): its checks, then the step."""
    _check_mask_args("amss_mask_gradients_triton", grads, group_of_tensor, ratios, sampling,
                     scaling, unit_size)
    mask_gradients_unchecked(grads, group_of_tensor, ratios, sampling, scaling, seed, step,
                             unit_size)


def mask_gradients_unchecked(grads, group_of_tensor, ratios, sampling, scaling, seed, step,
                             unit_size):
    """The step on arguments _check_mask_args accepts. ether_kernels.amss calls it directly
    in eager mode, after its own checks (a superset): the custom op's Python dispatch
    layers, and checking every tensor twice, cost more host time per step than the step's
    kernels take on a GPU."""
    if not grads:
        return
    plan = _plan_for(grads, unit_size)
    if not plan.slots:  # every tensor empty
        return
    addresses, factors = _unit_factors(plan, grads, group_of_tensor, ratios, sampling,
                                       scaling, seed, step)
    for dtype, units in plan.units_by_dtype.items():
        _grid_launch(_apply_kernel, units, plan.unit_slot_t, addresses, plan.unit_len_t,
                     plan.first_unit_t, factors, DTYPE=_TL[dtype], VEC=_VEC[dtype],
                     BLOCK=_block(dtype))


@torch.library.custom_op("ether_kernels::amss_mask_gradients_triton", mutates_args=("grads",))
def amss_mask_gradients_triton(grads: list[torch.Tensor], group_of_tensor: list[int],
                               ratios: list[float], sampling: int, scaling: int, seed: int,
                               step: int, unit_size: int) -> None:
    """The Triton twin of ether_kernels::amss_mask_gradients (same arguments)."""
    mask_gradients_triton(grads, group_of_tensor, ratios, sampling, scaling, seed, step,
                          unit_size)


@amss_mask_gradients_triton.register_fake
def _(grads, group_of_tensor, ratios, sampling, scaling, seed, step, unit_size):
    return None


def masked_sgd_step_triton(params, grads, buffers, fresh, group_of_tensor, ratios, sampling,
                           scaling, seed, step, unit_size, lr, momentum, dampening,
                           weight_decay, nesterov):
    """The body of the op amss_masked_sgd_step_triton (below): its checks, then the step."""
    op = "amss_masked_sgd_step_triton"
    _check_mask_args(op, grads, group_of_tensor, ratios, sampling, scaling, unit_size)
    T = len(grads)
    if len(params) != T:
        raise RuntimeError(f"{op}: params and grads differ in length")
    with_momentum = momentum != 0
    if with_momentum and (len(buffers) != T or len(fresh) != T):
        raise RuntimeError(f"{op}: with momentum, one buffer and one fresh flag per tensor")
    for t in range(T):
        if not (params[t].shape == grads[t].shape and params[t].is_contiguous()
                and params[t].dtype == grads[t].dtype and params[t].device == grads[t].device):
            raise RuntimeError(f"{op}: params[{t}] must be contiguous with its gradient's "
                               "shape, dtype and device")
        if with_momentum and not (buffers[t].shape == params[t].shape
                                  and buffers[t].is_contiguous()
                                  and buffers[t].dtype == params[t].dtype
                                  and buffers[t].device == params[t].device):
            raise RuntimeError(f"{op}: buffers[{t}] must be contiguous with its parameter's "
                               "shape, dtype and device")
    masked_sgd_step_unchecked(params, grads, buffers, fresh, group_of_tensor, ratios, sampling,
                              scaling, seed, step, unit_size, lr, momentum, dampening,
                              weight_decay, nesterov)


def masked_sgd_step_unchecked(params, grads, buffers, fresh, group_of_tensor, ratios,
                              sampling, scaling, seed, step, unit_size, lr, momentum,
                              dampening, weight_decay, nesterov):
    """The step on arguments masked_sgd_step_triton accepts; called directly in eager mode
    like mask_gradients_unchecked."""
    if not params:
        return
    plan = _plan_for(grads, unit_size)
    if not plan.slots:  # every tensor empty
        return
    grad_addresses, factors = _unit_factors(plan, grads, group_of_tensor, ratios, sampling,
                                            scaling, seed, step)
    # the parameters' and buffers' addresses and the fresh flags in one table (without
    # momentum the buffer table repeats the parameters' and is never read)
    with_momentum = momentum != 0
    owners_of_buffers = buffers if with_momentum else params
    T = len(plan.slots)
    param_addresses, buffer_addresses, fresh_t = plan.device_table(
        [params[t].data_ptr() for t in plan.slots]
        + [owners_of_buffers[t].data_ptr() for t in plan.slots]
        + [fresh[t] if with_momentum else 0 for t in plan.slots], (T, T, T))
    hyper = _to_device([lr, momentum, dampening, weight_decay], torch.float64, plan.device)
    for dtype, units in plan.units_by_dtype.items():
        _grid_launch(_sgd_kernel, units, plan.unit_slot_t, param_addresses, grad_addresses,
                     buffer_addresses, fresh_t, plan.unit_len_t, plan.first_unit_t, factors,
                     hyper, DTYPE=_TL[dtype], MOMENTUM=with_momentum, NESTEROV=bool(nesterov),
                     VEC=_VEC[dtype], BLOCK=_block(dtype), enable_fp_fusion=False)


@torch.library.custom_op("ether_kernels::amss_masked_sgd_step_triton",
                         mutates_args=("params", "buffers"))
def amss_masked_sgd_step_triton(params: list[torch.Tensor], grads: list[torch.Tensor],
                                buffers: list[torch.Tensor], fresh: list[int],
                                group_of_tensor: list[int], ratios: list[float], sampling: int,
                                scaling: int, seed: int, step: int, unit_size: int, lr: float,
                                momentum: float, dampening: float, weight_decay: float,
                                nesterov: bool) -> None:
    """The Triton twin of ether_kernels::amss_masked_sgd_step (same arguments)."""
    masked_sgd_step_triton(params, grads, buffers, fresh, group_of_tensor, ratios, sampling,
                           scaling, seed, step, unit_size, lr, momentum, dampening,
                           weight_decay, nesterov)


@amss_masked_sgd_step_triton.register_fake
def _(params, grads, buffers, fresh, group_of_tensor, ratios, sampling, scaling, seed, step,
      unit_size, lr, momentum, dampening, weight_decay, nesterov):
    return None
