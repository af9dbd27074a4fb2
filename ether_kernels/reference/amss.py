"""AMSS / AMSS+ in plain PyTorch, written to read like the spec (specs/amss.md).

Step 1, update ratios (per batch, no gradient):
    I_m  = H(Y) - CE(out_m, y)                 (nats; H(Y): entropy of the batch's labels)
    Hz_m = mean over the batch of entropy(softmax(z_m))
    r_m  = (I_m + offset) / Hz_m
    rho  = clip(1 - softmax(r / T) + bias, lo, hi), or 0.5 everywhere when some I_m + offset
           <= 0 or anything is NaN
Step 2, unit importance of a gradient tensor whose units are slices along unit_dim:
    u_j = sum of grad^2 over unit j,   q_j = (u_j + eps) / sum_k (u_k + eps)
Step 3, the k = ceil(rho N) units of a tensor of N units:
    "amss"     Gumbel-top-k of log q (the law of torch.multinomial(q, k) without replacement)
    "uniform"  Gumbel-top-k of 0 (k distinct units, uniformly)
    "topk"     the k largest q (ties to the lower index)
    "amss+"    scaling "paper": systematic sampling proportional to the inclusion
               probabilities pi_j = min(1, c q_j) with c such that sum_j pi_j = k (exactly k
               units, each unit kept with probability exactly pi_j), scale 1 / pi_j: the masked
               gradient is an unbiased estimate of the gradient. Scaling "reference-code":
               the "amss" units, scaled by 1 / (q_j + 1 / N) as the public code does.
Step 4: grad_unit *= factor_j (0 for units left out).

Randomness: a counter-based generator. Every random number is a pure function of (seed, step,
tensor index, unit index, stream), so masks are identical on every backend, thread count and
rank, and a resumed run reproduces them (see `uniform`).
"""

import math

import torch

MODES = ("amss", "amss+", "uniform", "topk")
SCALINGS = ("paper", "reference-code")
EPS = 1e-12  # the spec's eps in q_j: a tensor with an all-zero gradient samples uniformly

_MASK32 = 0xFFFFFFFF


# ------------------------------------------------------------------- update ratios

def update_ratios_reference(logits, labels, features, temperature=0.2, offset=0.5, bias=0.0,
                            clip=(0.1, 0.9)):
    """(M,) float32 update ratios from M modalities' (B, K) logits and (B, F) features."""
    num_classes = logits[0].shape[1]
    labels = labels.long()
    # scatter_add, not bincount: bincount reads the labels' maximum on the host
    counts = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    p = counts / counts.sum()
    label_entropy = -(torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)).sum()
    info, feature_entropy = [], []
    for out, z in zip(logits, features):
        info.append(label_entropy - torch.nn.functional.cross_entropy(out.double(), labels))
        log_p = torch.log_softmax(z.double(), dim=1)
        # abs: entropy is >= 0, but one-hot rows (F = 1, or very peaked features) sum to
        # -0.0, and (I + c) / -0.0 = -inf would silently rank the modality weakest (rho
        # 0.9). With +0, r = +inf, the softmax is NaN and the spec's fallback (0.5) applies.
        feature_entropy.append((-(log_p.exp() * log_p).sum(dim=1).mean()).abs())
    info = torch.stack(info)
    feature_entropy = torch.stack(feature_entropy)
    rate = (info + offset) / feature_entropy
    rho = torch.clamp(1.0 - torch.softmax(rate / temperature, dim=0) + bias, clip[0], clip[1])
    fallback = ((info + offset) <= 0).any() | torch.isnan(rho).any()
    return torch.where(fallback, torch.full_like(rho, 0.5), rho).float()


# ------------------------------------------------------------ counter-based generator

def _mul32(x, c):
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow."""
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _MASK32


def mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32): a bijection on [0, 2^32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _word(seed, step, tensor_index, units, stream):
    """32 random bits per unit: a hash chain over (stream, unit, tensor, step, seed)."""
    h = mix32(units + ((0x9E3779B9 * (stream + 1)) & _MASK32))
    for key in (tensor_index, step & _MASK32, step >> 32, seed & _MASK32, seed >> 32):
        h = mix32(h ^ (key & _MASK32))
    return h


def uniform(seed, step, tensor_index, units, stream=0):
    """Uniform numbers in (0, 1), float64, one per entry of the int64 tensor `units`.

    52 random bits from two 32-bit words of the counter-based generator ((bits + 1/2) / 2^52
    is exact in float64 and never 0 or 1); a pure function of (seed, step, tensor_index,
    unit, stream): the fused kernels compute the same numbers.
    """
    high = _word(seed, step, tensor_index, units, 2 * stream)
    low = _word(seed, step, tensor_index, units, 2 * stream + 1)
    bits = high.double() * 2.0**20 + (low >> 12).double()  # 52 bits, exact in float64
    return (bits + 0.5) / 2.0**52


def gumbel(seed, step, tensor_index, num_units, device):
    """Standard Gumbel noise -log(-log(U)) for units 0 .. num_units - 1 of one tensor."""
    units = torch.arange(num_units, dtype=torch.int64, device=device)
    return -torch.log(-torch.log(uniform(seed, step, tensor_index, units)))


# ---------------------------------------------------------------- units and selection

def unit_view(grad, unit_dim=0, unit_size=1):
    """The gradient as (units, elements per unit): unit j is slices [j s, (j + 1) s) along
    unit_dim (s = unit_size)."""
    moved = grad.movedim(unit_dim, 0)
    return moved.reshape(moved.shape[0] // unit_size, -1)


def unit_importance(grad, unit_dim=0, unit_size=1):
    """q_j = (u_j + eps) / sum_k (u_k + eps), u_j = sum of grad^2 over unit j (float64)."""
    u = unit_view(grad.double(), unit_dim, unit_size).pow(2).sum(dim=1)
    return (u + EPS) / (u + EPS).sum()


def kept_units(ratio, num_units):
    """k = ceil(rho N), with a relative tolerance of 2^-24 (float32's half ulp) so that a ratio
    rounded to float32 (0.3 is 0.30000001) keeps ceil(0.3 N) units, not one more. Beyond
    N = 2^24 units in one tensor (float32 cannot tell such ratios apart) k can be one or two
    below ceil(rho N); rho = 1 keeps every unit whatever N."""
    if float(ratio) >= 1.0:
        return num_units
    return min(num_units, max(0, math.ceil(float(ratio) * num_units * (1.0 - 2.0**-24))))


def inclusion_probabilities(q, k):
    """pi_j = min(1, c q_j) with c such that sum_j pi_j = k (k <= number of units)."""
    pi = torch.zeros_like(q)
    if k == 0:
        return pi
    capped = torch.zeros_like(q, dtype=torch.bool)
    for _ in range(q.numel()):  # each round caps at least one unit, or stops
        free_mass = q[~capped].sum()
        pi = torch.where(capped, 1.0, (k - capped.sum()) * q / free_mass)
        newly = (pi > 1) & ~capped
        if not newly.any():
            break
        capped |= newly
    return pi.clamp(max=1.0)


def _nan_first(keys):
    """Keys with NaN (from a NaN or inf gradient) as +inf: a NaN key ranks first. The keys
    (q <= 1, log q + finite noise) are otherwise below +inf, and torch.sort places NaN
    differently on CPU and on CUDA: the order must not depend on the device."""
    return torch.where(torch.isnan(keys), float("inf"), keys)


def unit_factors(q, k, mode, scaling, seed, step, tensor_index):
    """(N,) float64 factors of one tensor's units: 0 for left-out units, 1 (or 1 / pi_j, or
    1 / (q_j + 1 / N)) for kept ones."""
    n = q.numel()
    factors = torch.zeros(n, dtype=torch.float64, device=q.device)
    if k == 0:
        return factors
    if mode == "topk":  # ties to the lower index: a stable sort; NaN first (_nan_first)
        factors[torch.sort(_nan_first(q), descending=True, stable=True).indices[:k]] = 1.0
        return factors
    if mode == "amss+" and scaling == "paper":
        pi = inclusion_probabilities(q, k)
        # Systematic sampling in a random order: points u0, u0 + 1, ..., u0 + k - 1 on the
        # cumulated pi; unit j is kept when a point falls in its interval (at most one: pi_j
        # <= 1), so exactly k units are kept and unit j with probability pi_j.
        order = torch.argsort(gumbel(seed, step, tensor_index, n, q.device))
        cumulated = torch.cumsum(pi[order], dim=0)
        start = uniform(seed, step, tensor_index, torch.tensor([n], device=q.device), stream=1)
        points_below = torch.clamp(torch.ceil(cumulated - start), 0, k)
        previous = torch.cat([points_below.new_zeros(1), points_below[:-1]])
        chosen = order[(points_below - previous) > 0]
        factors[chosen] = 1.0 / pi[chosen]
        return factors
    noise = gumbel(seed, step, tensor_index, n, q.device)
    keys = noise if mode == "uniform" else torch.log(q) + noise
    # the k largest keys, ties (and NaN keys, from a NaN gradient) to the lower index: a
    # stable sort, so every backend keeps the same units whatever the input
    chosen = torch.sort(_nan_first(keys), descending=True, stable=True).indices[:k]
    factors[chosen] = 1.0 / (q[chosen] + 1.0 / n) if mode == "amss+" else 1.0
    return factors


def mask_gradients_reference(grads_per_group, ratios, mode="amss", scaling="paper", seed=0,
                             step=0, unit_dim=0, unit_size=1):
    """Masks every gradient in place, tensor by tensor (the eager loop of the public code).

    grads_per_group: one list of gradient tensors per modality; ratios: (M,) in [0, 1].
    Tensors are numbered in order across the groups (the generator's tensor index).
    """
    ratios = [float(r) for r in ratios]
    tensor_index = 0
    for group, ratio in zip(grads_per_group, ratios):
        for grad in group:
            if grad.numel() == 0:
                tensor_index += 1
                continue
            q = unit_importance(grad, unit_dim, unit_size)
            k = kept_units(ratio, q.numel())
            factors = unit_factors(q, k, mode, scaling, seed, step, tensor_index)
            view = unit_view(grad, unit_dim, unit_size)
            # left-out units become 0 (even where the gradient is NaN or inf)
            scaled = torch.where(factors[:, None] == 0, 0.0, view.double() * factors[:, None])
            new = scaled.to(grad.dtype).reshape(grad.movedim(unit_dim, 0).shape)
            grad.copy_(new.movedim(0, unit_dim))
            tensor_index += 1


def masked_sgd_step_reference(params_per_group, grads_per_group, buffers_per_group, ratios,
                              lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                              mode="amss", scaling="paper", seed=0, step=0, unit_size=1):
    """SGD (torch.optim.SGD's rule) on the sampled units only; parameters and momentum buffers
    of the other units do not move. Units are dim-0 slices of unit_size rows.

    For a kept unit with factor f (1, or AMSS+'s scale): g = f grad + weight_decay p;
    buf = g on the call that creates the tensor's buffer (None before: torch.optim.SGD's
    per-tensor first step; the tensor's other units keep a 0 buffer), else
    momentum buf + (1 - dampening) g; p -= lr (g + momentum buf if nesterov else buf)
    (buf = g when momentum is 0).
    buffers_per_group: lists like params, entries None until created (returned, filled in).
    """
    tensor_index = 0
    out_buffers = []
    for params, grads, buffers, ratio in zip(params_per_group, grads_per_group,
                                             buffers_per_group, ratios):
        group_buffers = []
        for p, grad, buf in zip(params, grads, buffers):
            if grad.numel() == 0:
                group_buffers.append(buf)
                tensor_index += 1
                continue
            q = unit_importance(grad, 0, unit_size)
            k = kept_units(ratio, q.numel())
            factors = unit_factors(q, k, mode, scaling, seed, step, tensor_index)
            kept = factors != 0
            rows = torch.repeat_interleave(kept, unit_size)
            scale = torch.repeat_interleave(factors, unit_size)
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = (grad.double() * scale.view(shape) + weight_decay * p.double())[rows]
            if momentum != 0:
                if buf is None:
                    buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    new_buf = g
                else:
                    new_buf = momentum * buf.double()[rows] + (1 - dampening) * g
                buf[rows] = new_buf.to(buf.dtype)
                direction = g + momentum * new_buf if nesterov else new_buf
            else:
                direction = g
            p[rows] = (p.double()[rows] - lr * direction).to(p.dtype)
            group_buffers.append(buf)
            tensor_index += 1
        out_buffers.append(group_buffers)
    return out_buffers
