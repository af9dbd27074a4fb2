"""The build (every .cu compiles, every SIMD variant is right), info(), backend choice and
forcing, and the fallback to the reference when the extension is missing."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ether_kernels as ek
from ether_kernels import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def run_python(code, **env):
    """Runs `code` in a fresh interpreter (import-time settings need one); returns stdout."""
    full_env = {**os.environ, **env}
    if "ETHER_KERNELS_BACKEND" not in env:  # the parent's choice must not leak in
        full_env.pop("ETHER_KERNELS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=full_env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout, result.stderr


# ------------------------------------------------------------------------------- build

def test_cuda_sources_exist():
    assert CUDA_SOURCES, "csrc/cuda/ holds no .cu file"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_without_torch(source, arch, tmp_path):
    """Pure CUDA kernels stay free of torch headers, so they compile here without a GPU."""
    with open(source) as f:
        text = f.read()
    for forbidden in ("<torch/", "<ATen/", "<c10/"):
        assert forbidden not in text, f"{source} includes a torch header ({forbidden})"
    result = subprocess.run(
        ["nvcc", "-std=c++17", f"-arch={arch}", "-O3", "-c", source, "-I", os.path.join(ROOT, "csrc"),
         "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed for {source} ({arch}):\n{result.stderr}"


CUDA_BINDINGS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("source", CUDA_BINDINGS, ids=os.path.basename)
def test_cuda_binding_compiles_against_the_torch_headers(source, tmp_path):
    """The torch-facing CUDA bindings are built only where a CUDA torch is installed (a GPU
    machine); here nvcc hands them to the host compiler for a syntax check against this
    torch's headers (the CPU wheel ships c10/cuda and ATen; only the header CMake generates
    for a CUDA build is missing: an empty stand-in), so a slip in a binding is caught
    before a GPU session spends its build on it."""
    from torch.utils.cpp_extension import include_paths
    import sysconfig
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [str(tmp_path), os.path.join(ROOT, "csrc"), *include_paths(),
                sysconfig.get_paths()["include"]]
    result = subprocess.run(
        ["nvcc", "-std=c++20", "-Xcompiler", "-fsyntax-only", "-c", source,
         *[f"-I{path}" for path in includes], "-o", str(tmp_path / "binding.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{source} does not compile:\n{result.stderr[-6000:]}"


def test_info_reports_what_loaded():
    info = ek.info()
    for key in ("cpp", "cuda", "triton", "simd", "threads", "torch", "version", "backends"):
        assert key in info, f"info() lacks {key!r}"
    assert isinstance(info["cpp"], bool) and isinstance(info["cuda"], bool)
    assert isinstance(info["triton"], bool)
    assert info["threads"] == torch.get_num_threads()
    assert info["version"] == ek.__version__
    if info["cpp"]:
        assert info["simd"] in ("DEFAULT", "AVX2", "AVX512")
        assert "cpp" in info["backends"]["cpu"]


def test_the_extension_is_built_when_the_makefile_requires_it():
    # The Makefile installs with ETHER_KERNELS_REQUIRE_EXTENSION=1: the suite must then be
    # testing the compiled kernels, not silently the reference.
    if os.environ.get("ETHER_KERNELS_DISABLE_EXTENSION") == "1":
        pytest.skip("extension disabled on purpose")
    assert ek.info()["cpp"], f"the C++ extension did not load: {ek.info()['cpp_error']}"


SIMD_CHECK = """
import json, torch, ether_kernels as ek
torch.manual_seed(0)
results = {"simd": ek.info()["simd"]}
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for shape in ((37, 45), (5, 3, 70), (300, 7)):
        p = torch.randn(shape, dtype=torch.float64)
        t = torch.randn(shape, dtype=torch.float64)
        pred = p.to(dtype).requires_grad_(True)
        loss = ek.ether_loss(pred, t.to(dtype), [0, [1, 2]], 0.7)
        (grad,) = torch.autograd.grad(loss, (pred,))
        ref_pred = pred.detach().double().requires_grad_(True)
        with ek.use_backend("reference"):
            ref = ek.ether_loss(ref_pred, t.to(dtype).double(), [0, [1, 2]], 0.7)
        (ref_grad,) = torch.autograd.grad(ref, (ref_pred,))
        mse = ek.fused_mse_loss(pred.detach(), t.to(dtype))
        ref_mse = torch.nn.functional.mse_loss(pred.detach().double(), t.to(dtype).double())
        results[f"{dtype}-{shape}"] = [
            abs(loss.double().item() - ref.item()) / abs(ref.item()),
            ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item(),
            abs(mse.double().item() - ref_mse.item()) / ref_mse.item()]
# DTW: each build has its own soft-DTW sweeps (fp32: 2^(-R) in AVX512 and AVX2, R in
# DEFAULT; fp64: R), lane widths (8, 4, 4) and backward; a lane group, a remainder pair,
# per-pair lengths, with and without a band, against the reference on the same inputs.
x64, y64 = torch.randn(13, 23, 3, dtype=torch.float64), torch.randn(13, 19, 3, dtype=torch.float64)
xl, yl = torch.randint(15, 24, (13,)), torch.randint(12, 20, (13,))
for dtype in (torch.float32, torch.float64):
    x, y = x64.to(dtype), y64.to(dtype)
    for band in (None, 4):
        errors = []
        for gamma in (None, 0.3):
            a = x.clone().requires_grad_(gamma is not None)
            b = y.clone().requires_grad_(gamma is not None)
            ra = x.double().clone().requires_grad_(gamma is not None)
            rb = y.double().clone().requires_grad_(gamma is not None)
            kw = dict(band=band, x_lengths=xl, y_lengths=yl)
            got = ek.dtw(a, b, **kw) if gamma is None else ek.soft_dtw(a, b, gamma, **kw)
            with ek.use_backend("reference"):
                want = ek.dtw(ra, rb, **kw) if gamma is None else ek.soft_dtw(ra, rb, gamma, **kw)
            errors.append(((got.double() - want).abs() / want.abs()).max().item())
            if gamma is not None:
                grads = torch.autograd.grad(got.sum(), (a, b))
                for g, w in zip(grads, torch.autograd.grad(want.sum(), (ra, rb))):
                    errors.append(((g.double() - w).abs().max() / w.abs().max()).item())
        results[f"dtw_{dtype}-band-{band}"] = errors
# Up to 4 soft-DTW pairs run alone in strips (lanes along anti-diagonals: 8 in AVX512, 4 in
# AVX2 and DEFAULT; fp32 sweeps 2^(-R) in AVX512 and AVX2): values and gradients.
sx, sy = torch.randn(2, 70, 3, dtype=torch.float64), torch.randn(2, 66, 3, dtype=torch.float64)
sl = dict(x_lengths=torch.tensor([70, 61]), y_lengths=torch.tensor([66, 59]))
for dtype in (torch.float32, torch.float64):
    for band in (None, 5):
        a = sx.to(dtype).requires_grad_(True)
        b = sy.to(dtype).requires_grad_(True)
        ra = sx.to(dtype).double().requires_grad_(True)
        rb = sy.to(dtype).double().requires_grad_(True)
        got = ek.soft_dtw(a, b, 0.3, band=band, **sl)
        with ek.use_backend("reference"):
            want = ek.soft_dtw(ra, rb, 0.3, band=band, **sl)
        errors = [((got.double() - want).abs() / want.abs()).max().item()]
        for g, w in zip(torch.autograd.grad(got.sum(), (a, b)),
                        torch.autograd.grad(want.sum(), (ra, rb))):
            errors.append(((g.double() - w).abs().max() / w.abs().max()).item())
        results[f"dtw_{dtype}-strips-band-{band}"] = errors
print(json.dumps(results))
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_simd_variant_matches_the_reference(capability):
    if not ek.info()["cpp"]:
        pytest.skip("the C++ extension is not loaded")
    if capability.upper() not in ek.info()["simd_compiled"]:
        pytest.skip(f"{capability} is not compiled on this platform")
    machine = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if machine in order and order.index(capability.upper()) > order.index(machine):
        pytest.skip(f"this processor has no {capability}")
    stdout, _ = run_python(SIMD_CHECK, ATEN_CPU_CAPABILITY=capability)
    results = json.loads(stdout)
    assert results.pop("simd") == capability.upper()
    bounds = {"float64": 1e-12, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2,
              "dtw_float64": 1e-9, "dtw_float32": 1e-4}  # as tests/test_dtw.py
    for case, errors in results.items():
        bound = bounds[case.split("-")[0].replace("torch.", "")]
        assert max(errors) < bound, f"{capability} {case}: relative errors {errors} exceed {bound}"


# ---------------------------------------------------------------------------- dispatch

def test_automatic_choice_on_cpu():
    cpu = torch.device("cpu")
    expected = "cpp" if ek.info()["cpp"] else "reference"
    assert _dispatch.select("ether_loss", cpu, ("cpp",), ("triton", "cuda")) == expected


def test_use_backend_forces_and_nests():
    cpu = torch.device("cpu")
    with ek.use_backend("reference"):
        assert _dispatch.select("x", cpu) == "reference"
        with ek.use_backend("auto"):
            assert _dispatch.select("x", cpu) == ("cpp" if ek.info()["cpp"] else "reference")
        assert _dispatch.select("x", cpu) == "reference"


def test_use_backend_takes_names_as_the_variable_does():
    cpu = torch.device("cpu")
    with ek.use_backend(" Reference "):
        assert _dispatch.select("x", cpu) == "reference"
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of"):
        with ek.use_backend(3):
            pass


def test_use_backend_steers_only_its_own_thread():
    """A block in one thread (a data loader, a serving thread) must not change the backend
    of ops running in another thread; each thread's nesting is its own."""
    import threading
    cpu = torch.device("cpu")
    automatic = _dispatch.select("x", cpu)
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with ek.use_backend("cuda"):
            inside.set()
            release.wait(30)
            seen["worker"] = _dispatch.forced_backend()

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(30)
    with ek.use_backend("reference"):
        seen["main, inside"] = _dispatch.select("x", cpu)
    seen["main"] = _dispatch.select("x", cpu)
    release.set()
    thread.join(30)
    assert seen == {"worker": "cuda", "main, inside": "reference", "main": automatic}


def test_backends_need_a_device_torch_can_see():
    if not torch.cuda.is_available():
        assert _dispatch.available_backends("cuda") == []
        assert "torch sees no CUDA device" in " ".join(
            _dispatch.unsupported_reasons("triton", torch.device("cuda"), ("triton",)))


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True),
                                             ("0", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(value, expected):
    stdout, _ = run_python("import ether_kernels as ek; print(ek.info()['triton_interpret'])",
                           TRITON_INTERPRET=value)
    assert stdout.split()[-1] == str(expected)


def _copy_of_the_tracked_tree(tmp_path):
    """The repository's tracked files copied under tmp_path / "src" (skips outside a git
    checkout); returns (that directory, the tracked names)."""
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    source = tmp_path / "src"
    for name in tracked.stdout.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), source / name)
    return source, tracked.stdout.split()


def test_the_sdist_carries_every_source(tmp_path):
    """A wheel is built from the sdist (pip install of a release): every C++ / CUDA source
    and header must be in it (the per-instruction-set kernels and the CUDA files are
    compiled outside the Extension's sources list, and were missing)."""
    source, tracked = _copy_of_the_tracked_tree(tmp_path)
    built = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir",
                            str(tmp_path / "dist")], capture_output=True, text=True,
                           cwd=source, env={**os.environ, "ETHER_KERNELS_WITH_CUDA": "0"},
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    import tarfile
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    wanted = {name for name in tracked
              if name.startswith("csrc/") or name.startswith("ether_kernels/")
              and name.endswith(".py")}
    assert wanted <= members, sorted(wanted - members)


def test_a_failed_optional_build_removes_the_earlier_extension(tmp_path):
    """Without ETHER_KERNELS_REQUIRE_EXTENSION a failed build leaves the package on its
    reference, so the extension an earlier in-place build left must go (it would load
    beside Python code it no longer matches). The first kernel file is broken, so the
    build fails at its first compile."""
    source, _ = _copy_of_the_tracked_tree(tmp_path)
    for kernel in (source / "csrc" / "cpu" / "kernels").glob("*.cpp"):
        kernel.write_text(kernel.read_text() + "\n#error broken on purpose\n")
    import sysconfig
    stale = source / "ether_kernels" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    stale.write_bytes(b"an earlier build")
    env = {k: v for k, v in os.environ.items() if k != "ETHER_KERNELS_REQUIRE_EXTENSION"}
    built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                           capture_output=True, text=True, cwd=source,
                           env={**env, "ETHER_KERNELS_WITH_CUDA": "0"}, timeout=600)
    output = built.stdout + built.stderr
    assert built.returncode == 0, output[-3000:]
    assert "building ether_kernels._C failed" in output, output[-3000:]
    assert not stale.exists(), output[-3000:]


def test_forcing_a_backend_that_cannot_run_lists_the_reasons():
    with ek.use_backend("cuda"), pytest.raises(ek.BackendUnavailableError) as error:
        ek.ether_loss(torch.randn(3, 2), torch.randn(3, 2), [0, 1])
    message = str(error.value)
    assert "backend 'cuda' was forced" in message
    assert "cuda runs on CUDA tensors, these are on cpu" in message


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of reference, cpp, cuda, triton"):
        with ek.use_backend("fast"):
            pass


def test_environment_variable_forces_the_backend():
    code = ("import torch, ether_kernels as ek\n"
            "from ether_kernels import _dispatch\n"
            "print(_dispatch.select('ether_loss', torch.device('cpu'), ('cpp',), ('triton',)))\n")
    stdout, _ = run_python(code, ETHER_KERNELS_BACKEND="reference")
    assert stdout.strip() == "reference"
    bad = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True,
                         env={**os.environ, "ETHER_KERNELS_BACKEND": "gpu-please"}, cwd=ROOT)
    assert bad.returncode != 0
    assert "ETHER_KERNELS_BACKEND must be one of reference, cpp, cuda, triton or 'auto', got 'gpu-please'" in bad.stderr


def test_without_the_extension_the_package_warns_once_and_runs_the_reference():
    code = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ether_kernels as ek
    import ether_kernels.ether_loss, ether_kernels.mse_loss
print(sum("compiled extension is not available" in str(w.message) for w in caught))
info = ek.info()
print(info["cpp"], "disabled by ETHER_KERNELS_DISABLE_EXTENSION" in info["cpp_error"])
p = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
t = torch.randn(6, 4, dtype=torch.float64)
loss = ek.ether_loss(p, t, [0, [1, 2]], 0.5)
loss.backward()
intra = torch.mean((p - t) ** 2)
inter = (p[:, 0].mean() - p.mean()).abs() + (p[:, [1, 2]].mean() - p.mean()).abs()
print(torch.allclose(loss, intra + 0.5 * inter, rtol=1e-12, atol=0))
print(torch.allclose(ek.fused_mse_loss(p, t), torch.nn.functional.mse_loss(p, t)))
try:
    with ek.use_backend("cpp"):
        ek.ether_loss(p, t, [0, 1], 0.5)
except ek.BackendUnavailableError as error:
    print("refused:", "the compiled extension did not load" in str(error))
"""
    stdout, _ = run_python(code, ETHER_KERNELS_DISABLE_EXTENSION="1")
    assert stdout.split() == ["1", "False", "True", "True", "True", "refused:", "True"], stdout


def _transform_cases():
    """(name, f(t) -> scalar, input) for every public op with fused backends."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randn(4, 6, dtype=torch.float64)
    s2 = torch.randn(2, 7, 2, dtype=torch.float64)
    mm = ek.MultiModalLoss(3, 2, proxies_per_class=2).double()
    labels = torch.tensor([0, 1, 2, 1])
    return [
        ("fused_mse_loss", lambda t: ek.fused_mse_loss(t, y) * 2, x),
        ("ether_loss", lambda t: ek.ether_loss(t, y, [0, [1, 2]], 0.5), x),
        ("soft_dtw", lambda t: ek.soft_dtw(t.view(2, 6, 2), s2, 0.5).sum(), x),
        ("dtw", lambda t: ek.dtw(t.view(2, 6, 2), s2).sum(), x),
        ("multimodal_loss", lambda t: mm(t, labels), x.abs()),
        ("contrastive_loss", lambda t: ek.contrastive_loss(t, y, 0.2), x),
        ("grad_reverse", lambda t: (ek.grad_reverse(t, 0.5) * t.sin()).sum(), x),
    ]


@pytest.mark.parametrize("backend", [b for b in ("auto", "cpp", "triton")
                                     if b == "auto" or b in _dispatch.available_backends("cpu")])
def test_forward_ad_and_torch_func_transforms_give_the_references_derivatives(backend):
    """Under forward-mode AD (torch.func.jvp) and the torch.func transforms (grad, vmap) the
    ops run the reference, whatever the backend (forced ones too): the fused ops' reverse-
    mode formulas gave a silent tangent of 0 under jvp and an error under torch.func.grad.
    The oracle: reverse-mode autograd of the default path (the fused kernels)."""
    for name, f, x in _transform_cases():
        tangent = torch.randn_like(x)
        with ek.use_backend(backend):
            _, jvp = torch.func.jvp(f, (x,), (tangent,))
            grad = torch.func.grad(f)(x)
            per_sample = torch.func.vmap(torch.func.grad(f))(torch.stack([x, 2 * x]))
        expected = []
        for point in (x, 2 * x):
            t = point.clone().requires_grad_(True)
            expected.append(torch.autograd.grad(f(t), (t,))[0])
        if name == "grad_reverse":  # the forward is the identity: its tangent is not reversed
            t = x.clone().requires_grad_(True)
            (forward_grad,) = torch.autograd.grad((t * t.sin()).sum(), (t,))
            torch.testing.assert_close(jvp, (forward_grad * tangent).sum(), msg=name)
        else:
            torch.testing.assert_close(jvp, (expected[0] * tangent).sum(), msg=name)
        torch.testing.assert_close(grad, expected[0], msg=name)
        torch.testing.assert_close(per_sample, torch.stack(expected), msg=name)
