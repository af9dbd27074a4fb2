"""The CUDA kernels' logic, checked on the CPU: every .cu file is compiled as C++20 against a
small CUDA emulation (tests/cuda_emulation/cuda_runtime.h: one std::thread per CUDA thread,
barriers for __syncthreads and shuffles) and run by a harness that compares it with a
double-precision reference on fresh random inputs.

This is what lets a machine without a GPU (CI) catch indexing, synchronisation-order and
boundary bugs in the CUDA kernels; the GPU-marked tests remain the judge of the real thing
(warp timing, the memory model, the fast special functions).
"""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")

# harness -> the .cu files it links
HARNESSES = {
    "dtw_test.cpp": ["dtw_kernels.cu"],
    "ether_mse_test.cpp": ["ether_loss_kernels.cu", "mse_loss_kernels.cu"],
}
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?),\s*0,\s*stream>>>\(", re.S)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")


def emulated_sources(build_dir, sources):
    """Copies the kernels into build_dir with their launches rewritten for the emulation."""
    os.makedirs(os.path.join(build_dir, "cuda"), exist_ok=True)
    os.makedirs(os.path.join(build_dir, "common"), exist_ok=True)
    shutil.copy(os.path.join(ROOT, "csrc", "cuda", "kernels_cuda.h"), os.path.join(build_dir, "cuda"))
    shutil.copy(os.path.join(ROOT, "csrc", "common", "ether_loss_math.h"),
                os.path.join(build_dir, "common"))
    outputs = []
    for name in sources:
        with open(os.path.join(ROOT, "csrc", "cuda", name)) as f:
            text = f.read()
        text, launches = LAUNCH.subn(r"::emu::launch(\2, \1, ", text)
        assert launches > 0, f"no kernel launch found in {name}"
        assert "<<<" not in text, f"a launch in {name} was not rewritten"
        out = os.path.join(build_dir, "cuda", name.replace(".cu", ".cpp"))
        with open(out, "w") as f:
            f.write(text)
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("harness", sorted(HARNESSES))
def test_cuda_kernels_under_emulation(harness, tmp_path, fresh_seed):
    build_dir = str(tmp_path)
    sources = emulated_sources(build_dir, HARNESSES[harness])
    binary = os.path.join(build_dir, harness.replace(".cpp", ""))
    compile_cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-D__CUDACC__", "-w",
                   "-I", EMULATION, "-I", build_dir, *sources,
                   os.path.join(EMULATION, harness), "-o", binary]
    built = subprocess.run(compile_cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"emulated build failed:\n{built.stderr[-4000:]}"
    args = [binary, str(fresh_seed)] + (["quick"] if harness == "ether_mse_test.cpp" else [])
    ran = subprocess.run(args, capture_output=True, text=True, timeout=900)
    failures = [line for line in ran.stdout.splitlines() if "FAIL" in line]
    assert ran.returncode == 0, (f"{harness} failed (seed {fresh_seed}):\n" + "\n".join(failures[:30])
                                 + "\n" + ran.stdout[-2000:] + ran.stderr[-2000:])


def test_fake_kernels_shape_the_kept_state_as_the_cuda_kernels(tmp_path, monkeypatch):
    """The DTW ops' fake kernels (torch.compile, opcheck) shape the CUDA kernels' kept state
    with a Python copy of dtw_kept_per_pair: the two agree over a grid of lengths, feature
    counts, thread caps (ETHER_KERNELS_DTW_THREADS) and soft rows per thread
    (ETHER_KERNELS_DTW_SOFT_ROWS), the C++ side printed by the emulated harness."""
    from ether_kernels.dynamic_time_warping import cuda_kept_per_pair
    build_dir = str(tmp_path)
    sources = emulated_sources(build_dir, HARNESSES["dtw_test.cpp"])
    binary = os.path.join(build_dir, "dtw_test")
    built = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-D__CUDACC__", "-w",
                            "-I", EMULATION, "-I", build_dir, *sources,
                            os.path.join(EMULATION, "dtw_test.cpp"), "-o", binary],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"emulated build failed:\n{built.stderr[-4000:]}"
    lines = subprocess.run([binary, "kept"], capture_output=True, text=True,
                           timeout=60).stdout.splitlines()
    assert len(lines) > 1000
    for line in lines:
        N, M, soft, D, threads, rows, kept = map(int, line.split())
        for name, value in (("ETHER_KERNELS_DTW_THREADS", threads),
                            ("ETHER_KERNELS_DTW_SOFT_ROWS", rows)):
            if value:
                monkeypatch.setenv(name, str(value))
            else:
                monkeypatch.delenv(name, raising=False)
        assert cuda_kept_per_pair(N, M, bool(soft), None if D == 0 else D) == kept, line
