"""Edge weights of a traced network from its current parameters, BatchNorm scales folded in."""

from __future__ import annotations

import torch
from torch import nn

from mlflow_tg.graph.trace import EdgeBlock, ScaleTerm


class NonFiniteWeightsError(ValueError):
    """Some weights are NaN or infinite, so this snapshot has no meaningful graph."""


def batchnorm_scale(module: nn.Module) -> torch.Tensor:
    """``|γ / √(running_var + ε)|`` per channel (γ = 1 without affine parameters)."""
    scale = torch.rsqrt(module.running_var.detach() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach()
    return scale.abs()


def scale_factor(model: nn.Module, terms: list[ScaleTerm]) -> torch.Tensor | None:
    """Product of pending BatchNorm scales per channel, or None when there are none."""
    factor = None
    for term in terms:
        scale = batchnorm_scale(model.get_submodule(term.batchnorm))
        padded = torch.cat([scale, scale.new_ones(1)])  # index -1 picks the trailing 1
        factor = padded[term.index] if factor is None else factor * padded[term.index]
    return factor


def layer_norms(model: nn.Module, block: EdgeBlock) -> torch.Tensor:
    """Norms of a block's weight slices, (out, inputs per output), where the weights live."""
    if block.kind == "join":
        return torch.ones(len(block.inputs), 1)
    weight = model.get_submodule(block.layer).weight.detach()
    if block.kind == "conv":
        slices = weight.flatten(2)  # (out, in/groups, kernel positions)
    else:
        slices = weight.reshape(weight.shape[0], len(block.inputs), block.positions)
    if slices.shape[2] == 1:  # 1×1 kernels, plain linear layers: the norm is |w|, 10x faster
        return slices[:, :, 0].abs()
    return torch.linalg.vector_norm(slices, dim=2)


def block_weights(model: nn.Module, block: EdgeBlock) -> torch.Tensor:
    """The (out, in/groups) weights of one block's edges, with BatchNorm scales folded in."""
    norms = layer_norms(model, block)
    incoming = scale_factor(model, block.in_scale)
    if incoming is not None:  # column j of row o is input channel (o's group start) + j
        incoming = incoming.to(norms.device).reshape(block.groups, 1, -1)
        norms = (norms.reshape(block.groups, -1, block.per_group) * incoming).reshape(norms.shape)
    for batchnorm in block.out_folds:
        norms = norms * batchnorm_scale(model.get_submodule(batchnorm)).to(norms.device)[:, None]
    return norms
