"""AMSS / AMSS+: the update ratios against the spec's formula, the sampling laws (statistical
tests with fixed seeds and bounds that can fail), exact k, determinism, resumption, bad input,
and every fused backend (C++ on CPU, Triton on CUDA or under the interpreter) against the
reference."""

import math

import pytest
import torch

import ether_kernels as ek
from conftest import backend_params, is_interpreted
from ether_kernels import amss as amss_module
from ether_kernels.reference import amss as ref


def fused_params():
    """(device, backend) of every fused AMSS backend that can run here (GPU ones marked)."""
    available = {"cpp": bool(amss_module._CPU_BACKENDS), "triton": bool(amss_module._GPU_BACKENDS)}
    return [p for p in backend_params() if available.get(p.values[1], False)]


FUSED = fused_params()


# ------------------------------------------------------------------------ update ratios

def formula_ratios(logits, labels, features, T=0.2, c=0.5, bias=0.0, lo=0.1, hi=0.9):
    """The spec's formula, written out with plain loops in float64 (the test's own oracle)."""
    B, K = logits[0].shape
    counts = [sum(1 for y in labels.tolist() if y == k) for k in range(K)]
    HY = -sum((n / B) * math.log(n / B) for n in counts if n > 0)
    rates, numerators = [], []
    for out, z in zip(logits, features):
        ce = 0.0
        for b in range(B):
            row = out[b].double()
            ce += (torch.logsumexp(row, 0) - row[labels[b]]).item()
        info = HY - ce / B
        hz = 0.0
        for b in range(B):
            p = torch.softmax(z[b].double(), 0)
            hz += -(p * torch.log(p)).sum().item()
        numerators.append(info + c)
        rates.append((info + c) / (hz / B))
    if any(n <= 0 for n in numerators):
        return [0.5] * len(logits)
    exps = [math.exp(r / T - max(rates) / T) for r in rates]
    return [min(hi, max(lo, 1 - e / sum(exps) + bias)) for e in exps]


@pytest.mark.parametrize("M", [2, 3])
def test_update_ratios_match_the_formula(M):
    B, K, F = 24, 4, 6
    labels = torch.randint(0, K, (B,))
    logits = [torch.randn(B, K) * s for s in (0.5, 1.0, 2.0)[:M]]
    # make the labels informative for each modality, to varying degrees
    for m in range(M):
        logits[m][torch.arange(B), labels] += 2.0 + m
    features = [torch.randn(B, F) for _ in range(M)]
    rho = ek.amss.update_ratios(logits, labels, features)
    assert rho.dtype == torch.float32 and rho.shape == (M,)
    expected = formula_ratios(logits, labels, features)
    torch.testing.assert_close(rho.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_update_ratios_fall_back_to_one_half():
    B, K = 16, 3
    labels = torch.randint(0, K, (B,))
    good = torch.randn(B, K)
    good[torch.arange(B), labels] += 5
    bad = torch.randn(B, K)
    bad[torch.arange(B), labels] -= 30  # CE far above H(Y) + c: I + c <= 0
    features = [torch.randn(B, 5), torch.randn(B, 5)]
    assert ek.amss.update_ratios([good, bad], labels, features).tolist() == [0.5, 0.5]
    nan_features = [features[0], torch.full((B, 5), float("nan"))]
    assert ek.amss.update_ratios([good, good], labels, nan_features).tolist() == [0.5, 0.5]
    # a feature entropy of exactly 0 (F = 1: softmax of one value is 1) makes r infinite,
    # which is the fallback's case; its -0.0 must not turn r into -inf (rho 0.9 for it)
    for other in (good, bad * 0.01):
        single = [torch.randn(B, 1), features[1]]
        assert ek.amss.update_ratios([good, other], labels, single).tolist() == [0.5, 0.5]


def test_update_ratios_bad_input():
    labels = torch.randint(0, 3, (8,))
    x = [torch.randn(8, 3)]
    z = [torch.randn(8, 4)]
    with pytest.raises(ValueError, match="features"):
        ek.amss.update_ratios(x, labels, z + z)
    with pytest.raises(ValueError, match="temperature"):
        ek.amss.update_ratios(x, labels, z, temperature=0)
    with pytest.raises(ValueError, match="clip"):
        ek.amss.update_ratios(x, labels, z, clip=(0.9, 0.1))
    # a tensor or a string was reported as "temperature must be > 0, got 0.2"
    with pytest.raises(TypeError, match="update_ratios: temperature must be a real number, got Tensor"):
        ek.amss.update_ratios(x, labels, z, temperature=torch.tensor(0.2))
    with pytest.raises(TypeError, match="temperature must be a real number, got str"):
        ek.amss.update_ratios(x, labels, z, temperature="0.2")
    with pytest.raises(ValueError, match="temperature must be finite, got inf"):
        ek.amss.update_ratios(x, labels, z, temperature=math.inf)
    with pytest.raises(ValueError, match="offset must be finite, got nan"):
        ek.amss.update_ratios(x, labels, z, offset=math.nan)
    with pytest.raises(TypeError, match="bias must be a real number, got NoneType"):
        ek.amss.update_ratios(x, labels, z, bias=None)
    with pytest.raises(ValueError, match="clip must be a pair"):
        ek.amss.update_ratios(x, labels, z, clip="ab")
    with pytest.raises(TypeError, match="clip must be a real number, got str"):
        ek.amss.update_ratios(x, labels, z, clip=("a", 0.5))
    with pytest.raises(TypeError, match="labels"):
        ek.amss.update_ratios(x, labels.float(), z)
    with pytest.raises(ValueError, match=r"logits\[0\]"):
        ek.amss.update_ratios([torch.randn(7, 3)], labels, z)
    # a label outside [0, K) (or cross_entropy's ignore_index) was an indexing error
    for bad in (3, -100):
        wrong = labels.clone()
        wrong[5] = bad
        with pytest.raises(ValueError, match=rf"update_ratios: labels must be class indices in "
                                             rf"\[0, 3\), got {bad}"):
            ek.amss.update_ratios(x, wrong, z)


# ------------------------------------------------------------------------ sampling laws

def masks_over_steps(mode, q, k, steps, scaling=None, seed=3):
    """(steps, N) factors of one tensor whose unit importances are q (rows of norm sqrt q)."""
    n = q.numel()
    rows = []
    for step in range(steps):
        grad = torch.sqrt(q).view(n, 1).repeat(1, 2).double() / math.sqrt(2)
        ek.amss.mask_gradients([[grad]], [k / n], mode=mode, scaling=scaling, seed=seed, step=step)
        rows.append(grad[:, 0] / (torch.sqrt(q) / math.sqrt(2)))
    return torch.stack(rows)


def test_amss_inclusion_law_matches_multinomial_without_replacement():
    torch.manual_seed(0)  # a fixed law, so that the bound below is a fixed-size test
    q = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
    k, steps = 3, 3000
    ours = (masks_over_steps("amss", q, k, steps) > 0).double().mean(0)
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([torch.multinomial(q, k, replacement=False, generator=generator)
                         for _ in range(steps)])
    theirs = torch.zeros(q.numel(), dtype=torch.float64)
    for j in range(q.numel()):
        theirs[j] = (draws == j).any(dim=1).double().mean()
    sigma = torch.sqrt(theirs * (1 - theirs) * 2 / steps)
    assert ((ours - theirs).abs() <= 5 * sigma + 1e-3).all(), (ours, theirs)
    # and the law is not the uniform one (the test can tell them apart)
    assert ours[0] > 0.75 and ours[-1] < 0.25


def test_uniform_ignores_importance_and_topk_keeps_the_largest():
    q = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02], dtype=torch.float64)
    freq = (masks_over_steps("uniform", q, 2, 3000) > 0).double().mean(0)
    assert ((freq - 2 / 6).abs() < 5 * math.sqrt((1 / 3) * (2 / 3) / 3000)).all(), freq
    top = masks_over_steps("topk", q, 2, 3)
    assert (top[:, :2] == 1).all() and (top[:, 2:] == 0).all()


@pytest.mark.parametrize("device,backend", [("cpu", "reference")] + FUSED)
@pytest.mark.parametrize("mode,scaling", [("amss", None), ("uniform", None), ("topk", None),
                                          ("amss+", "paper"), ("amss+", "reference-code")])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_exactly_ceil_rho_n_units_are_kept(device, backend, mode, scaling, ratio):
    grads = [torch.randn(37, 5), torch.randn(8, 3, 3), torch.randn(1, 4),
             torch.randn(60 if is_interpreted(device, backend) else 3000)]
    grads = [g.to(device) for g in grads]
    with ek.use_backend(backend):
        ek.amss.mask_gradients([grads], [ratio], mode=mode, scaling=scaling, seed=5, step=2)
    for g in grads:
        kept = (g.reshape(g.shape[0], -1).abs().sum(1) > 0).sum().item()
        assert kept == math.ceil(ratio * g.shape[0] - 1e-9), (g.shape, kept)


def test_amss_plus_paper_scaling_is_unbiased():
    q = torch.tensor([0.35, 0.3, 0.2, 0.1, 0.04, 0.01], dtype=torch.float64)
    steps = 4000
    factors = masks_over_steps("amss+", q, 2, steps, scaling="paper")
    mean = factors.mean(0)  # E[factor] = 1 for every unit when the estimate is unbiased
    pi = ref.inclusion_probabilities(q, 2)
    sigma = torch.sqrt((1 - pi) / pi / steps)  # sd of the mean of 1[kept] / pi
    assert ((mean - 1).abs() <= 5 * sigma).all(), (mean, pi)
    # the reference-code scaling 1 / (q_j + 1 / N) is not unbiased: E[factor] is far from 1
    biased = masks_over_steps("amss+", q, 2, 500, scaling="reference-code").mean(0)
    assert ((biased - 1).abs() > 0.3).any(), biased


def test_reference_code_scaling_factor():
    grad = torch.randn(10, 4, dtype=torch.float64)
    q = ref.unit_importance(grad)
    masked = grad.clone()
    ek.amss.mask_gradients([[masked]], [0.4], mode="amss+", scaling="reference-code", seed=1)
    kept = masked.abs().sum(1) > 0
    assert kept.sum() == 4
    torch.testing.assert_close(masked[kept], grad[kept] / (q[kept] + 0.1)[:, None])


# ------------------------------------------------------------ masker, determinism, input

def two_encoders():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 12), torch.nn.Conv1d(3, 8, 3)


def backward(a, v):
    x, s = torch.randn(5, 6), torch.randn(5, 3, 10)
    (a(x).pow(2).sum() + v(s).pow(2).sum()).backward()


def test_masker_is_deterministic_and_resumable():
    a, v = two_encoders()
    backward(a, v)
    grads = [p.grad.clone() for p in list(a.parameters()) + list(v.parameters())]
    results = []
    for _ in range(2):
        for p, g in zip(list(a.parameters()) + list(v.parameters()), grads):
            p.grad = g.clone()
        masker = ek.amss.SubnetworkMasker({"audio": a.parameters(), "video": v.parameters()},
                                          seed=11)
        masker.step([0.5, 0.25])
        results.append([p.grad.clone() for p in list(a.parameters()) + list(v.parameters())])
    for x, y in zip(*results):
        assert torch.equal(x, y)
    # resuming at step 1 reproduces step 1's masks; step 1 differs from step 0
    state = masker.state_dict()
    assert state["step"] == 1
    for p, g in zip(list(a.parameters()) + list(v.parameters()), grads):
        p.grad = g.clone()
    masker.step([0.5, 0.25])
    step1 = [p.grad.clone() for p in list(a.parameters()) + list(v.parameters())]
    resumed = ek.amss.SubnetworkMasker({"audio": a.parameters(), "video": v.parameters()}, seed=0)
    resumed.load_state_dict(state)
    for p, g in zip(list(a.parameters()) + list(v.parameters()), grads):
        p.grad = g.clone()
    resumed.step([0.5, 0.25])
    for x, y in zip(step1, [p.grad for p in list(a.parameters()) + list(v.parameters())]):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(results[0], step1))


def test_unit_size_groups_rows_into_units():
    grad = torch.randn(12, 5)  # 4 heads of 3 rows
    ek.amss.mask_gradients([[grad]], [0.5], mode="topk", unit_size=3)
    heads = grad.view(4, 3, 5).abs().sum((1, 2)) > 0
    assert heads.sum() == 2
    assert all(((grad.view(4, 3, 5)[h] != 0).all() if keep else (grad.view(4, 3, 5)[h] == 0).all())
               for h, keep in enumerate(heads.tolist()))


def test_masker_bad_input():
    a, v = two_encoders()
    masker = ek.amss.SubnetworkMasker([a.parameters(), v.parameters()])
    with pytest.raises(RuntimeError, match="has no .grad"):
        masker.step([0.5, 0.5])
    backward(a, v)
    with pytest.raises(ValueError, match="outside"):
        masker.step([0.5, 1.5])
    with pytest.raises(ValueError, match="2 modalities"):
        masker.step([0.5])
    with pytest.raises(ValueError, match="unit_dim"):
        ek.amss.SubnetworkMasker([a.parameters()], unit_dim=3)
    with pytest.raises(ValueError, match="mode"):
        ek.amss.SubnetworkMasker([a.parameters()], mode="random")
    with pytest.raises(ValueError, match="scaling"):
        ek.amss.SubnetworkMasker([a.parameters()], mode="amss", scaling="paper")
    with pytest.raises(ValueError, match="scaling"):
        ek.amss.SubnetworkMasker([a.parameters()], mode="amss+", scaling="exact")
    with pytest.raises(ValueError, match="unit_size"):
        ek.amss.SubnetworkMasker([a.parameters()], unit_size=5)
    with pytest.raises(ValueError, match="mode"):
        ek.amss.SubnetworkMasker([a.parameters()], mode="amss+").load_state_dict(
            ek.amss.SubnetworkMasker([a.parameters()]).state_dict())


def test_ratios_units_and_groups_are_checked_by_type():
    a, v = two_encoders()
    backward(a, v)
    masker = ek.amss.SubnetworkMasker([a.parameters(), v.parameters()])
    # ratios: 0-d tensors and numpy-like numbers are numbers; other things are refused
    masker.step([torch.tensor(0.5), torch.tensor(0.25, dtype=torch.float64)])
    masker.step(torch.tensor([0.5, 0.25]))
    masker.step(torch.tensor([[0.5], [0.25]]))  # any shape of M values
    for bad, error, match in ((0.5, TypeError, "ratios must be 2 numbers"),
                              ("0.5", TypeError, "ratios must be 2 numbers"),
                              ([True, 0.5], TypeError, r"ratios\[0\] must be a number"),
                              (["0.5", 0.5], TypeError, r"ratios\[0\] must be a number"),
                              (torch.ones(2, dtype=torch.bool), TypeError, "real tensor"),
                              ([float("nan"), 0.5], ValueError, "outside")):
        with pytest.raises(error, match=match):
            masker.step(bad)
    for kwargs, error, match in ((dict(unit_dim=0.0), TypeError, "unit_dim must be an int"),
                                 (dict(unit_size=True), TypeError, "unit_size must be an int"),
                                 (dict(unit_size=0), ValueError, "unit_size must be an int >= 1")):
        with pytest.raises(error, match=match):
            ek.amss.SubnetworkMasker([a.parameters()], **kwargs)
        with pytest.raises(error, match=match):
            ek.amss.mask_gradients([[torch.randn(4, 2)]], [0.5], **kwargs)
    # a bare tensor as a group would be iterated row by row: refused
    with pytest.raises(TypeError, match=r"groups\[0\] must be an iterable of tensors"):
        ek.amss.SubnetworkMasker([a.weight])
    with pytest.raises(TypeError, match="wrap it in a list"):
        ek.amss.mask_gradients(torch.randn(4, 2), [0.5])
    with pytest.raises(TypeError, match=r"params_per_group\[0\] must be an iterable"):
        ek.amss.masked_sgd_step([a.weight], [0.5], lr=0.1)


def test_a_tensor_twice_is_refused_before_anything_changes():
    """One parameter in two modalities (or twice in one) would be masked or stepped twice,
    and the backends would disagree: a clear error, and no gradient is touched."""
    a, v = two_encoders()
    with pytest.raises(ValueError, match="same tensor twice"):
        ek.amss.SubnetworkMasker({"audio": [a.weight, a.bias], "video": [a.weight]})
    with pytest.raises(ValueError, match="same tensor twice"):
        ek.amss.SubnetworkMasker([[a.weight, a.weight]])
    grad = torch.randn(10, 3)
    before = grad.clone()
    with pytest.raises(ValueError, match="same tensor twice"):
        ek.amss.mask_gradients([[grad], [grad]], [0.5, 0.5])
    assert torch.equal(grad, before)
    with pytest.raises(TypeError, match="must be a floating-point tensor"):  # not "twice"
        ek.amss.mask_gradients([[None, None]], [0.5])
    params = params_with_grads()
    values = [p.clone() for p in params]
    with pytest.raises(ValueError, match="same tensor twice"):
        ek.amss.masked_sgd_step([params, params[:1]], [1.0, 1.0], lr=0.1)
    assert all(torch.equal(p, q) for p, q in zip(params, values))


def test_sparse_gradients_are_refused_before_any_gradient_changes():
    dense = torch.randn(6, 3)
    sparse = torch.randn(5, 2).to_sparse()
    before = dense.clone()
    with ek.use_backend("reference"):  # the per-tensor loop: it would have masked `dense`
        with pytest.raises(TypeError, match=r"grads_per_group\[0\]\[1\] must be a dense"):
            ek.amss.mask_gradients([[dense, sparse]], [0.5])
    assert torch.equal(dense, before)
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2, 3])).sum().backward()
    masker = ek.amss.SubnetworkMasker([embedding.parameters()])
    with pytest.raises(TypeError, match="must be a dense"):
        masker.step([0.5])
    with pytest.raises(TypeError, match="must be a dense"):
        ek.amss.masked_sgd_step([embedding.parameters()], [0.5], lr=0.1)


def test_state_dict_records_the_layout_and_load_checks_it():
    a, v = two_encoders()
    masker = ek.amss.SubnetworkMasker([a.parameters(), v.parameters()], seed=5)
    backward(a, v)
    masker.step([0.5, 0.5])
    state = masker.state_dict()
    assert state["units"] == [[12, 12], [8, 8]] and state["unit_size"] == 1
    same = ek.amss.SubnetworkMasker([a.parameters(), v.parameters()])
    same.load_state_dict(state)
    assert same.step_count == 1 and same.seed == 5
    other = ek.amss.SubnetworkMasker([v.parameters(), a.parameters()])
    with pytest.raises(ValueError, match="units"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        same.load_state_dict({"seed": 1, "mode": "amss", "scaling": "paper"})
    with pytest.raises(ValueError, match=r"state\['step'\] must be an int >= 0"):
        same.load_state_dict(dict(state, step=-1))
    with pytest.raises(TypeError, match=r"state\['seed'\] must be an int"):
        same.load_state_dict(dict(state, step=7, seed="5"))
    assert same.step_count == 1  # a refused state changes nothing
    old_format = {k: state[k] for k in ("step", "seed", "mode", "scaling")}
    other.load_state_dict(old_format)  # states saved before the layout was recorded
    assert other.step_count == 1


def test_a_ratio_of_one_keeps_every_unit_of_a_huge_tensor():
    from ether_kernels.reference.amss import kept_units
    n = 2**25 + 3
    assert kept_units(1.0, n) == n
    assert kept_units(0.3, 10) == 3 and kept_units(float(torch.tensor(0.3)), 10) == 3  # fp32
    assert kept_units(0.0, n) == 0


@pytest.mark.skipif(not amss_module._CPU_BACKENDS, reason="the C++ extension is not built")
def test_cpp_masks_do_not_depend_on_the_thread_count():
    grads = [torch.randn(300, 7), torch.randn(64, 3, 3), torch.randn(5)]
    results = []
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            copies = [g.clone() for g in grads]
            with ek.use_backend("cpp"):
                ek.amss.mask_gradients([copies[:2], copies[2:]], [0.3, 0.6], mode="amss+",
                                       seed=9, step=4)
            results.append(copies)
    finally:
        torch.set_num_threads(threads_before)
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_seeds_beyond_int63_and_empty_tensors():
    grads = [torch.randn(10, 3), torch.randn(0, 3)]
    results = []
    for backend in ["reference"] + (["cpp"] if amss_module._CPU_BACKENDS else []):
        copies = [g.clone() for g in grads]
        with ek.use_backend(backend):
            ek.amss.mask_gradients([copies], [0.5], seed=2**64 - 3, step=2**40)
        results.append(copies)
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0])


def test_generator_is_a_pure_function_of_its_keys():
    units = torch.arange(1000)
    u = ref.uniform(7, 3, 2, units)
    assert torch.equal(u, ref.uniform(7, 3, 2, units))
    assert not torch.equal(u, ref.uniform(7, 4, 2, units))
    assert not torch.equal(u, ref.uniform(8, 3, 2, units))
    assert (u > 0).all() and (u < 1).all()
    # roughly uniform: every decile holds 10% +- 5 sigma
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert ((counts - 100).abs() < 5 * math.sqrt(100 * 0.9)).all()
    # the hash is a bijection on 32-bit words (no collisions among 2^16 inputs)
    assert ref.mix32(torch.arange(1 << 16)).unique().numel() == 1 << 16


# ------------------------------------------------------------- the fused C++ kernel

needs_cpp = pytest.mark.skipif(not amss_module._CPU_BACKENDS,
                               reason="the C++ extension is not built")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("mode,scaling", [("amss", None), ("uniform", None), ("topk", None),
                                          ("amss+", "paper"), ("amss+", "reference-code")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("unit_size", [1, 2])
def test_fused_equals_the_reference(device, backend, mode, scaling, dtype, unit_size):
    """Same generator, same selection: the fused op keeps exactly the reference's units, with
    bit-identical values for the unscaled modes; AMSS+'s factors (1 / pi, 1 / (q + 1/N)) are
    formed from importance sums accumulated in another order, so they agree to rounding.
    Mixed dtypes and an empty tensor in one step; a few dominant units so that AMSS+ caps
    inclusion probabilities (over several rounds of the reference's loop)."""
    shapes = [(64, 3, 3, 3), (18, 7), (0, 3), (2, 5), (40,), (128, 4, 3, 3)]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads[1][3] = 0.0  # an all-zero unit
    grads[0][:4] *= 30.0  # dominant units: pi capped at 1
    grads[5][7] *= 12.0
    grads[4] = grads[4].to(torch.float32)  # another dtype in the same step
    groups = [grads[:2], grads[2:]]
    ratios = [0.37, 0.8]
    results = {}
    for name in (backend, "reference"):
        copies = [[g.clone() for g in group] for group in groups]
        with ek.use_backend(name):
            ek.amss.mask_gradients(copies, ratios, mode=mode, scaling=scaling, seed=123,
                                   step=9, unit_size=unit_size)
        results[name] = copies
    for a, b in zip(sum(results[backend], []), sum(results["reference"], [])):
        assert torch.equal(a == 0, b == 0)  # the same units kept
        if mode == "amss+":
            # The factor (fp64) differs from the reference's in its last bits; the product
            # rounded to a narrower dtype then lands on the same value or, when it sits at a
            # rounding boundary, on the neighbouring one: at most one ulp of the dtype.
            ulp = 1e-12 if a.dtype == torch.float64 else torch.finfo(a.dtype).eps
            assert ((a.double() - b.double()).abs() <= ulp * b.double().abs()).all()
        else:
            assert torch.equal(a, b)


@pytest.mark.skipif(not amss_module._GPU_BACKENDS, reason="triton is not importable")
def test_closed_form_inclusion_probabilities_match_the_reference_loop():
    """The Triton path computes the capped pi in closed form, all tensors at once; the
    reference caps in rounds. Heavy-tailed importances (several rounds), ties, every k."""
    from ether_kernels.triton.amss import capped_inclusion_probabilities
    for trial in range(30):
        n = int(torch.randint(2, 40, ()).item())
        q = torch.rand(n, dtype=torch.float64) ** 8 + 1e-9 * (trial % 2)
        if trial % 3 == 0:
            q[: n // 2] = q.max()  # ties among the largest
        q = q / q.sum()
        for k in range(n + 1):
            expected = ref.inclusion_probabilities(q, k)
            pi = capped_inclusion_probabilities(q[None], torch.tensor([[k]]))[0]
            torch.testing.assert_close(pi, expected, rtol=1e-12, atol=1e-15)
            assert abs(pi.sum().item() - k) < 1e-9 and (pi <= 1).all()


@pytest.mark.parametrize("batched_selection", [False, True], ids=["fused-select", "batched-select"])
@pytest.mark.parametrize("device,backend", FUSED)
def test_nan_and_inf_gradients_keep_the_reference_units(device, backend, batched_selection,
                                                        monkeypatch):
    """A NaN or inf gradient makes every q of its tensor NaN: the keys rank as in a stable
    sort (NaN first, ties to the lower index), AMSS+ "paper" keeps nothing (NaN pi); every
    backend keeps the reference's units and raises nothing. batched-select: the Triton
    path's torch-op selection for wide tensors (whose sorts place NaN by device)."""
    if batched_selection:
        if backend != "triton":
            pytest.skip("the batched selection is the Triton path's")
        monkeypatch.setattr(ek.amss._triton_amss, "MAX_FUSED_SELECT_UNITS", 4)
    modes = (("amss", None), ("amss+", "paper"), ("amss+", "reference-code"),
             ("uniform", None), ("topk", None))
    # The bad value in every row of h in turn (a row inside the first k by chance says
    # nothing about the order), NaN and inf alike
    for position in range(6):
        bad = float("inf") if position % 2 == 0 else float("nan")
        g0 = torch.randn(10, 3, dtype=torch.float64)
        g0[(3 * position + 4) % 10, 1] = float("nan")
        h0 = torch.randn(6, 2, dtype=torch.float64)
        h0[position, 0] = bad
        for mode, scaling in modes:
            kept = {}
            for name in (backend, "reference"):
                g, h = g0.clone().to(device), h0.clone().to(device)
                with ek.use_backend(name):
                    ek.amss.mask_gradients([[g], [h]], [0.4, 0.5], mode=mode, scaling=scaling,
                                           seed=3, step=position)
                kept[name] = [(x.reshape(x.shape[0], -1) != 0).any(1).tolist() for x in (g, h)]
            assert kept[backend] == kept["reference"], (mode, scaling, position, bad)


def at_an_odd_address(x):
    """A contiguous copy of x one element into its storage: not on a 16-byte boundary."""
    y = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)
    return y.copy_(x)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] == "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_triton_vector_and_scalar_branches_equal_the_reference(device, backend, dtype):
    """The Triton kernels access a tensor in 16-byte vectors when it starts on a 16-byte
    boundary and its unit length is a multiple of 16 / element size, element by element
    otherwise. Units of 3 (scalar), 4 (vectors in fp32 / fp64), 4 at an odd address
    (scalar), 8 (vectors in every dtype): both branches of the importance, apply (zeros
    without reading, rescaling) and SGD kernels against the reference."""
    shapes = [(6, 3), (8, 4), (8, 4), (4, 8)]

    def tensors(seed, odd):
        torch.manual_seed(seed)
        xs = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
        return [at_an_odd_address(x) if odd and t == 2 else x for t, x in enumerate(xs)]

    for mode, scaling in (("amss", None), ("amss+", "reference-code")):
        results = {}
        for name in (backend, "reference"):
            grads = tensors(0, odd=name == backend)
            with ek.use_backend(name):
                ek.amss.mask_gradients([grads[:2], grads[2:]], [0.5, 0.6], mode=mode,
                                       scaling=scaling, seed=5, step=1)
            results[name] = grads
        assert results[backend][2].data_ptr() % 16 != 0
        for a, b in zip(results[backend], results["reference"]):
            assert torch.equal(a == 0, b == 0)
            if mode == "amss+":  # the factors agree to rounding (test_fused_equals_the_reference)
                ulp = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
                assert ((a.double() - b.double()).abs() <= ulp * b.double().abs()).all()
            else:
                assert torch.equal(a, b)
    if dtype == torch.float16:
        return
    results = {}
    for name in (backend, "reference"):
        params = [torch.nn.Parameter(x) for x in tensors(1, odd=name == backend)]
        for p, g in zip(params, tensors(2, odd=name == backend)):
            p.grad = g
        buffers = None
        for step in range(2):
            with ek.use_backend(name):
                buffers = ek.amss.masked_sgd_step([params[:2], params[2:]], [0.5, 0.6], lr=0.05,
                                                  momentum=0.9, weight_decay=0.01, seed=3,
                                                  step=step, momentum_buffers=buffers)
        results[name] = params + sum(buffers, [])
    for a, b in zip(results[backend], results["reference"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] == "triton"])
def test_triton_selection_kernel_equals_the_batched_torch_selection(device, backend):
    """Stage 2 has two implementations: one kernel ranking units pairwise (tensors of up to
    MAX_FUSED_SELECT_UNITS units) and batched torch sorts (larger ones). The same factors
    from both, every mode, on tensors of 1 to 300 units with zero gradients (all q equal:
    ties), dominant units (AMSS+ caps), and every kind of k (0, 1, n - 1, n)."""
    from ether_kernels.triton import amss as triton_amss
    rows = [1, 2, 7, 16, 17, 64, 300, 9]
    grads = [torch.randn(n, 3, device=device, dtype=torch.float64) for n in rows]
    grads[2].zero_()
    grads[5][:5] *= 1e3
    grads[6][::7] *= 50.0
    grads[7][4, 1] = float("nan")  # every q of that tensor NaN: torch.sort / clamp semantics
    plan = triton_amss._plan_for(grads, 1)
    addresses = triton_amss._to_device([grads[t].data_ptr() for t in plan.slots], torch.int64,
                                       grads[0].device)
    work = triton_amss._Workspace(plan, paper=True)
    for step in range(3):
        triton_amss._importance(grads, plan, addresses, seed=5, step=step, work=work)
        for ratio_of in (lambda n: 0.0, lambda n: 1.0, lambda n: 1.0 / n,
                         lambda n: (n - 1) / n, lambda n: 0.37 + 0.1 * step):
            ks = [ref.kept_units(ratio_of(n), n) for n in plan.num_units]
            k = triton_amss._to_device(ks, torch.int64, plan.device)
            for mode, scaling in (("amss", "paper"), ("amss+", "paper"),
                                  ("amss+", "reference-code"), ("uniform", "paper"),
                                  ("topk", "paper")):
                fused = triton_amss._factors(plan, work, k, mode, scaling)
                batched = triton_amss._factors_batched(plan, work.u, work.noise, work.start, k,
                                                       mode, scaling)
                assert torch.equal(fused != 0, batched != 0), (mode, scaling, ks)
                torch.testing.assert_close(fused, batched, rtol=1e-12, atol=0, equal_nan=True)
                kept = [int((f != 0).sum()) for f in fused.split(plan.num_units)]
                # exactly k everywhere, but AMSS+ "paper" keeps nothing of the NaN tensor
                # (its pi are NaN), like the reference
                nan_kept = 0 if (mode, scaling) == ("amss+", "paper") else ks[-1]
                assert kept == ks[:-1] + [nan_kept], (mode, scaling)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] == "triton"])
def test_triton_eager_steps_bump_the_version_counters(device, backend):
    """In eager mode the Triton step runs without the custom op's dispatch; it still tells
    autograd that the gradients (mask) or parameters and buffers (SGD) changed in place."""
    grads = [torch.randn(6, 4, device=device), torch.randn(5, device=device)]
    before = [g._version for g in grads]
    with ek.use_backend(backend):
        ek.amss.mask_gradients([grads[:1], grads[1:]], [0.5, 0.5], seed=3)
    assert all(g._version > v for g, v in zip(grads, before))
    params = [torch.nn.Parameter(torch.randn(6, 4, device=device))]
    params[0].grad = torch.randn(6, 4, device=device)
    with ek.use_backend(backend):
        buffers = ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=0.9)
    before = (params[0]._version, buffers[0][0]._version)
    with ek.use_backend(backend):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=0.9, momentum_buffers=buffers)
    assert params[0]._version > before[0] and buffers[0][0]._version > before[1]


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] == "triton"])
def test_triton_step_under_tracing_records_the_op(device, backend):
    """Eager steps skip the op's dispatch; traced ones (fake tensors) must still go through
    the op, or tracing would read the data of fake tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(g0, g1):
        with ek.use_backend(backend):
            ek.amss.mask_gradients([[g0], [g1]], [0.5, 0.5], seed=1)
        return g0, g1

    graph = make_fx(step, tracing_mode="fake")(torch.randn(6, 4, device=device),
                                               torch.randn(5, 3, device=device))
    assert "amss_mask_gradients_triton" in str(graph.graph)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] == "triton"])
def test_triton_opcheck_and_argument_checks(device, backend):
    ops = torch.ops.ether_kernels
    grads = [torch.randn(6, 4, device=device), torch.randn(10, device=device)]
    torch.library.opcheck(ops.amss_mask_gradients_triton,
                          ([g.clone() for g in grads], [0, 1], [0.5, 0.3], 0, 0, 1, 2, 1))
    g = [torch.randn(6, 3, device=device), torch.randn(4, device=device)]
    cases = [
        (lambda: ops.amss_mask_gradients_triton(g, [0], [0.5], 0, 0, 0, 0, 1),
         r"group_of_tensor must give"),
        (lambda: ops.amss_mask_gradients_triton(g, [0, 1], [0.5], 0, 0, 0, 0, 1), r"has no ratio"),
        (lambda: ops.amss_mask_gradients_triton(g, [0, 0], [1.5], 0, 0, 0, 0, 1),
         r"outside \[0, 1\]"),
        (lambda: ops.amss_mask_gradients_triton(g, [0, 0], [0.5], 7, 0, 0, 0, 1),
         r"sampling must be"),
        (lambda: ops.amss_mask_gradients_triton([torch.randn(3, 4, device=device).t()], [0],
                                                [0.5], 0, 0, 0, 0, 1), r"contiguous"),
        (lambda: ops.amss_mask_gradients_triton([torch.randn(5, 2, device=device)], [0], [0.5],
                                                0, 0, 0, 0, 2), r"not a multiple of unit_size"),
        (lambda: ops.amss_masked_sgd_step_triton(g, g, [], [], [0, 0], [0.5], 0, 0, 0, 0, 1, 0.1,
                                                 0.9, 0.0, 0.0, False),
         r"one buffer and one fresh flag"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
    # with the triton backend forced, what it cannot run is an error, not a silent fallback
    with ek.use_backend("triton"), pytest.raises(ek.BackendUnavailableError, match="contiguous"):
        ek.amss.mask_gradients([[torch.randn(4, 8, device=device).t()]], [0.5])


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and amss_module._GPU_BACKENDS),
                    reason="needs a GPU and triton")
def test_triton_step_never_synchronises_with_the_host():
    """The fused GPU step queues everything: no .item(), no blocking copy (ratios given as
    floats), so the host never waits for the backward pass."""
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda") for s in ((64, 3, 3, 3), (32, 16), (10,))]
    for p in params:
        p.grad = torch.randn_like(p)
    for mode, scaling in (("amss", None), ("amss+", "paper"), ("amss+", "reference-code"),
                          ("topk", None), ("uniform", None)):
        ek.amss.mask_gradients([[p.grad for p in params]], [0.4], mode=mode, scaling=scaling)
    buffers = ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=0.9)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode, scaling in (("amss", None), ("amss+", "paper"), ("amss+", "reference-code"),
                              ("topk", None), ("uniform", None)):
            ek.amss.mask_gradients([[p.grad for p in params]], [0.4], mode=mode,
                                   scaling=scaling, step=3)
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=0.9,
                                momentum_buffers=buffers, step=4)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cpp
def test_fused_cpp_opcheck_and_user_tensors():
    grads = [torch.randn(6, 4), torch.randn(10)]
    torch.library.opcheck(torch.ops.ether_kernels.amss_mask_gradients,
                          ([g.clone() for g in grads], [0, 1], [0.5, 0.3], 0, 0, 1, 2, 1))
    # a non-contiguous gradient is masked correctly too (by the reference)
    base = torch.randn(4, 8)
    transposed = base.t()
    expected = transposed.contiguous()
    ek.amss.mask_gradients([[transposed]], [0.5], mode="topk")
    ek.amss.mask_gradients([[expected]], [0.5], mode="topk")
    assert torch.equal(transposed, expected)
    with ek.use_backend("cpp"), pytest.raises(ek.BackendUnavailableError, match="contiguous"):
        ek.amss.mask_gradients([[base.t()]], [0.5])


# ------------------------------------------------------------------- masked_sgd_step

SGD_OPTIONS = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
               dict(momentum=0.8, dampening=0.3, weight_decay=0.01), dict(weight_decay=0.1)]


def params_with_grads(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    params = [torch.randn(12, 5, dtype=dtype), torch.randn(7, dtype=dtype),
              torch.randn(16, 2, 3, dtype=dtype)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("device,backend", [("cpu", "reference")] + FUSED)
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=[str(o) for o in SGD_OPTIONS])
def test_masked_sgd_with_every_unit_kept_is_torch_sgd(device, backend, options):
    ours = [p.to(device) for p in params_with_grads()]
    theirs = [p.clone().requires_grad_(True) for p in ours]
    optimizer = torch.optim.SGD(theirs, lr=0.1, **options)
    buffers = None
    for step in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        with ek.use_backend(backend):
            buffers = ek.amss.masked_sgd_step([ours[:1], ours[1:]], [1.0, 1.0], lr=0.1,
                                              step=step, **options, momentum_buffers=buffers)
        optimizer.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q.detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("mode,scaling", [("amss", None), ("amss+", "paper"), ("topk", None)])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=[str(o) for o in SGD_OPTIONS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_masked_sgd_fused_equals_reference_and_freezes_left_out_units(device, backend, mode,
                                                                      scaling, options, dtype):
    results = {}
    for name in (backend, "reference"):
        params = [p.to(device) for p in params_with_grads(dtype, seed=4)]
        for p, cpu_p in zip(params, params_with_grads(dtype, seed=4)):
            p.grad = cpu_p.grad.to(device)
        start = [p.clone() for p in params]
        buffers = None
        for step in range(2):
            with ek.use_backend(name):
                buffers = ek.amss.masked_sgd_step([params[:2], params[2:]], [0.4, 0.6], lr=0.05,
                                                  mode=mode, scaling=scaling, seed=7, step=step,
                                                  momentum_buffers=buffers, **options)
        results[name] = (params, buffers, start)
    (p_cpp, b_cpp, start), (p_ref, b_ref, _) = results[backend], results["reference"]
    # amss+: the scale factors agree to rounding (see the masking test): in a 16-bit dtype
    # one ulp per step at most, two steps here; the other modes store the same bits
    close = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else (
        dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else
        dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps))
    # The Triton interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest,
    # as ATen does): up to one ulp off there, in any mode.
    truncated = dtype == torch.bfloat16 and is_interpreted(device, backend)
    for a, b in zip(p_cpp, p_ref):
        if mode == "amss+" or truncated:
            torch.testing.assert_close(a, b, **close)
        else:
            assert torch.equal(a, b)
    # units left out at both steps did not move; with ratios < 1 some did stay
    frozen = [(a == s).reshape(a.shape[0], -1).all(1) for a, s in zip(p_ref, start)]
    assert any(f.any() for f in frozen) and not all(f.all() for f in frozen)
    # one step moves exactly the k = ceil(rho N) kept units of every tensor
    params = [p.to(device) for p in params_with_grads(dtype, seed=5)]
    for p, cpu_p in zip(params, params_with_grads(dtype, seed=5)):
        p.grad = cpu_p.grad.to(device)
    before = [p.clone() for p in params]
    with ek.use_backend(backend):
        ek.amss.masked_sgd_step([params[:2], params[2:]], [0.4, 0.6], lr=0.05, mode=mode,
                                scaling=scaling, seed=1, **options)
    for p, b, ratio in zip(params, before, [0.4, 0.4, 0.6]):
        moved = (p != b).reshape(p.shape[0], -1).any(1).sum().item()
        assert moved == math.ceil(ratio * p.shape[0] - 1e-9)
    if b_ref is not None:
        for group_cpp, group_ref in zip(b_cpp, b_ref):
            for a, b in zip(group_cpp, group_ref):
                torch.testing.assert_close(a, b, **close)


@pytest.mark.parametrize("device,backend", FUSED)
def test_fused_steps_tell_autograd_what_they_changed(device, backend):
    """A backward through a parameter saved before masked_sgd_step moved it must raise, as
    after torch.optim.SGD (the C++ ops declared with mutable arguments bumped no version
    counter: x.grad came out 0 instead of an error); likewise for a masked gradient."""
    w = torch.nn.Parameter(torch.ones(2, 2, device=device))
    x = torch.ones(1, 2, device=device, requires_grad=True)
    loss = (x @ w).sum()
    w.grad = torch.ones(2, 2, device=device)
    with ek.use_backend(backend):
        ek.amss.masked_sgd_step([[w]], [1.0], lr=1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    grad = torch.full((4, 3), 2.0, device=device)
    h = torch.ones(4, 3, device=device, requires_grad=True)
    product = (h * grad).sum()  # saves grad for h's gradient
    with ek.use_backend(backend):
        ek.amss.mask_gradients([[grad]], [0.5], seed=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.backward()


def test_masked_sgd_bad_input():
    params = params_with_grads()
    with pytest.raises(ValueError, match="nesterov"):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        ek.amss.masked_sgd_step([params], [0.5], lr=-1.0)
    # an infinite lr moved every kept parameter to -inf; a bool was a number
    with pytest.raises(ValueError, match="masked_sgd_step: lr must be a finite number >= 0, got inf"):
        ek.amss.masked_sgd_step([params], [0.5], lr=math.inf)
    with pytest.raises(TypeError, match="masked_sgd_step: momentum must be a real number, got bool"):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=True)
    # an item that is not a tensor was an AttributeError ('float' object has no attribute 'grad')
    with pytest.raises(TypeError, match=r"params_per_group\[0\]\[1\] must be a tensor"):
        ek.amss.masked_sgd_step([[params[0], 1.0]], [0.5], lr=0.1)
    # momentum buffers are read like the groups: a bare tensor would be iterated row by row
    with pytest.raises(TypeError, match="masked_sgd_step: momentum_buffers must hold one iterable"):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=0.9,
                                momentum_buffers=torch.zeros(3))
    with pytest.raises(TypeError, match=r"masked_sgd_step: momentum_buffers\[0\] must be an "
                                        "iterable of tensors"):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=0.9,
                                momentum_buffers=[torch.zeros(3)])
    params[1].grad = None
    with pytest.raises(RuntimeError, match="no .grad"):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1)


def test_seed_and_step_must_be_ints():
    """A float seed was truncated (1.7 ran as 1), a string parsed, None a bare int() error."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    for kwargs, error, match in ((dict(seed=1.7), TypeError, "seed must be an int, got float"),
                                 (dict(seed="3"), TypeError, "seed must be an int, got str"),
                                 (dict(seed=None), TypeError, "seed must be an int, got NoneType"),
                                 (dict(step=2.0), TypeError, "step must be an int, got float"),
                                 (dict(step=-1), ValueError, "step must be an int >= 0")):
        with pytest.raises(error, match="mask_gradients: " + match):
            ek.amss.mask_gradients([[torch.randn(4, 3)]], [0.5], **kwargs)
        with pytest.raises(error, match="masked_sgd_step: " + match):
            ek.amss.masked_sgd_step([[p]], [0.5], lr=0.1, **kwargs)
        if "seed" in kwargs:
            with pytest.raises(error, match="SubnetworkMasker: " + match):
                ek.amss.SubnetworkMasker([[p]], **kwargs)


@pytest.mark.parametrize("backend", ["reference"] + list(amss_module._CPU_BACKENDS))
def test_groups_and_buffers_as_dicts_generators_and_tuples(backend):
    """mask_gradients and masked_sgd_step take a dict of groups (its values, in order) as
    SubnetworkMasker does (a dict gave its keys: "must be a floating-point tensor"), and
    momentum buffers in any iterables, read once (a generator was read twice: the reference
    silently skipped the step, the fused op failed), never writing the caller's containers
    (a tuple failed on the fused path)."""
    with ek.use_backend(backend):
        grads = params_with_grads()
        as_list = [[g.grad.clone() for g in grads[:2]], [grads[2].grad.clone()]]
        as_dict = {"audio": [t.clone() for t in as_list[0]], "video": [as_list[1][0].clone()]}
        ek.amss.mask_gradients(as_list, [0.5, 0.3], seed=4, step=1)
        ek.amss.mask_gradients(as_dict, [0.5, 0.3], seed=4, step=1)
        for want, got in zip(as_list[0] + as_list[1], as_dict["audio"] + as_dict["video"]):
            assert torch.equal(want, got)

        def two_steps(wrap):
            params = params_with_grads()
            buffers = ek.amss.masked_sgd_step({"a": params[:2], "b": params[2:]}, [0.5, 0.6],
                                              lr=0.1, momentum=0.9, seed=2)
            given = wrap(buffers)
            again = ek.amss.masked_sgd_step({"a": params[:2], "b": params[2:]}, [0.5, 0.6],
                                            lr=0.1, momentum=0.9, momentum_buffers=given,
                                            seed=2, step=1)
            return params, again, given

        want_params, want_buffers, _ = two_steps(lambda b: b)
        for wrap in (lambda b: (tuple(group) for group in b),
                     lambda b: tuple(tuple(group) for group in b)):
            params, buffers, given = two_steps(wrap)
            for want, got in zip(want_params, params):
                assert torch.equal(want, got)
            for want, got in zip(sum(want_buffers, []), sum(buffers, [])):
                assert torch.equal(want, got)
        first = params_with_grads()
        fresh = ((None,) * 2, (None,))
        ek.amss.masked_sgd_step([first[:2], first[2:]], [0.5, 0.6], lr=0.1, momentum=0.9,
                                momentum_buffers=fresh)
        assert fresh == ((None,) * 2, (None,))


@needs_cpp
def test_the_cpp_amss_ops_check_their_arguments():
    ops = torch.ops.ether_kernels
    g = [torch.randn(6, 3), torch.randn(4)]
    cases = [
        (lambda: ops.amss_mask_gradients(g, [0], [0.5], 0, 0, 0, 0, 1), r"group_of_tensor must give"),
        (lambda: ops.amss_mask_gradients(g, [0, 1], [0.5], 0, 0, 0, 0, 1), r"has no ratio"),
        (lambda: ops.amss_mask_gradients(g, [0, 0], [1.5], 0, 0, 0, 0, 1), r"outside \[0, 1\]"),
        (lambda: ops.amss_mask_gradients(g, [0, 0], [0.5], 7, 0, 0, 0, 1), r"sampling must be"),
        (lambda: ops.amss_mask_gradients([torch.randn(3, 4).t()], [0], [0.5], 0, 0, 0, 0, 1),
         r"contiguous CPU tensor"),
        (lambda: ops.amss_mask_gradients([torch.randn(5, 2)], [0], [0.5], 0, 0, 0, 0, 2),
         r"not a multiple of unit_size"),
        (lambda: ops.amss_masked_sgd_step(g, g, [], [], [0, 0], [0.5], 0, 0, 0, 0, 1, 0.1, 0.9,
                                          0.0, 0.0, False), r"one buffer and one fresh flag"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_masked_sgd_step_rejects_empty_and_mismatched_buffers():
    with pytest.raises(ValueError, match="no parameters"):
        ek.amss.masked_sgd_step([[]], [0.5], lr=0.1)
    params = params_with_grads()
    with pytest.raises(ValueError, match="momentum_buffers must match"):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=0.9, momentum_buffers=[[None]])


def test_masked_sgd_step_rejects_bad_buffers_and_gradients():
    params = params_with_grads()
    bad = [[torch.zeros(3, 5, dtype=torch.float64), None, None]]  # wrong shape for params[0]
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\]\[0\] must be a contiguous"):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1, momentum=0.9, momentum_buffers=bad)
    params[1].grad_dtype = None  # torch refuses a gradient of another dtype unless asked
    params[1].grad = params[1].grad.float()
    with pytest.raises(ValueError, match=r"params_per_group\[0\]\[1\]\.grad must match"):
        ek.amss.masked_sgd_step([params], [0.5], lr=0.1)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] == "triton"])
def test_triton_ops_check_the_rest_of_their_arguments(device, backend):
    ops = torch.ops.ether_kernels
    g = [torch.randn(6, 3, device=device), torch.randn(4, device=device)]
    buffers = [torch.zeros_like(t) for t in g]
    cases = [
        (lambda: ops.amss_mask_gradients_triton(g, [0, 0], [0.5], 0, 2, 0, 0, 1),
         r"scaling must be 0 or 1"),
        (lambda: ops.amss_mask_gradients_triton(g, [0, 0], [0.5], 0, 0, 0, 0, 0),
         r"unit_size must be >= 1"),
        (lambda: ops.amss_mask_gradients_triton([torch.ones(4, 2, dtype=torch.int32,
                                                            device=device)], [0], [0.5], 0, 0,
                                                0, 0, 1), r"fp16, bf16, fp32 or fp64"),
        (lambda: ops.amss_masked_sgd_step_triton(g[:1], g, [], [], [0, 0], [0.5], 0, 0, 0, 0, 1,
                                                 0.1, 0.0, 0.0, 0.0, False),
         r"params and grads differ in length"),
        (lambda: ops.amss_masked_sgd_step_triton([g[0].double(), g[1]], g, [], [], [0, 0], [0.5],
                                                 0, 0, 0, 0, 1, 0.1, 0.0, 0.0, 0.0, False),
         r"params\[0\] must be contiguous with its gradient's"),
        (lambda: ops.amss_masked_sgd_step_triton(g, g, [buffers[0].t(), buffers[1]], [1, 1],
                                                 [0, 0], [0.5], 0, 0, 0, 0, 1, 0.1, 0.9, 0.0,
                                                 0.0, False),
         r"buffers\[0\] must be contiguous with its parameter's"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
