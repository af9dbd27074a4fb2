"""The benchmark summary's speed-ups (bench/conftest.py): ratios of throughputs, so a peer
timed on more work than ours is compared per cell, and a missing baseline prints "-"."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "conftest.py")


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("ether_bench_report", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(provider, median_s, **rate):
    return dict(op="dtw", mode="forward", shape=[64, 512, 512], dtype="float32", device="cpu",
                provider=provider, median_s=median_s, **rate)


def test_speedup_is_a_ratio_of_throughputs(report):
    cells = 64 * 512 * 512
    rows = report._summary_rows([
        _entry("eager", 1.0, gcells_per_s=cells / 1.0 / 1e9),
        _entry("ether_kernels", 0.01, gcells_per_s=cells / 0.01 / 1e9),
        # a peer timing 64 times the pairs in 2 s: 32x eager per cell, not 0.5x per call
        _entry("dtaidistance", 2.0, gcells_per_s=64 * cells / 2.0 / 1e9),
    ])
    by_provider = {r["provider"]: r for r in rows}
    assert by_provider["ether_kernels"]["vs_eager"] == pytest.approx(100.0)
    assert by_provider["dtaidistance"]["vs_eager"] == pytest.approx(32.0)
    assert "vs_compile" not in by_provider["eager"]


def test_medians_when_no_throughput_and_dash_for_a_missing_baseline(report):
    rows = report._summary_rows([
        dict(_entry("eager", 3.0), gbps=None),
        dict(_entry("torch.compile", 2.0), gbps=None),
        dict(_entry("ether_kernels", 1.0), gbps=None),
    ])
    by_provider = {r["provider"]: r for r in rows}
    assert by_provider["ether_kernels"]["vs_eager"] == pytest.approx(3.0)
    assert by_provider["ether_kernels"]["vs_compile"] == pytest.approx(2.0)
    stamp = dict(device="cpu", torch="t", triton="t", threads=2, simd="x", copy_bandwidth_gbps=1.0)
    rows = report._summary_rows([_entry("ether_kernels", 1.0, gcells_per_s=1.0)])
    line = report.render("cpu", rows, stamp)[-1]
    assert line.endswith("| - | - |"), line
