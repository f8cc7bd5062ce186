"""Grouped (segment-wise) linear layers for tokens sorted by expert.

``grouped_linear(x, weight, bias, counts)`` computes ``x[s_e:t_e] @ weight[e].T (+ bias[e])`` for every expert ``e``,
where rows ``[s_e, t_e)`` of ``x`` are the tokens routed to ``e`` (``counts[e]`` rows, in expert order). Two backends:

* ``torch._grouped_mm`` on CUDA (one fused kernel, bf16/fp16/fp32 where the device supports it);
* a loop over contiguous segments elsewhere (CPU), written as one autograd function that writes every segment's
  result straight into a preallocated output (forward) or gradient buffer (backward). In torch 2.14 the CPU
  ``_grouped_mm`` is itself a loop of ``aten::mm`` and needs 16-byte aligned strides, so it brings nothing there;
  the explicit loop avoids the per-segment ``cat``/``split`` copies that plain autograd over slices would add.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_linear", "grouped_mm_supported"]


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run this product: CUDA, a supported dtype and 16-byte aligned rows."""
    if not (x.is_cuda and weight.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dtype != weight.dtype:
        return False
    elem = x.element_size()
    return (x.shape[-1] * elem) % 16 == 0 and (weight.shape[1] * elem) % 16 == 0


class _SegmentLinear(torch.autograd.Function):
    """``out[seg_e] = x[seg_e] @ w[e].T + b[e]`` over contiguous segments, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, bounds: list[tuple[int, int, int]]) -> Tensor:
        out = x.new_empty(x.shape[0], weight.shape[1])
        for e, s, t in bounds:
            if bias is None:
                torch.mm(x[s:t], weight[e].t(), out=out[s:t])
            else:
                torch.addmm(bias[e], x[s:t], weight[e].t(), out=out[s:t])
        ctx.bounds = bounds
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        bounds = ctx.bounds
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            for e, s, t in bounds:
                torch.mm(grad_out[s:t], weight[e], out=grad_x[s:t])
            covered = sum(t - s for _, s, t in bounds)
            if covered != x.shape[0]:  # rows outside every segment (never produced by MoE) get zero gradient
                grad_x[covered:].zero_()
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight)
            for e, s, t in bounds:
                torch.mm(grad_out[s:t].t(), x[s:t], out=grad_w[e])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = weight.new_zeros(weight.shape[0], weight.shape[1])
            for e, s, t in bounds:
                torch.sum(grad_out[s:t], dim=0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def segment_bounds(counts: list[int]) -> list[tuple[int, int, int]]:
    """``[(expert, start, end)]`` for the non-empty segments of a count list."""
    bounds, start = [], 0
    for e, c in enumerate(counts):
        if c:
            bounds.append((e, start, start + c))
        start += c
    return bounds


def grouped_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    counts: list[int] | None = None,
    offsets: Tensor | None = None,
    use_grouped_mm: bool | None = None,
) -> Tensor:
    """Per-expert linear over rows sorted by expert.

    Args:
        x: ``[N, in]`` rows sorted by expert.
        weight: ``[E, out, in]`` stacked expert weights.
        bias: ``[E, out]`` or None.
        counts: rows per expert (python ints, summing to N); needed by the segment loop.
        offsets: ``int32 [E]`` cumulative row ends, on ``x``'s device; used by ``torch._grouped_mm``.
        use_grouped_mm: force (True) or forbid (False) ``torch._grouped_mm``; None picks it where supported.
    """
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x, weight)
    if use_grouped_mm:
        if offsets is None:
            assert counts is not None
            offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        out = torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
        if bias is not None:
            sizes = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long())
            out = out + bias.repeat_interleave(sizes, dim=0, output_size=x.shape[0])
        return out
    assert counts is not None, "the segment loop needs per-expert row counts"
    return _SegmentLinear.apply(x, weight, bias, segment_bounds(counts))
