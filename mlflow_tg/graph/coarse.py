"""Two-level solvers for the spectral centralities: the layers as a coarse space.

A rolled graph is a long chain of layers, and its Perron vector and PageRank vary slowly along
that chain. Those slow directions are what one-vector Krylov solvers resolve last: the top of a
ViT-L/16 graph's spectrum at initialisation is a cluster (its eight largest eigenvalues lie
within 2.3 %), and Lanczos needs 100-120 products of W to separate it, whatever its subspace
size. The space of "one value per layer, times a fixed profile inside the layer" holds almost
all of those directions (cosine 0.9999999 between the Perron vector and its best vector in that
space), and W applied to all of its columns costs one pass over the weights, because each layer
block reads one layer and writes one (a concatenation reads several: one product per layer).
So both solvers carry that space along exactly:

- ``perron``: Rayleigh-Ritz on the layer space plus the residuals of the current estimate
  (Davidson's method without a preconditioner): 3 products of W instead of 60-140 on ViTs.
- ``pagerank_preconditioner``: conjugate gradients preconditioned by a coarse-space correction
  (the balancing Neumann-Neumann / deflation preconditioner): 6 products instead of 19.

Both stop on the same residual as the one-level solvers, so they answer the same centralities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.linalg import cho_factor, cho_solve
from scipy.sparse.linalg import LinearOperator

# Products spent in the layer space before falling back to Lanczos; at ~8 bytes a vertex each
# vector of the growing basis is a few MB on the largest models.
MAX_PRODUCTS = 40


@dataclass(frozen=True)
class Layers:
    """The vertices grouped by layer, with W applied to a whole layer basis in one pass.

    ``index[i]`` is the layer of vertex ``i`` (0 … ``count`` - 1). ``spread(values)`` returns
    W P as a sparse (n × count) matrix, where P holds ``values[i]`` at (i, index[i]): column a
    of P is ``values`` on layer a and zero elsewhere.
    """

    index: np.ndarray
    count: int
    spread: Callable[[np.ndarray], sp.csr_matrix]

    @classmethod
    def of_matrix(cls, adjacency: Any, index: np.ndarray) -> Layers:
        """The layer space of an explicit (sparse or dense) adjacency matrix."""
        index = np.asarray(index)
        count = int(index.max()) + 1 if len(index) else 0
        return cls(
            index, count, lambda values: sp.csr_matrix(adjacency @ basis(index, count, values))
        )

    def normalised(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(``values`` scaled to unit norm on each layer, the kept layers, each layer's norm).

        A layer is kept where ``values`` is not all zero.
        """
        norms = np.sqrt(np.bincount(self.index, values * values, minlength=self.count))
        kept = np.flatnonzero(norms > 0)
        scale = np.zeros(self.count)
        scale[kept] = 1 / norms[kept]
        return values * scale[self.index], kept, norms

    def basis(self, unit: np.ndarray, kept: np.ndarray) -> sp.csr_matrix:
        """P with ``unit`` on each kept layer's column: disjoint supports, so orthonormal."""
        return basis(self.index, self.count, unit)[:, kept]

    def space(self, values: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """(P, W P) for P of ``values`` normalised per layer: one pass over the weights."""
        unit, kept, _ = self.normalised(values)
        return self.basis(unit, kept), self.spread(unit)[:, kept]


def basis(index: np.ndarray, count: int, values: np.ndarray) -> sp.csr_matrix:
    """P with ``values[i]`` at (i, index[i])."""
    n = len(index)
    return sp.csr_matrix((np.asarray(values, np.float64), (np.arange(n), index)), shape=(n, count))


def _dense(matrix: Any) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def perron(
    adjacency: Any, layers: Layers, strength: np.ndarray, tolerance: float
) -> tuple[float, np.ndarray, bool]:
    """λ_max and its eigenvector of a symmetric W ≥ 0, by Rayleigh-Ritz on a growing basis.

    The basis starts as the layer space with the strength as the profile inside each layer,
    and each step adds the residual of the current Ritz vector, orthogonalised. The result is
    the top Ritz pair (unit vector, signs as found) and whether its residual
    ``‖W x - θ x‖ ≤ tolerance · θ`` (ARPACK's test) was reached within ``MAX_PRODUCTS``.
    """
    coarse, coarse_product = layers.space(strength)
    coarse_gram = _dense(coarse.T @ coarse_product)
    added, added_product = np.zeros((len(strength), 0)), np.zeros((len(strength), 0))
    cross = np.zeros((coarse.shape[1], 0))  # Pᵀ W K
    for _ in range(MAX_PRODUCTS + 1):
        gram = np.block([[coarse_gram, cross], [cross.T, added.T @ added_product]])
        values, vectors = np.linalg.eigh((gram + gram.T) / 2)
        value, weights = values[-1], vectors[:, -1]
        head, tail = weights[: coarse.shape[1]], weights[coarse.shape[1] :]
        vector = coarse @ head + added @ tail
        residual = coarse_product @ head + added_product @ tail - value * vector
        if np.linalg.norm(residual) <= tolerance * abs(value) or added.shape[1] == MAX_PRODUCTS:
            break
        direction = residual
        for _ in range(2):  # twice is enough (Kahan): one pass loses orthogonality in float64
            direction = direction - coarse @ (coarse.T @ direction) - added @ (added.T @ direction)
        norm = np.linalg.norm(direction)
        if norm <= 1e-14 * np.linalg.norm(residual):  # the basis holds an invariant subspace
            break
        direction /= norm
        product = np.asarray(adjacency @ direction, dtype=np.float64)
        added = np.column_stack([added, direction])
        added_product = np.column_stack([added_product, product])
        cross = np.column_stack([cross, coarse.T @ product])
    converged = np.linalg.norm(residual) <= tolerance * abs(value)
    return float(value), vector, bool(converged)


def pagerank_preconditioner(
    layers: Layers, inv_sqrt: np.ndarray, damping: float
) -> tuple[LinearOperator, Callable[[np.ndarray], np.ndarray]]:
    """A coarse-space preconditioner for PageRank's ``(I - d D^-½ W D^-½) y = b``, and a start.

    The coarse basis B has, per layer, ``√strength`` on its weighted vertices: the top
    eigenvector of D^-½ W D^-½ lies in it exactly, and the slow layer-to-layer directions
    nearly. ``M⁻¹ = (I - Q M)(I - M Q) + Q`` with ``Q = B (Bᵀ M B)⁻¹ Bᵀ`` and ``M`` the system
    (balancing Neumann-Neumann) is symmetric positive definite, costs no product of W per
    iteration once M B is known (one pass), and removes the coarse directions from CG's work.
    Returns the preconditioner and ``b ↦ Q b``, CG's start vector. Needs a vertex with weight.
    """
    weighted = inv_sqrt > 0
    root = np.zeros_like(inv_sqrt)
    root[weighted] = 1 / inv_sqrt[weighted]
    unit, kept, norms = layers.normalised(root)
    coarse = layers.basis(unit, kept)
    # M B = B - d D^-½ W D^-½ B, and D^-½ B is the indicator of each layer's weighted vertices,
    # scaled by the column's norm: one pass over the weights.
    spread = layers.spread(weighted.astype(np.float64))[:, kept] @ sp.diags(1 / norms[kept])
    coarse_system = sp.csr_matrix(coarse - damping * sp.diags(inv_sqrt) @ spread)
    gram = _dense(coarse.T @ coarse_system)
    factor = cho_factor((gram + gram.T) / 2)

    def coarse_solve(r: np.ndarray) -> np.ndarray:
        return cho_solve(factor, r)

    def correction(r: np.ndarray) -> np.ndarray:  # Q r
        return coarse @ coarse_solve(coarse.T @ r)

    def apply(r: np.ndarray) -> np.ndarray:
        r = np.ravel(r)
        smoothed = r - coarse_system @ coarse_solve(coarse.T @ r)  # (I - M Q) r
        smoothed = smoothed - coarse @ coarse_solve(coarse_system.T @ smoothed)  # (I - Q M)
        return smoothed + correction(r)

    n = len(inv_sqrt)
    return LinearOperator((n, n), matvec=apply, dtype=np.float64), correction
