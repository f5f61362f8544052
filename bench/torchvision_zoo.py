"""First graph capture of every torchvision classifier: outcome, size, seconds and peak memory.

    python bench/torchvision_zoo.py [--threads 2] [--max-edges N] [--timeout 300] [NAME ...]

Each model (random weights, ``weights=None``, 10 classes, 224×224 input, 299×299 for
inception_v3) is measured in a fresh process with one torch thread and ``--threads`` threads
for graph-tool and the centralities' products (``graph.threads``). The first capture is what a
run pays at epoch 0: trace the structure, compute the edge
weights, compute the default centralities (wall time, and the CPU time of the process, which
other jobs on shared cores inflate less). ``peak MB`` is the process's peak resident memory,
torch and the model included; ``model MB`` is that peak once the model is built, before tracing.
The JSON line also has each model's trace, refresh and centrality seconds.
A model whose graph has more than ``--max-edges`` edges (counted on the meta device first) is
not captured (none by default). Prints a Markdown
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time

import torch
import torchvision

from mlflow_tg.graph.build import RolledGraphBuilder
from mlflow_tg.graph.centrality import compute_centralities, set_threads
from mlflow_tg.graph.trace import GraphUnsupportedError

DEFAULT = ["strength", "eigenvector", "pagerank"]  # graph.centralities of conf/graph/default


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User and system CPU time of this process so far.

    Other processes sharing the cores inflate it less than wall time.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def input_shape(name: str) -> tuple[int, int, int]:
    return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def size_on_meta(name: str) -> tuple[int, int] | None:
    """Vertices and edges of the model's graph from its structure alone (None: no meta build)."""
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, num_classes=10)
    except NotImplementedError:  # RegNet computes its widths from tensors while it is built
        return None
    builder = RolledGraphBuilder(model, input_shape(name))
    return builder.num_vertices, builder.num_edges


def measure(name: str, threads: int, max_edges: int) -> dict:
    """One model's first capture, in this (fresh) process."""
    torch.set_num_threads(1)
    set_threads(threads)
    row = {"model": name}
    try:
        size = size_on_meta(name)
    except GraphUnsupportedError as error:
        return row | {"outcome": "refused", "reason": str(error)}
    if size is not None and size[1] > max_edges:
        return row | {"outcome": "not captured", "vertices": size[0], "edges": size[1]}
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    row["model_mb"] = peak_rss_mb()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    builder = RolledGraphBuilder(model, input_shape(name))
    trace_s = time.perf_counter() - start
    if builder.num_edges > max_edges:  # a model the meta device could not build
        return row | {
            "outcome": "not captured", "vertices": builder.num_vertices, "edges": builder.num_edges
        }  # fmt: skip
    builder.refresh(model, threads)
    refreshed = time.perf_counter()
    adjacency = builder.adjacency(threads)
    compute_centralities(lambda: builder.graph, DEFAULT, adjacency=adjacency)
    return row | {
        "outcome": "graph",
        "vertices": builder.num_vertices,
        "edges": builder.num_edges,
        "trace_s": trace_s,
        "refresh_s": refreshed - start - trace_s,
        "centralities_s": time.perf_counter() - refreshed,
        "first_capture_s": time.perf_counter() - start,
        "first_capture_cpu_s": cpu_seconds() - cpu_start,
        "peak_mb": peak_rss_mb(),
    }


def in_fresh_process(name: str, threads: int, max_edges: int, timeout: float) -> dict:
    """``measure`` in a new process, so that peak memory is the model's own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        try:
            return pool.apply_async(measure, (name, threads, max_edges)).get(timeout)
        except multiprocessing.TimeoutError:
            return {"model": name, "outcome": f"over {timeout:.0f} s"}


def table_row(row: dict) -> str:
    """One Markdown table row."""
    cells = [f"`{row['model']}`", row["outcome"]]
    cells += [f"{row[key]:,}" if key in row else "" for key in ("vertices", "edges")]
    for key in ("first_capture_s", "first_capture_cpu_s"):
        cells += [f"{row[key]:.2f} s" if key in row else ""]
    cells += [f"{row[key]:,.0f}" if key in row else "" for key in ("peak_mb", "model_mb")]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models (default: every classifier)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-edges", type=int, default=10**12)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    names = args.names or torchvision.models.list_models(module=torchvision.models)
    print("| model | outcome | vertices | edges | first capture | CPU | peak MB | model MB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        rows.append(in_fresh_process(name, args.threads, args.max_edges, args.timeout))
        print(table_row(rows[-1]), flush=True)
    print(json.dumps({"threads": args.threads, "models": rows}))


if __name__ == "__main__":
    main()
