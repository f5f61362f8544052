"""Where the channels of a tensor are: the channel axes tracked through permutes and reshapes.

A tensor of the forward pass maps onto vertices through a :class:`Value`. Its channels usually
lie along one axis (dimension 1 of an image batch, the last dimension of a token sequence), but
a reshape may split them over several axes (the ``view`` of a channel shuffle) and a permute may
move or reorder those axes. ``Value.vertices`` is therefore an array with one dimension per
channel axis, in the order of ``Value.axes``: reordering channels is a permutation of this array
(a vertex permutation), never new vertices or edges. Pending scales keep an index array of the
same shape, so they follow every such move.

The functions here raise :class:`LayoutError` with what an operation would do to the channels
(mix them with positions, select one of them); the tracer turns it into a refusal that names
the module and operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import fx

    from mlflow_tg.graph.trace import EdgeBlock


class LayoutError(ValueError):
    """An operation that would mix channels with each other or with positions."""


@dataclass
class ScaleTerm:
    """A per-channel scale not yet folded: value channel ``c`` is scaled by ``source[index[c]]``.

    ``kind`` is ``batchnorm`` (``source`` is the module: ``|γ/√(var+ε)|``) or ``abs`` (``source``
    is a parameter: ``|γ|`` of a LayerNorm or a layer scale). ``index`` has the shape of the
    vertices it scales; -1 marks a channel this term does not scale.
    """

    kind: str
    source: str
    index: np.ndarray


@dataclass
class Value:
    """How one tensor of the forward pass maps onto vertices.

    ``vertices[i0, i1, …]`` is the vertex of the channel at index ``ik`` along tensor axis
    ``axes[k]``. ``positions`` counts the features of each channel once flattened; ``scale``
    holds scales waiting for the next layer; ``producer`` is the block that made these channels
    while a scale may still fold into it; ``root`` is the operation that created the vertices.
    """

    vertices: np.ndarray
    root: fx.Node | None
    positions: int = 1
    scale: list[ScaleTerm] = field(default_factory=list)
    producer: EdgeBlock | None = None
    axes: tuple[int, ...] = (1,)

    @property
    def channels(self) -> int:
        """Number of channels."""
        return self.vertices.size

    def flat(self) -> np.ndarray:
        """The vertices in the order of the channel index of a single channel axis."""
        return self.vertices.ravel()


def relaid(value: Value, move: Callable[[np.ndarray], np.ndarray], **changes: Any) -> Value:
    """``value`` with ``move`` applied to its vertices and to the index of every pending scale."""
    scale = [replace(term, index=move(term.index)) for term in value.scale]
    return replace(value, vertices=move(value.vertices), scale=scale, **changes)


def canonical(value: Value) -> Value:
    """The same value with its channel axes in increasing tensor order."""
    order = np.argsort(value.axes)
    axes = tuple(value.axes[k] for k in order)
    return relaid(value, lambda a: np.transpose(a, order), axes=axes)


def permuted(value: Value, dims: Sequence[int]) -> Value:
    """After ``x.permute(dims)``: output axis ``k`` is input axis ``dims[k]``."""
    dims = [d % len(dims) for d in dims]
    return replace(value, axes=tuple(dims.index(axis) for axis in value.axes))


def transposed(value: Value, ndim: int, a: int, b: int) -> Value:
    """After ``x.transpose(a, b)``."""
    dims = list(range(ndim))
    dims[a % ndim], dims[b % ndim] = dims[b % ndim], dims[a % ndim]
    return permuted(value, dims)


def reshape_groups(before: Sequence[int], after: Sequence[int]) -> list[tuple[list, list]]:
    """Pair the dimensions of a reshape into groups of equal size, in order.

    Each group is (dimensions before, dimensions after) with the same product: a reshape only
    regroups the elements inside each group.
    """
    groups, i, j = [], 0, 0
    while i < len(before) or j < len(after):
        old, new, size_old, size_new = [], [], 1, 1
        if i < len(before):
            old.append(i)
            size_old, i = before[i], i + 1
        if j < len(after):
            new.append(j)
            size_new, j = after[j], j + 1
        while size_old != size_new:
            if size_old < size_new and i < len(before):
                old.append(i)
                size_old, i = size_old * before[i], i + 1
            elif size_new < size_old and j < len(after):
                new.append(j)
                size_new, j = size_new * after[j], j + 1
            else:
                raise LayoutError(f"a reshape of {tuple(before)} into {tuple(after)}")
        groups.append((old, new))
    return groups


def reshaped(value: Value, before: Sequence[int], after: Sequence[int]) -> Value:
    """After a view, reshape, flatten, squeeze or unsqueeze from shape ``before`` to ``after``.

    Channel axes may be split or merged among themselves (the vertices are reshaped with
    them), and the channels may absorb the positions that follow them (a flatten: each
    channel then has ``positions`` features). Anything else mixes channels and positions.
    """
    value = canonical(value)
    axes, sizes, positions = [], [], value.positions
    for old, new in reshape_groups(before, after):
        channel = [d for d in old if d in value.axes]
        if not channel:
            continue
        others = [d for d in old if d not in value.axes and before[d] > 1]
        big = [d for d in new if after[d] > 1] or new[:1]
        if not big:
            raise LayoutError(
                f"removing the channel axis (shape {tuple(before)} into {tuple(after)})"
            )
        if others:
            if len(big) > 1 or max(channel) > min(others) or len(channel) < len(value.axes):
                raise LayoutError(
                    f"a reshape of {tuple(before)} into {tuple(after)} mixing the channels "
                    "with other dimensions"
                )
            positions *= math.prod(before[d] for d in others)
            big = big[:1]
            axes.append(big[0])
            sizes.append(math.prod(before[d] for d in channel))
            continue
        if positions > 1:  # flattened features: the group must stay one axis of them
            if len(big) > 1:
                raise LayoutError(f"splitting flattened features into {tuple(after)}")
            sizes.append(math.prod(value.vertices.shape))
        else:
            sizes += [after[d] for d in big]
        axes += big
    return relaid(value, lambda a: a.reshape(sizes), axes=tuple(axes), positions=positions)


def reduced(value: Value, ndim: int, dims: Sequence[int], keepdim: bool) -> Value:
    """After a mean or max over ``dims``, which must not hold the batch or a channel axis."""
    dims = sorted({d % ndim for d in dims})
    if 0 in dims or set(dims) & set(value.axes):
        raise LayoutError(f"over dimensions {list(dims)} (mixing channels)")
    if keepdim:
        return replace(value)
    return replace(value, axes=tuple(a - sum(d < a for d in dims) for a in value.axes))


def indexed(value: Value, ndim: int, index: Any, is_tensor: Callable[[Any], bool]) -> Value:
    """After ``x[index]``: slices may select channels; an integer may only drop a position axis."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(is_tensor(item) for item in items):
        raise LayoutError("indexing with a tensor")
    used = sum(item is not None and item is not Ellipsis for item in items)
    ellipsis = [k for k, item in enumerate(items) if item is Ellipsis]
    if ellipsis:
        items[ellipsis[0] : ellipsis[0] + 1] = [slice(None)] * (ndim - used)
    else:
        items += [slice(None)] * (ndim - used)
    moved, selections, source, target = {}, {}, 0, 0
    for item in items:
        if item is None:
            target += 1
        elif isinstance(item, slice):
            moved[source], selections[source] = target, item
            source, target = source + 1, target + 1
        elif source in value.axes:
            raise LayoutError("selecting one channel")
        else:
            source += 1  # an integer (or a symbolic one) drops this position axis
    picks = tuple(selections[axis] for axis in value.axes)
    for piece in picks:
        if any(
            b is not None and not isinstance(b, int) for b in (piece.start, piece.stop, piece.step)
        ):
            raise LayoutError("a slice of the channels with a computed bound")
    return relaid(value, lambda a: a[picks], axes=tuple(moved[axis] for axis in value.axes))


def pieces(value: Value, ndim: int, dim: int, sizes: Sequence[int]) -> list[Value]:
    """The parts of a chunk or split along ``dim``: along a channel axis, the channels split."""
    dim %= ndim
    if dim in value.axes and value.positions > 1:
        raise LayoutError("splitting flattened features")
    if dim not in value.axes:
        return [replace(value, root=None, producer=None) for _ in sizes]
    k = value.axes.index(dim)
    cuts = np.cumsum(sizes)[:-1]
    parts = []
    for start, stop in zip([0, *cuts], [*cuts, sum(sizes)], strict=True):
        picks = tuple(slice(start, stop) if j == k else slice(None) for j in range(len(value.axes)))
        parts.append(relaid(value, lambda a, p=picks: a[p], root=None, producer=None))
    return parts


def tiled(value: Value, times: int) -> Value:
    """Channels repeated ``times`` over a single channel axis (space-to-depth): shared vertices."""
    if len(value.axes) != 1:
        raise LayoutError("repeating channels split over several axes")
    return relaid(value, lambda a: np.tile(a, times), root=None, producer=None)
