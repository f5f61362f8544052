"""Edge weights of a traced network from its current parameters, norm scales folded in."""

from __future__ import annotations

import torch
from torch import nn

from mlflow_tg.graph.layout import ScaleTerm
from mlflow_tg.graph.trace import EdgeBlock


class NonFiniteWeightsError(ValueError):
    """Some weights are NaN or infinite, so this snapshot has no meaningful graph."""


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Detached, in float32 or float64: half-precision norms overflow; numpy has no bfloat16."""
    tensor = tensor.detach()
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def batchnorm_scale(module: nn.Module) -> torch.Tensor:
    """``|γ / √(running_var + ε)|`` per channel (γ = 1 without affine parameters)."""
    scale = torch.rsqrt(full_precision(module.running_var) + module.eps)
    if module.weight is not None:
        scale = scale * full_precision(module.weight)
    return scale.abs()


def term_scale(model: nn.Module, term: ScaleTerm) -> torch.Tensor:
    """The per-channel values of one scale: a BatchNorm's, or ``|γ|`` of a parameter."""
    if term.kind == "batchnorm":
        return batchnorm_scale(model.get_submodule(term.source))
    return full_precision(model.get_parameter(term.source)).abs().flatten()


def scale_factor(model: nn.Module, terms: list[ScaleTerm]) -> torch.Tensor | None:
    """Product of pending scales per channel, or None when there are none."""
    factor = None
    for term in terms:
        scale = term_scale(model, term)
        padded = torch.cat([scale, scale.new_ones(1)])  # index -1 picks the trailing 1
        index = torch.as_tensor(term.index, device=padded.device)
        factor = padded[index] if factor is None else factor * padded[index].to(factor.device)
    return factor


def layer_norms(
    model: nn.Module, block: EdgeBlock, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Norms of a block's weight slices, (out, inputs per output), where the weights live.

    Written into ``out`` when it has the weights' device and precision: a large model's
    temporary copy costs more than the norms themselves (fresh pages, then a second copy).
    """
    if block.kind == "join":
        return torch.ones(len(block.inputs), 1) if out is None else out.fill_(1)
    weight = full_precision(model.get_parameter(block.weight))
    if block.rows is not None:
        weight = weight[block.rows[0] : block.rows[1]]
    if out is not None and (out.dtype, out.device) != (weight.dtype, weight.device):
        out = None
    if block.kind == "conv":
        slices = weight.flatten(2)  # (out, in/groups, kernel positions)
    else:
        slices = weight.reshape(weight.shape[0], len(block.inputs), block.positions)
    if slices.shape[2] == 1:  # 1×1 kernels, plain linear layers: the norm is |w|, 10x faster
        return torch.abs(slices[:, :, 0], out=out) if out is not None else slices[:, :, 0].abs()
    return torch.linalg.vector_norm(slices, dim=2, out=out)


def block_weights(
    model: nn.Module, block: EdgeBlock, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The (out, in/groups) weights of one block's edges, with norm and layer scales folded in.

    ``out``, when given, receives them (converted to its precision and device).
    """
    norms = layer_norms(model, block, out)
    incoming = scale_factor(model, block.in_scale)
    if incoming is not None:  # column j of row o is input channel (o's group start) + j
        incoming = incoming.to(norms.device).reshape(block.groups, 1, -1)
        norms.view(block.groups, -1, block.per_group).mul_(incoming)
    outgoing = scale_factor(model, block.out_folds)
    if outgoing is not None:
        norms.mul_(outgoing.to(norms.device)[:, None])
    if out is not None and norms is not out:
        out.copy_(norms)
        return out
    return norms
