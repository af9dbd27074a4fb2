"""The alignment losses against their written-out references (reference/alignment.py) and
torch's own formulas: values and every gradient, odd shapes, fp64 gradcheck, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import ether_kernels as ek
from ether_kernels.reference import alignment as ref


def labelled_batch(B, E, classes, dtype=torch.float64):
    x = torch.randn(B, E, dtype=dtype)
    labels = torch.randint(0, classes, (B,))
    return x, labels


def grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    return value, torch.autograd.grad(value, leaves)


# ------------------------------------------------------------------------ triplet

@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triplet_loss_is_torch_triplet_margin_loss(p, swap, reduction):
    a, pos, neg = (torch.randn(13, 7, dtype=torch.float64) for _ in range(3))
    for fn in (lambda *t: ek.triplet_loss(*t, margin=0.7, p=p, swap=swap, reduction=reduction),
               lambda *t: ref.triplet_loss_reference(*t, margin=0.7, p=p, swap=swap,
                                                     reduction=reduction)):
        ours, ours_grads = grads_of(lambda *t: fn(*t).sum(), a, pos, neg)
        theirs, their_grads = grads_of(
            lambda *t: F.triplet_margin_loss(*t, margin=0.7, p=p, swap=swap,
                                             reduction=reduction).sum(), a, pos, neg)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        for g, h in zip(ours_grads, their_grads):
            torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("B,E,classes", [(1, 3, 2), (9, 4, 3), (41, 17, 5), (64, 8, 2)])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("mining", ["hard", "all"])
def test_mined_triplet_losses_match_the_brute_force(B, E, classes, squared, mining):
    x, labels = labelled_batch(B, E, classes)
    fn = ek.batch_hard_triplet_loss if mining == "hard" else ek.batch_all_triplet_loss
    reference = ref.batch_hard_triplet_reference if mining == "hard" else \
        ref.batch_all_triplet_reference
    ours, ours_grad = grads_of(lambda t: fn(t, labels, margin=0.5, squared=squared), x)
    theirs, their_grad = grads_of(
        lambda t: reference(ref.pairwise_distances_reference(t, t, squared), labels, labels,
                            0.5, exclude_self=True), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours_grad[0], their_grad[0], rtol=1e-7, atol=1e-9)
    assert torch.isfinite(ours_grad[0]).all()


@pytest.mark.parametrize("mining", ["hard", "all"])
def test_cross_modal_triplet_matches_the_brute_force(mining):
    anchors, anchor_labels = labelled_batch(11, 6, 3)
    others, other_labels = labelled_batch(17, 6, 3)
    ours, ours_grads = grads_of(
        lambda a, o: ek.cross_modal_triplet_loss(a, o, anchor_labels, other_labels, margin=1.0,
                                                 mining=mining), anchors, others)
    reference = ref.batch_hard_triplet_reference if mining == "hard" else \
        ref.batch_all_triplet_reference
    theirs, their_grads = grads_of(
        lambda a, o: reference(ref.pairwise_distances_reference(a, o), anchor_labels,
                               other_labels, 1.0, exclude_self=False), anchors, others)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for g, h in zip(ours_grads, their_grads):
        torch.testing.assert_close(g, h, rtol=1e-7, atol=1e-9)


def test_mined_triplets_gradcheck_and_degenerate_batches():
    x, labels = labelled_batch(10, 3, 3)
    x.requires_grad_(True)
    for fn in (ek.batch_hard_triplet_loss, ek.batch_all_triplet_loss):
        assert torch.autograd.gradcheck(lambda t: fn(t, labels, margin=2.0), (x,))
        # one class only: no negative, the loss is 0 with a zero (finite) gradient
        value = fn(x, torch.zeros(10, dtype=torch.long))
        assert value.item() == 0.0
        (g,) = torch.autograd.grad(value, x)
        assert torch.equal(g, torch.zeros_like(g))
    # duplicated embeddings (zero distances) keep finite gradients
    y = torch.randn(4, 3, dtype=torch.float64).repeat(2, 1).requires_grad_(True)
    lab = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    for fn in (ek.batch_hard_triplet_loss, ek.batch_all_triplet_loss):
        (g,) = torch.autograd.grad(fn(y, lab), y)
        assert torch.isfinite(g).all()


def test_batch_all_memory_stays_quadratic():
    """B = 3000: the brute force's B^3 triplets (27e9) would need 200 GB; ours runs."""
    x, labels = labelled_batch(3000, 8, 10, dtype=torch.float32)
    x.requires_grad_(True)
    value = ek.batch_all_triplet_loss(x, labels, margin=0.2)
    (g,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(g).all()


def test_a_nan_embedding_gives_nan_distances_in_ours_and_the_reference():
    """The reference (the oracle) turned a NaN distance into 0 (d2 > 0 is False for NaN), so
    it gave a finite loss where ours correctly gave NaN."""
    x, labels = labelled_batch(6, 3, 2)
    x[2, 1] = math.nan
    for d in (ek.pairwise_distances(x, x), ref.pairwise_distances_reference(x, x)):
        assert d[2].isnan().all() and d[:, 2].isnan().all()
        keep = [0, 1, 3, 4, 5]
        assert torch.isfinite(d[keep][:, keep]).all()
    assert ek.batch_hard_triplet_loss(x, labels).isnan()


def test_triplet_bad_input():
    x, labels = labelled_batch(6, 3, 2)
    cases = [
        (lambda: ek.triplet_loss(x, x, x[:, :2]), ValueError, "negative"),
        (lambda: ek.triplet_loss(x, x.float(), x), TypeError, "same dtype"),
        (lambda: ek.triplet_loss(x, x, None), TypeError, "^triplet_loss: negative must be a torch.Tensor"),
        (lambda: ek.grad_reverse([1.0]), TypeError, "^grad_reverse: x must be a torch.Tensor"),
        (lambda: ek.triplet_loss(x, x, x, margin=-1), ValueError, "margin"),
        (lambda: ek.triplet_loss(x, x, x, p=0), ValueError, "p must be"),
        # a bool or a string is not a number (True would have run as margin 1.0)
        (lambda: ek.triplet_loss(x, x, x, margin=True), TypeError,
         "^triplet_loss: margin must be a real number, got bool"),
        (lambda: ek.batch_hard_triplet_loss(x, labels, margin="1"), TypeError,
         "^batch_hard_triplet_loss: margin must be a real number, got str"),
        (lambda: ek.triplet_loss(x, x, x, p=True), TypeError, "p must be a real number"),
        (lambda: ek.triplet_loss(x, x, x, margin=math.nan), ValueError,
         "margin must be a finite number >= 0"),
        (lambda: ek.grad_reverse(x, None), TypeError,
         "^grad_reverse: lambda_ must be a real number, got NoneType"),
        (lambda: ek.grad_reverse(x, math.inf), ValueError, "^grad_reverse: lambda_ must be finite"),
        (lambda: ek.triplet_loss(x, x, x, reduction="avg"), ValueError, "reduction"),
        (lambda: ek.batch_hard_triplet_loss(x, labels[:5]), ValueError, "labels"),
        (lambda: ek.batch_all_triplet_loss(x, labels.double()), ValueError, "labels"),
        (lambda: ek.batch_all_triplet_loss(x[0], labels), ValueError, "embeddings"),
        (lambda: ek.batch_hard_triplet_loss(x.long(), labels), TypeError, "floating"),
        (lambda: ek.cross_modal_triplet_loss(x, x, labels, labels, mining="semi"), ValueError,
         "mining"),
        (lambda: ek.cross_modal_triplet_loss(x, x[:, :2], labels, labels), ValueError, "others"),
        (lambda: ek.triplet_loss(x, x[:4], x), ValueError, "do not broadcast"),
        (lambda: ek.triplet_loss(x, x[0], x), ValueError, "positive has shape"),
        (lambda: ek.pairwise_distances(x, x[:, :2]), ValueError, "widths differ"),
        (lambda: ek.pairwise_distances(x[0], x), ValueError, r"x must be a \(rows, E\)"),
        (lambda: ek.pairwise_distances(x, x.long()), TypeError, "y must be a floating"),
        # a string for a flag ran as True
        (lambda: ek.batch_hard_triplet_loss(x, labels, squared="no"), TypeError,
         "^batch_hard_triplet_loss: squared must be a bool, got str"),
        (lambda: ek.batch_all_triplet_loss(x, labels, squared=1), TypeError,
         "^batch_all_triplet_loss: squared must be a bool, got int"),
        (lambda: ek.cross_modal_triplet_loss(x, x, labels, labels, squared=None), TypeError,
         "^cross_modal_triplet_loss: squared must be a bool, got NoneType"),
        (lambda: ek.pairwise_distances(x, x, squared="no"), TypeError,
         "^pairwise_distances: squared must be a bool"),
        (lambda: ek.triplet_loss(x, x, x, swap="no"), TypeError,
         "^triplet_loss: swap must be a bool, got str"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# -------------------------------------------------------------------- contrastive

@pytest.mark.parametrize("B,E,block", [(1, 4, None), (7, 5, 3), (64, 16, 64), (130, 9, 17)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_contrastive_loss_matches_the_full_formula(B, E, block, symmetric, normalize):
    a = torch.randn(B, E, dtype=torch.float64)
    b = torch.randn(B, E, dtype=torch.float64)
    kwargs = dict(temperature=0.1, symmetric=symmetric, normalize=normalize)
    ours, ours_grads = grads_of(lambda u, v: ek.contrastive_loss(u, v, block=block, **kwargs),
                                a, b)
    theirs, their_grads = grads_of(lambda u, v: ref.contrastive_loss_reference(u, v, **kwargs),
                                   a, b)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for g, h in zip(ours_grads, their_grads):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_contrastive_loss_gradcheck_fp32_and_large_logits():
    a = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v: ek.contrastive_loss(u, v, 0.5, block=4), (a, b))
    # fp32 against fp64, and a tiny temperature (logits ~ 1e3) stays finite
    for temperature in (0.07, 1e-3):
        ours = ek.contrastive_loss(a.float(), b.float(), temperature, block=2)
        exact = ref.contrastive_loss_reference(a.detach(), b.detach(), temperature)
        assert torch.isfinite(ours)
        assert abs(ours.item() - exact.item()) <= 1e-4 * max(1.0, abs(exact.item()))
    # fp32 gradients of the slab-by-slab path (one exponential per slab when |logit| <= 1/T)
    a32, b32 = (torch.randn(40, 6) for _ in range(2))
    ours_loss, ours_grads = grads_of(lambda u, v: ek.contrastive_loss(u, v, 0.07, block=8),
                                     a32, b32)
    exact_loss, exact_grads = grads_of(lambda u, v: ref.contrastive_loss_reference(u, v, 0.07),
                                       a32.double(), b32.double())
    for g, h in zip(ours_grads, exact_grads):
        assert ((g.double() - h).abs().max() <= 1e-5 * h.abs().max()).item()


@pytest.mark.parametrize("block", [8, None])  # slab by slab; one slab
def test_contrastive_loss_under_autocast_and_create_graph(block):
    """Under fp16 / bf16 autocast the loss is still computed in fp32 (an fp16 slab's exp(L)
    would overflow past L = 11: inf at T = 0.07); create_graph=True gives the first-order
    gradients, and a second backward raises instead of returning a wrong Hessian."""
    a, b = torch.randn(64, 16), torch.randn(64, 16)
    exact = ek.contrastive_loss(a, b, 0.07, block=block)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            under = ek.contrastive_loss(a, b, 0.07, block=block)
        assert torch.isfinite(under) and abs(under.item() - exact.item()) <= 1e-5 * exact.item()
    u = a.clone().requires_grad_(True)
    loss = ek.contrastive_loss(u, b, 0.07, block=block)
    (g,) = torch.autograd.grad(loss, u, create_graph=True)
    (expected,) = torch.autograd.grad(ek.contrastive_loss(u, b, 0.07, block=block), u)
    torch.testing.assert_close(g, expected)
    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        torch.autograd.grad(g.sum(), u)


def test_contrastive_bad_input():
    a = torch.randn(5, 3)
    cases = [
        # a string or None for a flag: symmetric="no" ran as True, None as False
        (lambda: ek.contrastive_loss(a, a, symmetric="no"), TypeError,
         "^contrastive_loss: symmetric must be a bool, got str"),
        (lambda: ek.contrastive_loss(a, a, normalize=None), TypeError,
         "^contrastive_loss: normalize must be a bool, got NoneType"),
        (lambda: ek.contrastive_loss(a, a[:4]), ValueError, "b has shape"),
        (lambda: ek.contrastive_loss(a, a, temperature=0), ValueError, "temperature"),
        (lambda: ek.contrastive_loss(a, a, block=0), ValueError, "block"),
        (lambda: ek.contrastive_loss(a, a, temperature=True), TypeError,
         "^contrastive_loss: temperature must be a real number, got bool"),
        (lambda: ek.contrastive_loss(a, a, temperature=math.inf), ValueError,
         "temperature must be a finite number > 0, got inf"),
        (lambda: ek.contrastive_loss(a, a, block=2.0), TypeError, "block must be an int"),
        (lambda: ek.contrastive_loss(a, a, block=True), TypeError, "block must be an int"),
        (lambda: ek.contrastive_loss(a, a.double()), TypeError, "same dtype"),
        (lambda: ek.contrastive_loss(a[0], a[0]), ValueError, "a must be"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# -------------------------------------------------------------- gradient reversal

def test_gradient_reversal():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = ek.grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    upstream = torch.randn_like(x)
    (g,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(g, -0.3 * upstream, rtol=0, atol=0)
    layer = ek.GradientReversal(2.0)
    (g,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.equal(g, torch.full_like(x, -2.0))
    compiled = torch.compile(lambda t: ek.grad_reverse(t * 2, 0.5).sum(), fullgraph=True)
    (g,) = torch.autograd.grad(compiled(x), x)
    assert torch.equal(g, torch.full_like(x, -1.0))
    with pytest.raises(ValueError, match="lambda_"):
        ek.grad_reverse(x, float("nan"))
    with pytest.raises(TypeError, match="^grad_reverse: x must be a floating-point or complex "
                                        r"tensor \(its gradient is reversed\), got torch.int64"):
        ek.grad_reverse(torch.arange(3))
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    (g,) = torch.autograd.grad(ek.grad_reverse(z, 2.0).abs().sum(), z)
    (expected,) = torch.autograd.grad(z.abs().sum(), z)
    torch.testing.assert_close(g, -2.0 * expected)


# ---------------------------------------------------------------------- deep CCA

@pytest.mark.parametrize("n,d1,d2,k", [(50, 4, 3, None), (37, 6, 6, 2), (200, 10, 5, 5)])
def test_cca_loss_matches_the_eigendecomposition_formula(n, d1, d2, k):
    h1 = torch.randn(n, d1, dtype=torch.float64)
    h2 = h1[:, :d2] @ torch.randn(d2, d2, dtype=torch.float64) + 0.5 * torch.randn(
        n, d2, dtype=torch.float64)
    ours, ours_grads = grads_of(lambda u, v: ek.cca_loss(u, v, k=k), h1, h2)
    theirs, their_grads = grads_of(lambda u, v: ref.cca_loss_reference(u, v, k=k), h1, h2)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for g, h in zip(ours_grads, their_grads):
        torch.testing.assert_close(g, h, rtol=1e-7, atol=1e-9)
    assert -ours.item() <= (k or min(d1, d2)) + 1e-9  # correlations are <= 1


def test_cca_loss_is_stable_on_rank_deficient_batches():
    """8 samples of 20 features (rank 7) and duplicated columns: the eigendecomposition
    form's gradient divides by eigenvalue gaps (all eps here); ours stays finite."""
    h1 = torch.randn(8, 20, dtype=torch.float64)
    h1[:, 10:] = h1[:, :10]
    h2 = torch.randn(8, 20, dtype=torch.float64)
    ours, grads = grads_of(lambda u, v: ek.cca_loss(u, v, k=5), h1, h2)
    assert torch.isfinite(ours) and all(torch.isfinite(g).all() for g in grads)
    assert torch.autograd.gradcheck(lambda u, v: ek.cca_loss(u, v, k=3, eps=1e-2),
                                    (torch.randn(6, 4, dtype=torch.float64, requires_grad=True),
                                     torch.randn(6, 3, dtype=torch.float64, requires_grad=True)))
    value32 = ek.cca_loss(h1.float(), h2.float(), k=5)
    assert value32.dtype == torch.float32
    assert abs(value32.item() - ours.item()) <= 1e-5 * abs(ours.item())


def test_cca_bad_input():
    h = torch.randn(10, 4)
    cases = [
        (lambda: ek.cca_loss(h, h[:9]), ValueError, "same samples"),
        (lambda: ek.cca_loss(h[:1], h[:1]), ValueError, "at least 2"),
        (lambda: ek.cca_loss(h, h, k=5), ValueError, "k must be"),
        (lambda: ek.cca_loss(h, h, k=0), ValueError, "k must be"),
        (lambda: ek.cca_loss(h, h, eps=0), ValueError, "eps"),
        (lambda: ek.cca_loss(h, h, eps=math.inf), ValueError, "eps must be a finite"),
        (lambda: ek.cca_loss(h, h, eps=True), TypeError, "^cca_loss: eps must be a real number"),
        (lambda: ek.cca_loss(h.masked_fill(h > 1, math.nan), h), ValueError,
         "h1 contains NaN or inf"),
        (lambda: ek.cca_loss(h, h.double()), TypeError, "same dtype"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert math.isfinite(ek.cca_loss(h, h).item())


def test_alignment_losses_compile_fullgraph():
    """torch.compile(fullgraph=True) through the autograd Functions and the sort-based
    batch-all: same values and gradients as eager."""
    x, labels = labelled_batch(24, 5, 3)
    a = torch.randn(24, 5, dtype=torch.float64)

    def losses(t):
        return (ek.batch_all_triplet_loss(t, labels, 0.5) + ek.batch_hard_triplet_loss(t, labels)
                + ek.contrastive_loss(t, a, 0.2, block=7) + ek.contrastive_loss(t, a, 0.2)
                + ek.grad_reverse(t, 0.5).sum() + ek.cca_loss(t, a, k=2))

    compiled = torch.compile(losses, fullgraph=True)
    ours, ours_grad = grads_of(compiled, x)
    eager, eager_grad = grads_of(losses, x)
    torch.testing.assert_close(ours, eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad[0], eager_grad[0], rtol=1e-8, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_contrastive_loss_at_32768_stays_within_one_slab_on_gpu():
    """B = 32768, E = 256, fp32: the full logits would be 4 GiB (and as much again for
    their gradient); the blockwise loss needs the inputs, their gradients and one
    (block, B) slab with its temporaries."""
    B, E, block = 32768, 256, 512
    a = torch.randn(B, E, device="cuda", requires_grad=True)
    b = torch.randn(B, E, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = ek.contrastive_loss(a, b, 0.07, block=block)
    grads = torch.autograd.grad(loss, (a, b))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    slab = block * B * 4
    inputs = 2 * B * E * 4
    # the inputs, their normalised copies and gradients, and a few slab temporaries (the
    # slab, its exponentials, its gradient): far below the 4 GiB of the full logits
    assert peak <= 4 * inputs + 6 * slab, (peak / 2**20, slab / 2**20)
    # the blockwise path on the GPU against the plain formula, on 4096 of the rows
    exact = ref.contrastive_loss_reference(a.detach()[:4096].double(), b.detach()[:4096].double(),
                                           0.07)
    small = ek.contrastive_loss(a.detach()[:4096], b.detach()[:4096], 0.07, block=block)
    assert abs(small.item() - exact.item()) <= 1e-4 * abs(exact.item())
    assert all(torch.isfinite(g).all() for g in grads)


def test_cca_rank_deficient_at_a_large_scale_is_a_clear_error():
    """Duplicated features of scale 1e5 with eps = 1e-8: S11 + eps I is positive definite
    only in exact arithmetic; the error names h1 and says what to change (it was
    torch's bare 'not positive-definite')."""
    h1 = torch.randn(64, 10, dtype=torch.float64)
    h1[:, 5:] = h1[:, :5]
    h2 = torch.randn(64, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="covariance of h1 plus eps I is not positive definite"):
        ek.cca_loss(h1 * 1e5, h2, eps=1e-8)
    assert math.isfinite(ek.cca_loss(h1, h2, eps=1e-8).item())  # the same data at unit scale


def test_float_arguments_may_change_under_a_fullgraph_compile():
    """A schedule changes lambda_, the temperature or the margin between steps: the second
    distinct value makes it a symbolic float for torch.compile, which must still trace the
    argument checks (math.isfinite could not) and give eager's gradients."""
    x, labels = labelled_batch(12, 4, 3)
    a = torch.randn(12, 4, dtype=torch.float64)
    reversal = ek.GradientReversal(1.0)
    settings = {"value": 1.0}

    def losses(t):
        v = settings["value"]
        return ((reversal(t) * t).sum() + ek.contrastive_loss(t, a, 0.1 * v)
                + ek.batch_hard_triplet_loss(t, labels, margin=v))

    compiled = torch.compile(losses, fullgraph=True)
    for value in (1.0, 0.5, 0.25):
        settings["value"] = reversal.lambda_ = value
        ours, ours_grad = grads_of(compiled, x)
        eager, eager_grad = grads_of(losses, x)
        torch.testing.assert_close(ours, eager, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours_grad[0], eager_grad[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("temperature", [0.0125, 0.0249, 0.07])
@pytest.mark.parametrize("block", [None, 64])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_contrastive_fp32_is_precise_on_nearly_aligned_batches(temperature, block, symmetric,
                                                              normalize):
    """Late in training the batch is nearly aligned (p_ii -> 1) and CLIP's temperature is
    ~0.01: the loss is tiny and the gradient a small difference. fp32 must stay within 1e-4
    of fp64 (relative to the largest gradient entry) and the loss within 1e-3 relative (it
    was 8% / 150x off at T = 0.0125: the diagonal's softmax formed from the full sum)."""
    B, E = 256, 16
    base = torch.randn(B, E, dtype=torch.float64)
    a = base + 0.05 * torch.randn(B, E, dtype=torch.float64)
    b = base + 0.05 * torch.randn(B, E, dtype=torch.float64)
    if not normalize:  # unit rows anyway: the same logits without the bound
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    a, b = a.float().double(), b.float().double()  # the fp32 inputs, exactly
    a64, b64 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    expected = ref.contrastive_loss_reference(a64, b64, temperature, symmetric, normalize)
    expected_grads = torch.autograd.grad(expected, (a64, b64))
    a32, b32 = a.float().requires_grad_(True), b.float().requires_grad_(True)
    loss = ek.contrastive_loss(a32, b32, temperature, symmetric, normalize=normalize, block=block)
    grads = torch.autograd.grad(loss, (a32, b32))
    assert abs(loss.double().item() - expected.item()) <= 1e-3 * abs(expected.item())
    for got, want in zip(grads, expected_grads):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("margin", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("mining", ["hard", "all"])
def test_mined_triplets_at_exact_ties_match_the_reference(margin, mining):
    """Embeddings on an integer grid with squared distances: many triplets sit exactly at
    zero loss (d_ij + margin = d_ik). Batch-all counts only the positive ones, so those at
    zero pass no gradient (relu's derivative at 0), on the fast path and in the reference."""
    x = torch.randint(-2, 3, (12, 2)).double()
    labels = torch.randint(0, 3, (12,))
    fn = ek.batch_hard_triplet_loss if mining == "hard" else ek.batch_all_triplet_loss
    reference = ref.batch_hard_triplet_reference if mining == "hard" else \
        ref.batch_all_triplet_reference
    ours, ours_grad = grads_of(lambda t: fn(t, labels, margin=margin, squared=True), x)
    theirs, their_grad = grads_of(
        lambda t: reference(ref.pairwise_distances_reference(t, t, True), labels, labels,
                            margin, exclude_self=True), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad[0], their_grad[0], rtol=1e-10, atol=1e-12)


def test_triplet_loss_takes_torchs_unbatched_and_broadcast_inputs():
    """Unbatched (E,) triplets and a positive broadcast over the batch, as
    F.triplet_margin_loss accepts them: the same values and gradients."""
    x = torch.randn(5, 4, dtype=torch.float64)
    cases = [(x[0], x[1], x[2]), (x, x[:1], x.flip(0))]
    for anchor, positive, negative in cases:
        args = [t.clone().requires_grad_(True) for t in (anchor, positive, negative)]
        ours = ek.triplet_loss(*args, margin=0.7)
        grads = torch.autograd.grad(ours, args)
        twins = [t.clone().requires_grad_(True) for t in (anchor, positive, negative)]
        theirs = torch.nn.functional.triplet_margin_loss(*twins, margin=0.7)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        for g, h in zip(grads, torch.autograd.grad(theirs, twins)):
            torch.testing.assert_close(g, h, rtol=0, atol=0)


def test_meta_tensors_trace_through_the_losses():
    """Meta tensors (shape propagation, FakeTensor-style tracing): a meta result of the right
    shape, not torch.autocast("meta")'s "unsupported scalarType" or a host read of no data."""
    a, b = torch.randn(8, 4, device="meta"), torch.randn(8, 4, device="meta")
    for loss in (ek.contrastive_loss(a, b, 0.1), ek.contrastive_loss(a, b, 0.1, block=3),
                 ek.cca_loss(a, b)):
        assert loss.device.type == "meta" and loss.shape == ()
