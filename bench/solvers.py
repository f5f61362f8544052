"""Products of W spent by the spectral solvers, one-level against two-level, and their accuracy.

    python bench/solvers.py [--spectrum] [--pieces] [--digits-epochs 12] [NAME ...]

For each torchvision model (random weights, 10 classes, 224×224; default vit_b_16, vit_l_16,
resnet50) and for the built-in ``resnet`` width 16 and ``mlp`` width 8 trained on digits (SGD,
lr 0.1, momentum 0.9, batch 64; captured at epochs 0, 4, 8, 12), prints:

- eigenvector: products of Lanczos (``eigsh`` from the ones vector, as without layers) and of
  the two-level solver (its pass over the weights for W P counted as one product), and the
  largest difference of each from a float64 Lanczos reference at 1e-12, relative to the
  reference's largest value;
- PageRank: products of conjugate gradients with and without the layer preconditioner, and the
  same difference from a float64 CG reference at 1e-13;
- the cosine between the Perron vector and its best approximation in the layer space.

``--pieces`` times a product of W of each torchvision graph (median of 5) with its large
blocks multiplied whole and in pieces of 2, 4 and 8 MB. ``--spectrum`` adds the eight largest
eigenvalues of each torchvision graph (eigsh, k = 8) and
the products Lanczos takes with 20, 40, 60 and 100 vectors. One torch thread, two threads for
the products, as in ``bench/torchvision_zoo.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torchvision
from scipy.sparse.linalg import LinearOperator, eigsh

from mlflow_tg.graph import operator
from mlflow_tg.graph.build import RolledGraphBuilder
from mlflow_tg.graph.centrality import compute_centralities
from mlflow_tg.graph.operator import PIECE_BYTES, Adjacency, undirected_operator

THREADS = 2


class Counted:
    """W as a LinearOperator that counts its products."""

    def __init__(self, adjacency) -> None:
        self.calls, self.adjacency = 0, adjacency

    def product(self, x: np.ndarray) -> np.ndarray:
        """W x, counted."""
        self.calls += 1
        return self.adjacency @ x

    def operator(self) -> LinearOperator:
        """The counting product as a LinearOperator."""
        n = self.adjacency.shape[0]
        return LinearOperator((n, n), self.product, rmatvec=self.product, dtype=np.float64)


def relative_error(vector: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(vector - reference).max() / reference.max())


def references(builder: RolledGraphBuilder) -> dict[str, np.ndarray]:
    """Eigenvector and PageRank of the float64 graph, one-level, at the tightest tolerances."""
    weights = builder.weights.astype(np.float64)
    exact = undirected_operator(builder.plan.blocks, weights, builder.num_vertices, THREADS)
    n = builder.num_vertices
    _, vectors = eigsh(exact, k=1, which="LA", v0=np.ones(n), tol=1e-12, ncv=60)
    eigenvector = np.abs(vectors[:, 0])
    adjacency = Adjacency(exact, None, 1e-13)
    pagerank = compute_centralities(lambda: None, ["pagerank"], adjacency=adjacency)["pagerank"]
    return {"eigenvector": eigenvector / np.linalg.norm(eigenvector), "pagerank": pagerank}


def compare(label: str, builder: RolledGraphBuilder, spectrum: bool) -> None:
    """One graph's row: products and errors of both solvers of both centralities."""
    truth = references(builder)
    fast = builder.adjacency(THREADS)
    counted = Counted(fast.undirected)
    row = [label, str(builder.weights.dtype)]

    def spread(values: np.ndarray):  # one pass over the weights: counted as a product
        counted.calls += 1
        return fast.layers.spread(values)

    for layers in (None, dataclasses.replace(fast.layers, spread=spread)):
        adjacency = Adjacency(counted.operator(), fast.flow, fast.tolerance, layers)
        for name in ("eigenvector", "pagerank"):
            counted.calls = 0
            result = compute_centralities(lambda: None, [name], adjacency=adjacency)[name]
            products = counted.calls - 1  # strength's product, shared by every centrality
            row.append(f"{products} ({relative_error(result, truth[name]):.1e})")
    strength = fast.undirected @ np.ones(builder.num_vertices)
    basis, _ = fast.layers.space(strength)
    cosine = np.linalg.norm(basis.T @ truth["eigenvector"])
    print("| " + " | ".join([*row, f"{cosine:.7f}"]) + " |", flush=True)
    if spectrum:
        operator = counted.operator()
        values = eigsh(operator, k=8, which="LA", v0=np.ones(builder.num_vertices), tol=1e-5)[0]
        print(f"  eight largest eigenvalues: {np.round(np.sort(values)[::-1], 2).tolist()}")
        for ncv in (20, 40, 60, 100):
            counted.calls = 0
            eigsh(operator, k=1, which="LA", v0=np.ones(builder.num_vertices), tol=1e-6, ncv=ncv)
            print(f"  Lanczos with {ncv} vectors: {counted.calls} products")


def time_pieces(label: str, builder: RolledGraphBuilder) -> None:
    """Seconds of one product of W with blocks whole and in pieces of 2, 4 and 8 MB."""
    x, cells = np.random.default_rng(0).random(builder.num_vertices), []
    for size in (None, 1 << 21, 1 << 22, 1 << 23):
        operator.PIECE_BYTES = size or builder.weights.nbytes
        product = undirected_operator(builder.plan.blocks, builder.weights, len(x), THREADS)
        product @ x
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            product @ x
            seconds.append(time.perf_counter() - start)
        cells.append(
            f"{'whole' if size is None else f'{size >> 20} MB'} {np.median(seconds):.3f} s"
        )
    operator.PIECE_BYTES = PIECE_BYTES
    print(f"  {label}, one product: " + ", ".join(cells), flush=True)


def torchvision_graph(name: str) -> RolledGraphBuilder:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    builder = RolledGraphBuilder(model, (3, 224, 224))
    builder.refresh(model, THREADS)
    return builder


def digits_runs(epochs: int) -> None:
    """The built-in resnet and mlp trained on digits, compared every fourth epoch."""
    from sklearn.datasets import load_digits

    from mlflow_tg.train.models import build_model

    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    labels = torch.tensor(labels)
    for name, width in (("resnet", 16), ("mlp", 8)):
        torch.manual_seed(0)
        model = build_model(name, width, 1, 8, 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        builder = RolledGraphBuilder(model, (1, 8, 8))
        for epoch in range(epochs + 1):
            if epoch % 4 == 0:
                builder.refresh(model.eval())
                compare(f"`{name}` width {width}, epoch {epoch}", builder, spectrum=False)
            model.train()
            order = torch.randperm(len(images))
            for start in range(0, len(images), 64):
                batch = order[start : start + 64]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
                loss.backward()
                optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["vit_b_16", "vit_l_16", "resnet50"])
    parser.add_argument("--spectrum", action="store_true")
    parser.add_argument("--pieces", action="store_true")
    parser.add_argument("--digits-epochs", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("Products of W (largest difference from the float64 reference / its largest value).")
    print(
        "| graph | weights | eigenvector, Lanczos | PageRank, CG | eigenvector, two-level ", end=""
    )
    print("| PageRank, preconditioned | cosine to the layer space |")
    print("|---|---|---|---|---|---|---|")
    for name in args.names:
        builder = torchvision_graph(name)
        compare(f"`{name}`, initialisation", builder, args.spectrum)
        if args.pieces:
            time_pieces(f"`{name}`", builder)
    digits_runs(args.digits_epochs)


if __name__ == "__main__":
    main()
