"""The MultiModal loss fused in Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

The same math as csrc/cpu/multimodal_loss.cpp (the comment there derives every gradient):
each program takes ROWS samples one after the other and forms, per sample, the
similarities S (C, K) against the normalised proxies, the proxy softmax P, the attention
fusion, the class softmax Q, the cross-entropy and its gradients for z (written) and for the
proxies (summed in registers over the program's rows, then written once per program: the
partial sums are added in program order by torch, so the result is deterministic). None of
the (B, C*K) intermediates goes to memory. The proxies are held as an (M*C, C, K) register
tile, loaded once per program; every size is padded to a power of two and masked.
Arithmetic in fp32 (fp64 for fp64 inputs). The proxy normalisation (w = relu(W) / norm)
and its backward are a few torch ops on the (M*C, C*K) matrix.
"""

import torch
import triton
import triton.language as tl

ROWS = 16  # samples per program: enough work per program, few partial sums to fold
NORM_FLOOR = 1e-12
KERNEL_NORM_FLOOR = tl.constexpr(NORM_FLOOR)  # globals a compiled kernel reads are constexprs


@triton.jit
def _multimodal_rows_kernel(z_ptr, labels_ptr, w_ptr, loss_ptr, grad_z_ptr, gw_ptr, B,
                            scalars_ptr, MC: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                            MCP: tl.constexpr, CP: tl.constexpr, KP: tl.constexpr,
                            ROWS: tl.constexpr, GRAD: tl.constexpr, ACC: tl.constexpr):
    s = tl.load(scalars_ptr)               # 1 / gamma, in ACC (a Python float arrives as fp32)
    inv_B = tl.load(scalars_ptr + 1)       # 1 / B
    pid = tl.program_id(0)
    r = tl.arange(0, MCP)              # row of the proxies / entry of z: m * C + c
    c = tl.arange(0, CP)
    k = tl.arange(0, KP)
    r_ok = r < MC
    ck_ok = (c[:, None] < C) & (k[None, :] < K)                          # (CP, KP)
    w_mask = r_ok[:, None, None] & ck_ok[None, :, :]
    w_offsets = r[:, None, None] * (C * K) + c[None, :, None] * K + k[None, None, :]
    w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0).to(ACC)       # (MCP, CP, KP)
    # which class each entry of z belongs to: entry m * C + c is class c
    class_of = (r[:, None] % C == c[None, :]) & r_ok[:, None] & (c[None, :] < C)  # (MCP, CP)
    gw = tl.zeros((MCP, CP, KP), dtype=ACC)
    total = tl.zeros((1,), dtype=ACC)
    for t in range(ROWS):
        i = pid * ROWS + t
        valid = i < B
        row = i.to(tl.int64) * MC
        z_ok = r_ok & ((r * 0 + i) < B)  # the row's mask as a vector
        z = tl.load(z_ptr + row + r, mask=z_ok, other=0.0).to(ACC)
        y = tl.load(labels_ptr + tl.minimum(i, B - 1))  # a valid address; unused if not valid
        norm = tl.sqrt(tl.sum(z * z, axis=0))
        zn = z / tl.maximum(norm, KERNEL_NORM_FLOOR)
        S = tl.sum(zn[:, None, None] * w, axis=0)                          # (CP, KP)
        # P = softmax(s S) over every proxy
        x = tl.where(ck_ok, s * S, -float("inf"))
        p = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
        p = tl.where(ck_ok, p, 0.0)
        P = p / tl.sum(tl.sum(p, axis=1), axis=0)
        a = tl.sum(tl.sum(P[None, :, :] * w, axis=2), axis=1)             # (MCP)
        att = tl.sum(tl.where(class_of, (z * (1.0 + a))[:, None], 0.0), axis=0)  # (CP)
        # Q = softmax over the classes of s S, for every k; sim
        q = tl.exp(x - tl.max(x, axis=0)[None, :])
        q = tl.where(ck_ok, q, 0.0)
        Q = q / tl.where(k[None, :] < K, tl.sum(q, axis=0)[None, :], 1.0)
        sim = tl.sum(Q * S, axis=1)
        logit = tl.where(c < C, sim + att, -float("inf"))
        top = tl.max(logit, axis=0)
        e = tl.where(c < C, tl.exp(logit - top), 0.0)
        lse = top + tl.log(tl.sum(e, axis=0))
        loss_i = lse - tl.sum(tl.where(c == y, logit, 0.0), axis=0)
        # a label outside [0, C) gives NaN, not a silently wrong loss (no host check here)
        loss_i = tl.where((y >= 0) & (y < C), loss_i, float("nan"))
        total += tl.where(valid, loss_i, 0.0)
        if GRAD:
            g = tl.where(c < C, (e / tl.sum(e, axis=0) - (c == y).to(ACC)) * inv_B, 0.0)
            g = tl.where(valid, g, 0.0)
            g_of = tl.sum(tl.where(class_of, g[None, :], 0.0), axis=1)    # (MCP): g[class]
            dz = g_of * (1.0 + a)
            da = g_of * z
            dP = tl.sum(da[:, None, None] * w, axis=0)                     # (CP, KP)
            dS = s * P * (dP - tl.sum(tl.sum(P * dP, axis=1), axis=0))
            gw += P[None, :, :] * da[:, None, None]
            dQ = g[:, None] * S
            dS += g[:, None] * Q + s * Q * (dQ - tl.sum(Q * dQ, axis=0)[None, :])
            dS = tl.where(ck_ok, dS, 0.0)
            dzn = tl.sum(tl.sum(dS[None, :, :] * w, axis=2), axis=1)
            gw += dS[None, :, :] * zn[:, None, None]
            dot = tl.sum(zn * dzn, axis=0)
            dz += tl.where(norm > KERNEL_NORM_FLOOR,
                           (dzn - zn * dot) / tl.maximum(norm, KERNEL_NORM_FLOOR),
                           dzn / KERNEL_NORM_FLOOR)
            tl.store(grad_z_ptr + row + r, dz.to(grad_z_ptr.dtype.element_ty), mask=z_ok)
    tl.store(loss_ptr + pid + tl.arange(0, 1), total)
    if GRAD:
        tl.store(gw_ptr + pid.to(tl.int64) * (MC * C * K) + w_offsets, gw, mask=w_mask)


def _next_power_of_2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


@torch.library.custom_op("ether_kernels::multimodal_loss_forward_triton", mutates_args=())
def multimodal_loss_forward_triton(z: torch.Tensor, labels: torch.Tensor, W: torch.Tensor,
                                   num_classes: int, gamma: float, compute_grad: bool
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton twin of ether_kernels::multimodal_loss_forward (same arguments)."""
    op = "multimodal_loss_forward_triton"
    C = num_classes
    if not (W.dim() == 2 and C >= 1 and W.shape[0] % C == 0 and W.shape[1] % C == 0
            and W.numel() > 0):
        raise RuntimeError(f"{op}: W must be (M*C, C*K) with C = {C}, got {tuple(W.shape)}")
    if not (z.dim() == 2 and z.shape[1] == W.shape[0] and z.shape[0] > 0):
        raise RuntimeError(f"{op}: z must be a non-empty (B, M*C) = (B, {W.shape[0]}) tensor, "
                           f"got {tuple(z.shape)}")
    if z.dtype != W.dtype or not z.is_floating_point():
        raise RuntimeError(f"{op}: z and W must be floating point of the same dtype")
    if labels.shape != (z.shape[0],) or labels.dtype != torch.int64:
        raise RuntimeError(f"{op}: labels must be a ({z.shape[0]},) int64 tensor")
    if not gamma > 0:
        raise RuntimeError(f"{op}: gamma must be > 0, got {gamma}")
    B, MC, CK = z.shape[0], W.shape[0], W.shape[1]
    K = CK // C
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    # the proxies, normalised once: w = relu(W) / max(column norms, eps)
    relu_W = torch.relu(W.to(acc))
    col_norm = relu_W.norm(dim=0, keepdim=True)
    w = (relu_W / col_norm.clamp_min(NORM_FLOOR)).contiguous()
    programs = triton.cdiv(B, ROWS)
    losses = torch.empty(programs, dtype=acc, device=z.device)
    z = z.contiguous()  # the kernel reads and writes row-major rows
    grad_z = z.new_empty(z.shape) if compute_grad else z.new_empty(0)
    gw = torch.empty(programs, MC, CK, dtype=acc, device=z.device) if compute_grad else losses
    # 1 / gamma and 1 / B in the accumulator's dtype, written on the device (no host copy)
    scalars = torch.full((2,), 1.0 / gamma, dtype=acc, device=z.device)
    scalars[1] = 1.0 / B
    _multimodal_rows_kernel[(programs,)](
        z, labels.contiguous(), w, losses, grad_z, gw, B, scalars,
        MC=MC, C=C, K=K, MCP=_next_power_of_2(MC), CP=_next_power_of_2(C),
        KP=_next_power_of_2(K), ROWS=ROWS, GRAD=compute_grad,
        ACC=tl.float64 if acc == torch.float64 else tl.float32)
    loss = (losses.sum() / B).to(z.dtype)
    if not compute_grad:
        return loss, grad_z, W.new_empty(0)
    g = gw.sum(dim=0)  # program order: deterministic
    # through w = r / max(||r||, eps), r = relu(W): dr = (g - w (w . g)) / ||r|| (g / eps
    # where the norm is below eps); dW = dr where W > 0
    norm = col_norm
    dr = torch.where(norm > NORM_FLOOR, (g - w * (w * g).sum(dim=0, keepdim=True)) /
                     norm.clamp_min(NORM_FLOOR), g / NORM_FLOOR)
    grad_W = torch.where(W > 0, dr, 0.0).to(W.dtype).contiguous()
    return loss, grad_z, grad_W


@multimodal_loss_forward_triton.register_fake
def _(z, labels, W, num_classes, gamma, compute_grad):
    if compute_grad:  # contiguous gradients, whatever the inputs' strides
        return z.new_empty(()), z.new_empty(z.shape), W.new_empty(W.shape)
    return z.new_empty(()), z.new_empty(0), W.new_empty(0)
