"""Benchmark plumbing: providers side by side, medians, GB/s, ratios, a results file.

Each benchmark registers its median with `record(...)`; at the end of the session a table
per (op, mode, shape) group is printed with every provider's median, the effective
bandwidth (the bytes the op must move at least, over the median) and the speed-up against
eager PyTorch and torch.compile (a ratio of throughputs, so a peer timed on a different
amount of work compares per cell or per byte), next to the machine's measured copy bandwidth. The same
table goes to bench/results/<device>-<family>.json and .md (family: losses, dtw, amss, alignment), stamped
with the device and versions.
"""

import datetime
import json
import os
import platform
import re
import time

import pytest
import torch

import ether_kernels

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_records = []


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def record(benchmark, *, op, mode, shape, dtype, device, provider, bytes_moved=None, cells=None):
    """Stores the finished benchmark's median for the summary table: throughput in GB/s
    (bytes_moved, the bytes the op must move at least) or, for DTW, in G cells/s."""
    median = benchmark.stats.stats.median
    entry = dict(op=op, mode=mode, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                 device=device, provider=provider, median_s=median,
                 q1_s=benchmark.stats.stats.q1, q3_s=benchmark.stats.stats.q3)
    if cells is not None:
        entry["gcells_per_s"] = cells / median / 1e9
    else:
        entry["gbps"] = bytes_moved / median / 1e9
    if device == "cuda":
        entry["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info.update({k: v for k, v in entry.items() if k not in ("shape",)})
    _records.append(entry)


def measure_copy_bandwidth(device, megabytes=256, repeats=10):
    """GB/s of dst.copy_(src) (one read + one write) on a buffer far larger than the caches."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def machine_stamp(device):
    info = ether_kernels.info()
    stamp = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        cpu_count=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
        triton=info["triton_version"], ether_kernels=info["version"], simd=info["simd"],
        python=platform.python_version(), copy_bandwidth_gbps=measure_copy_bandwidth(device),
    )
    if device == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            if names:
                stamp["device"] = names[0]
        except OSError:
            pass
    return stamp


def _work_rate(entry):
    """The entry's throughput (G cells/s or GB/s): the speed-up is a ratio of throughputs, so
    a peer timed on more work than ours (dtaidistance's 64 x 64 block of pairs against our 64
    pairs) is compared per cell, not per call."""
    return entry.get("gcells_per_s", entry.get("gbps"))


def _speedup(entry, baseline):
    rate, base_rate = _work_rate(entry), _work_rate(baseline)
    if rate is not None and base_rate is not None:
        return rate / base_rate
    return baseline["median_s"] / entry["median_s"]


def _summary_rows(records):
    groups = {}
    for r in records:
        groups.setdefault((r["op"], r["device"], r["dtype"], tuple(r["shape"]), r["mode"]), []).append(r)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3][0] * 10**9 + (k[3][1] if len(k[3]) > 1 else 0), k[4])):
        entries = groups[key]
        by_provider = {e["provider"]: e for e in entries}
        eager = by_provider.get("eager", by_provider.get("eager-cuda"))  # same-device loop
        compiled = by_provider.get("torch.compile")
        for e in entries:
            row = dict(e)
            if eager is not None:
                row["vs_eager"] = _speedup(e, eager)
            if compiled is not None:
                row["vs_compile"] = _speedup(e, compiled)
            rows.append(row)
    return rows


def family(op):
    """Results are written per device and op family, so a run of one family (say, DTW on a
    GPU) never overwrites another's table."""
    if op.split("[")[0] in ALIGNMENT_OPS:  # "contrastive_loss[block=512]": a variant
        return "alignment"
    return "dtw" if "dtw" in op else ("amss" if op.startswith("amss") else "losses")


ALIGNMENT_OPS = ("contrastive_loss", "batch_all_triplet_loss", "batch_hard_triplet_loss",
                 "cca_loss", "multimodal_loss")


def _ratio_text(ratio):
    return "-" if ratio is None else f"{ratio:.2f}x"


def render(device, rows, stamp):
    """The markdown table of one results file."""
    header = (f"{stamp['device']} | torch {stamp['torch']} | triton {stamp['triton']} | "
              f"{stamp['threads']} threads | SIMD {stamp['simd']} | copy bandwidth "
              f"{stamp['copy_bandwidth_gbps']:.1f} GB/s")
    memory = device == "cuda"
    lines = [f"### ether_kernels benchmarks on {device}: {header}", "",
             "| op | mode | shape | dtype | provider | median | GB/s or G cells/s | vs eager | "
             "vs torch.compile |" + (" peak MiB |" if memory else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if memory else "")]
    for r in rows:
        rate = (f"{r['gbps']:.1f} GB/s" if "gbps" in r else f"{r['gcells_per_s']:.3f} Gcells/s")
        lines.append(
            f"| {r['op']} | {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
            f"{r['provider']} | {r['median_s'] * 1e6:.1f} us | {rate} | "
            f"{_ratio_text(r.get('vs_eager'))} | {_ratio_text(r.get('vs_compile'))} |"
            + (f" {r.get('peak_mem_mb', float('nan')):.0f} |" if memory else ""))
    return lines


def pytest_terminal_summary(terminalreporter):
    if not _records:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    for device, kind in sorted({(r["device"], family(r["op"])) for r in _records}):
        rows = _summary_rows([r for r in _records
                              if r["device"] == device and family(r["op"]) == kind])
        stamp = machine_stamp(device)
        lines = render(device, rows, stamp)
        terminalreporter.write_line("")
        for line in lines:
            terminalreporter.write_line(line)
        slug = re.sub(r"[^a-z0-9]+", "-", stamp["device"].lower()).strip("-")
        base = os.path.join(RESULTS_DIR, f"{device}-{slug}-{kind}")
        with open(base + ".json", "w") as f:
            json.dump({"machine": stamp, "results": rows}, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        terminalreporter.write_line(f"results written to {base}.json / .md")


@pytest.fixture(autouse=True)
def _reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    yield
