"""Shared pieces of the GPU benchmarks: CUDA timing, a per-session results table, the device guard.

Every benchmark file times its baselines in the same session; the table printed at the end (and
written to ``$BENCH_OUT/<file>.json`` when set) gives time, TFLOP/s, measured sparsity and the
speedup over the file's reference baseline for each shape.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

ROWS: list[dict] = []


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
        for item in items:
            item.add_marker(skip)


def cuda_ms(fn, *, graph_calls: int = 0) -> float:
    """Median device time of one call (CUDA events via do_bench); with graph_calls, of one call inside a
    replayed CUDA graph of that many calls (removes launch overhead, as a served decode step would)."""
    from triton.testing import do_bench

    if not graph_calls:
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(graph_calls):
            fn()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / graph_calls


def synced(fn):
    """What pytest-benchmark times: one call, finished on the device."""

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.fixture(scope="session")
def report():
    return ROWS


def _table(rows: list[dict]) -> list[str]:
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            value = row.get(k, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    terminalreporter.write_line(f"\nfxsparse benchmark results on {device} (torch {torch.__version__})")
    groups: dict[str, list[dict]] = {}
    for row in ROWS:
        groups.setdefault(row["bench"], []).append(row)
    for name, rows in groups.items():
        terminalreporter.write_line(f"\n## {name}")
        for line in _table([{k: v for k, v in r.items() if k != "bench"} for r in rows]):
            terminalreporter.write_line(line)
    out_dir = os.environ.get("BENCH_OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_results.json"), "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, rows=ROWS), f, indent=1)
