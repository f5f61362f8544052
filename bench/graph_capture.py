"""Cost of graph capture: rolled-graph size, build and centrality times, memory, and ratios.

    python bench/graph_capture.py [--threads 2] [--images 5000] [--skip-networkx]

For `resnet` (this project's CIFAR ResNet-18) at width 16 and 64 and torchvision's `resnet18`
and `resnet50` (random weights), each measured in a fresh process so that peak memory is its own:
vertices, edges, the one-off trace (structure), one weight refresh, the default centralities
(which need no graph-tool graph), the graph-tool graph (built once, only for betweenness,
closeness or save_graph), each centrality, and the process's peak RSS. Then, side by side in
one run: one capture with the default centralities (as a training run pays it, MLflow logging
included) against one training epoch of `resnet` width 16 on CIFAR-shaped data; and graph-tool
against networkx on the same graphs and centralities. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time

import mlflow
import torch
import torchvision

from mlflow_tg.config import compose_config
from mlflow_tg.graph.build import RolledGraphBuilder
from mlflow_tg.graph.centrality import CENTRALITIES, compute_centralities, set_threads
from mlflow_tg.train.models import build_model

DEFAULT = list(compose_config([]).graph.centralities)
MODELS = {  # name: (builder, input shape)
    "resnet-w16": (lambda: build_model("resnet", 16, 3, 32, 10), (3, 32, 32)),
    "resnet-w64": (lambda: build_model("resnet", 64, 3, 32, 10), (3, 32, 32)),
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(), (3, 224, 224)),
    "torchvision-resnet50": (lambda: torchvision.models.resnet50(), (3, 224, 224)),
}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seconds(work) -> tuple[float, object]:
    """Wall time of ``work()`` and its result."""
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def measure_model(name: str, threads: int) -> dict:
    """Everything about one model's graph, in this (fresh) process."""
    set_threads(threads)
    torch.set_num_threads(threads)
    make, input_shape = MODELS[name]
    model = make()
    before = peak_rss_mb()
    trace_s, builder = seconds(lambda: RolledGraphBuilder(model, input_shape))
    refresh_s, _ = seconds(lambda: builder.refresh(model, threads))

    def centralities(names):
        return compute_centralities(
            lambda: builder.graph, names, adjacency=builder.adjacency(threads)
        )

    # first, as a run's capture: the default centralities never build the graph-tool graph
    default_s, _ = seconds(lambda: centralities(DEFAULT))  # together: one shared eigsh
    graph_s, graph = seconds(lambda: builder.graph)  # for betweenness, closeness, save_graph
    times = {c: seconds(lambda c=c: centralities([c]))[0] for c in CENTRALITIES}
    return {
        "model": name,
        "vertices": graph.num_vertices(),
        "edges": graph.num_edges(),
        "trace_s": trace_s,
        "graph_tool_s": graph_s,
        "refresh_s": refresh_s,
        "centrality_s": times,
        "default_centralities_s": default_s,
        "capture_s": refresh_s + default_s,
        "first_capture_s": trace_s + refresh_s + default_s,
        "peak_rss_mb": peak_rss_mb(),
        "graph_rss_mb": peak_rss_mb() - before,
    }


def in_fresh_process(function, *args):
    """Run ``function(*args)`` in a new process and return its result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def capture_versus_epoch(images: int, threads: int) -> dict:
    """One default capture, logged to a real MLflow store, next to one training epoch."""
    from epoch_time import cifar_shaped, seconds_per_epoch

    from mlflow_tg.graph.capture import GraphCapture
    from mlflow_tg.tracking.run import RunLogger, use_tracking

    torch.set_num_threads(threads)
    data = cifar_shaped(images)
    epoch_s = seconds_per_epoch("resnet", data, 16, 1, torch.device("cpu"))
    model = build_model("resnet", 16, 3, 32, 10)
    cfg = compose_config([f"graph.threads={threads}"])
    capture = GraphCapture(cfg.graph, model, data.input_shape())
    with tempfile.TemporaryDirectory() as tmp:
        store = [f"tracking.uri=sqlite:///{tmp}/bench.db", f"tracking.artifact_root={tmp}/a"]
        use_tracking(compose_config(store).tracking)
        with mlflow.start_run() as run:
            logger = RunLogger(run.info.run_id)
            capture.capture(0, model, logger)  # warm-up: first graph-tool calls, first upload
            timings = [seconds(lambda e=e: capture.capture(e, model, logger))[0] for e in (1, 2, 3)]
    capture_s = sorted(timings)[1]
    return {"epoch_s": epoch_s, "capture_s": capture_s, "capture_over_epoch": capture_s / epoch_s}


def networkx_versus_graph_tool(name: str, threads: int) -> dict:
    """The default centralities as captures compute them and with networkx, on one graph."""
    import networkx as nx

    set_threads(threads)
    make, input_shape = MODELS[name]
    model = make()
    builder = RolledGraphBuilder(model, input_shape)
    graph = builder.build(model)
    gt_s, _ = seconds(
        lambda: compute_centralities(graph, DEFAULT, adjacency=builder.adjacency(threads))
    )

    def networkx_work():
        nx_graph = nx.Graph()
        nx_graph.add_nodes_from(range(graph.num_vertices()))
        nx_graph.add_weighted_edges_from(graph.get_edges([graph.ep["weight"]]).tolist())
        dict(nx_graph.degree(weight="weight"))
        nx.eigenvector_centrality_numpy(nx_graph, weight="weight")
        nx.pagerank(nx_graph, alpha=0.85, weight="weight")

    nx_s, _ = seconds(networkx_work)
    return {"model": name, "mlflow_tg_s": gt_s, "networkx_s": nx_s, "speedup": nx_s / gt_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--skip-networkx", action="store_true")
    args = parser.parse_args()
    print(f"threads={args.threads}; default centralities: {', '.join(DEFAULT)}")
    rows = [in_fresh_process(measure_model, name, args.threads) for name in MODELS]
    header = f"{'model':<22}{'vertices':>9}{'edges':>11}{'trace':>8}{'gt graph':>9}{'refresh':>8}"
    header += "".join(f"{c[:9]:>10}" for c in CENTRALITIES)
    print(f"{header}{'default':>9}{'capture':>9}{'1st capt':>9}{'RSS MB':>8}")
    for row in rows:
        times = "".join(f"{row['centrality_s'][c]:>10.3f}" for c in CENTRALITIES)
        print(
            f"{row['model']:<22}{row['vertices']:>9}{row['edges']:>11}{row['trace_s']:>8.2f}"
            f"{row['graph_tool_s']:>9.2f}{row['refresh_s']:>8.3f}{times}{row['default_centralities_s']:>9.3f}"
            f"{row['capture_s']:>9.3f}{row['first_capture_s']:>9.2f}{row['peak_rss_mb']:>8.0f}"
        )
    ratio = in_fresh_process(capture_versus_epoch, args.images, args.threads)
    print(
        f"\nresnet width 16, CIFAR-shaped ({args.images} images): training epoch "
        f"{ratio['epoch_s']:.2f} s, one capture with MLflow logging {ratio['capture_s']:.3f} s "
        f"= {100 * ratio['capture_over_epoch']:.1f}% of the epoch"
    )
    speed = []
    if not args.skip_networkx:
        for name in ("resnet-w16", "torchvision-resnet18"):
            result = in_fresh_process(networkx_versus_graph_tool, name, args.threads)
            speed.append(result)
            print(
                f"{name}: default centralities mlflow_tg {result['mlflow_tg_s']:.3f} s, "
                f"networkx {result['networkx_s']:.2f} s (graph build included): "
                f"{result['speedup']:.0f}x"
            )
    print(json.dumps({"threads": args.threads, "models": rows, "capture_vs_epoch": ratio,
                      "networkx": speed}))  # fmt: skip


if __name__ == "__main__":
    main()
