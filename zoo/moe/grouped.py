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
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grouped_linear", "grouped_mm_supported", "sorted_experts_ffn", "sorted_lora_experts_ffn"]


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


# ---------------------------------------------------------------------------------------------------------------
# Fused CPU path: gather -> grouped FFN -> weighted index_add, with a hand-written backward
# ---------------------------------------------------------------------------------------------------------------

# Activations whose derivative has an ATen kernel with an out= variant, so the backward writes straight into the
# preallocated gradient buffer. Others go through a small autograd call on the activation alone.
_ATEN_GELU = {"gelu": "none", "gelu_tanh": "tanh", "gelu_pytorch_tanh": "tanh"}


def _mm_segments(a: Tensor, w: Tensor, out: Tensor, bounds, bias: Tensor | None = None, trans_w: bool = True) -> None:
    for e, s, t in bounds:
        we = w[e].t() if trans_w else w[e]
        if bias is None:
            torch.mm(a[s:t], we, out=out[s:t])
        else:
            torch.addmm(bias[e], a[s:t], we, out=out[s:t])


class _SortedExpertsFFN(torch.autograd.Function):
    """y = sum over pairs n of w_n * FFN_{e(n)}(x[tok_n]), pairs sorted by expert, summed into [T, d].

    Inputs: x [T, d]; tok [N] token of each pair (sorted by expert); pw [N] combine weights (x's dtype);
    w1 [E, H1, d] (+ b1 [E, H1]); w2 [E, d, h] (+ b2 [E, d]); swiglu has H1 = 2h (gate rows then up rows).
    Every intermediate is written by ``out=`` into one buffer, so there are no per-segment cat/split copies and no
    autograd bookkeeping per expert.
    """

    @staticmethod
    def forward(ctx, x, tok, pw, w1, b1, w2, b2, bounds, swiglu: bool, act_name: str, act_fn):
        N, d = tok.shape[0], x.shape[1]
        h = w2.shape[2]
        # Rows are gathered per segment into cache-sized temporaries (and gathered again in backward) instead of
        # materialising x[tok] as one [N, d] buffer: a gather is cheaper than the page faults of a fresh buffer.
        a = x.new_empty(N, w1.shape[1])
        for e, s, t in bounds:
            xs = x.index_select(0, tok[s:t])
            if b1 is None:
                torch.mm(xs, w1[e].t(), out=a[s:t])
            else:
                torch.addmm(b1[e], xs, w1[e].t(), out=a[s:t])
        if swiglu:
            hact = F.silu(a[:, :h])
            hact.mul_(a[:, h:])
        else:
            hact = act_fn(a)
        o = x.new_empty(N, d)
        _mm_segments(hact, w2, o, bounds, b2)
        # Weight and scatter segment by segment: the weighted rows live only in a cache-sized temporary.
        y = torch.zeros_like(x)
        for _, s, t in bounds:
            y.index_add_(0, tok[s:t], o[s:t] * pw[s:t, None])
        ctx.bounds, ctx.swiglu, ctx.act_name, ctx.act_fn = bounds, swiglu, act_name, act_fn
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.save_for_backward(x, tok, pw, w1, w2, a, hact, o)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, tok, pw, w1, w2, a, hact, o = ctx.saved_tensors
        need = ctx.needs_input_grad
        h = w2.shape[2]
        gy = gy.contiguous()
        g_x = torch.zeros_like(x) if need[0] else None
        g_pw = torch.zeros_like(pw) if need[2] else None
        g_w1 = torch.zeros_like(w1) if need[3] else None
        g_b1 = w1.new_zeros(w1.shape[0], w1.shape[1]) if ctx.has_b1 and need[4] else None
        g_w2 = torch.zeros_like(w2) if need[5] else None
        g_b2 = w2.new_zeros(w2.shape[0], w2.shape[1]) if ctx.has_b2 and need[6] else None
        # One pass per expert segment; every intermediate is a segment-sized temporary.
        for e, s, t in ctx.bounds:
            go = gy.index_select(0, tok[s:t])
            if g_pw is not None:
                torch.sum(go * o[s:t], dim=1, out=g_pw[s:t])
            go.mul_(pw[s:t, None])
            if g_w2 is not None:
                torch.mm(go.t(), hact[s:t], out=g_w2[e])
            if g_b2 is not None:
                torch.sum(go, dim=0, out=g_b2[e])
            g_h = torch.mm(go, w2[e])
            a_s = a[s:t]
            if ctx.swiglu:
                gate, up = a_s[:, :h], a_s[:, h:]
                ga = torch.empty_like(a_s)
                torch.mul(g_h, F.silu(gate), out=ga[:, h:])
                g_h.mul_(up)
                torch.ops.aten.silu_backward.grad_input(g_h, gate, grad_input=ga[:, :h])
            elif ctx.act_name in _ATEN_GELU:
                ga = torch.ops.aten.gelu_backward(g_h, a_s, approximate=_ATEN_GELU[ctx.act_name])
            else:
                with torch.enable_grad():
                    a_ = a_s.detach().requires_grad_(True)
                    (ga,) = torch.autograd.grad(ctx.act_fn(a_), a_, g_h)
            if g_w1 is not None:
                torch.mm(ga.t(), x.index_select(0, tok[s:t]), out=g_w1[e])
            if g_b1 is not None:
                torch.sum(ga, dim=0, out=g_b1[e])
            if g_x is not None:
                g_x.index_add_(0, tok[s:t], torch.mm(ga, w1[e]))
        return g_x, None, g_pw, g_w1, g_b1, g_w2, g_b2, None, None, None, None


def sorted_experts_ffn(
    x: Tensor,
    token_idx: Tensor,
    pair_weight: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    counts: list[int],
    swiglu: bool,
    act_name: str,
    act_fn,
) -> Tensor:
    """Routed experts on pairs sorted by expert, weighted and summed per token: the fused CPU path of ``MoE``."""
    bounds = segment_bounds(counts)
    params = (x, pair_weight, w1, b1, w2, b2)
    if not (torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)):
        # Inference: stream each expert's segment through both projections, so every intermediate is a
        # cache-sized temporary and nothing is kept for a backward pass.
        y = torch.zeros_like(x)
        h = w2.shape[2]
        for e, s, t in bounds:
            xs = x.index_select(0, token_idx[s:t])
            a = torch.mm(xs, w1[e].t()) if b1 is None else torch.addmm(b1[e], xs, w1[e].t())
            hact = F.silu(a[:, :h]).mul_(a[:, h:]) if swiglu else act_fn(a)
            o = torch.mm(hact, w2[e].t()) if b2 is None else torch.addmm(b2[e], hact, w2[e].t())
            y.index_add_(0, token_idx[s:t], o.mul_(pair_weight[s:t, None]))
        return y
    return _SortedExpertsFFN.apply(x, token_idx, pair_weight, w1, b1, w2, b2, bounds, swiglu,
                                   act_name, act_fn)


class _SortedLoRAExpertsFFN(torch.autograd.Function):
    """LoRA experts over one frozen base FFN, pairs sorted by expert, weighted and summed per token.

    The base first projection runs once per token ([T, H1]); per pair only its rows are gathered and the rank-r
    deltas added. ``b1_blocks`` lists the LoRA B matrices of the first projection, each [E, hb, r], applied to
    consecutive column blocks of the first projection's output and consecutive r-blocks of ``x @ A1^T``
    (swiglu: gate then up; gelu: one block). Base weights must not require grad.
    """

    @staticmethod
    def forward(ctx, x, tok, pw, a1, a2, b2l, w1, b1, w2, b2, bounds, swiglu, act_name, act_fn, scale, *b1_blocks):
        N, d = tok.shape[0], x.shape[1]
        h, r = w2.shape[1], a2.shape[1]
        base1 = torch.mm(x, w1.t()) if b1 is None else torch.addmm(b1, x, w1.t())  # [T, H1], once per token
        a = x.new_empty(N, w1.shape[0])
        z1 = x.new_empty(N, a1.shape[1])
        hact = x.new_empty(N, h)
        z2 = x.new_empty(N, r)
        o = x.new_empty(N, d)
        y = torch.zeros_like(x)
        for e, s, t in bounds:
            ts = tok[s:t]
            torch.index_select(base1, 0, ts, out=a[s:t])
            torch.mm(x.index_select(0, ts), a1[e].t(), out=z1[s:t])
            for j, bb in enumerate(b1_blocks):
                hb = bb.shape[1]
                a[s:t, j * hb:(j + 1) * hb].addmm_(z1[s:t, j * r:(j + 1) * r], bb[e].t(), alpha=scale)
            if swiglu:
                torch.mul(F.silu(a[s:t, :h]), a[s:t, h:], out=hact[s:t])
            else:
                hact[s:t] = act_fn(a[s:t])
            if b2 is None:
                torch.mm(hact[s:t], w2.t(), out=o[s:t])
            else:
                torch.addmm(b2, hact[s:t], w2.t(), out=o[s:t])
            torch.mm(hact[s:t], a2[e].t(), out=z2[s:t])
            o[s:t].addmm_(z2[s:t], b2l[e].t(), alpha=scale)
            y.index_add_(0, ts, o[s:t] * pw[s:t, None])
        ctx.meta = (bounds, swiglu, act_name, act_fn, scale, len(b1_blocks))
        ctx.save_for_backward(x, tok, pw, a1, a2, b2l, w1, w2, a, z1, hact, z2, o, *b1_blocks)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, tok, pw, a1, a2, b2l, w1, w2, a, z1, hact, z2, o, *b1_blocks = ctx.saved_tensors
        bounds, swiglu, act_name, act_fn, scale, _ = ctx.meta
        need = ctx.needs_input_grad
        h, r = w2.shape[1], a2.shape[1]
        gy = gy.contiguous()
        g_x = torch.zeros_like(x) if need[0] else None
        g_pw = torch.zeros_like(pw) if need[2] else None
        g_a1, g_a2, g_b2l = torch.zeros_like(a1), torch.zeros_like(a2), torch.zeros_like(b2l)
        g_b1 = [torch.zeros_like(bb) for bb in b1_blocks]
        g_base1 = torch.zeros(x.shape[0], w1.shape[0], dtype=x.dtype, device=x.device) if need[0] else None
        for e, s, t in bounds:
            ts = tok[s:t]
            go = gy.index_select(0, ts)
            if g_pw is not None:
                torch.sum(go * o[s:t], dim=1, out=g_pw[s:t])
            go.mul_(pw[s:t, None])
            # second projection: base (frozen) + LoRA
            torch.mm(go.t(), z2[s:t], out=g_b2l[e])
            g_b2l[e].mul_(scale)
            gz2 = torch.mm(go, b2l[e]).mul_(scale)
            torch.mm(gz2.t(), hact[s:t], out=g_a2[e])
            g_h = torch.mm(go, w2)
            g_h.addmm_(gz2, a2[e])
            a_s = a[s:t]
            if swiglu:
                gate, up = a_s[:, :h], a_s[:, h:]
                ga = torch.empty_like(a_s)
                torch.mul(g_h, F.silu(gate), out=ga[:, h:])
                g_h.mul_(up)
                torch.ops.aten.silu_backward.grad_input(g_h, gate, grad_input=ga[:, :h])
            elif act_name in _ATEN_GELU:
                ga = torch.ops.aten.gelu_backward(g_h, a_s, approximate=_ATEN_GELU[act_name])
            else:
                with torch.enable_grad():
                    a_ = a_s.detach().requires_grad_(True)
                    (ga,) = torch.autograd.grad(act_fn(a_), a_, g_h)
            # first projection LoRA blocks
            gz1 = torch.empty_like(z1[s:t])
            for j, bb in enumerate(b1_blocks):
                hb = bb.shape[1]
                gblk = ga[:, j * hb:(j + 1) * hb]
                torch.mm(gblk.t(), z1[s:t, j * r:(j + 1) * r], out=g_b1[j][e])
                g_b1[j][e].mul_(scale)
                torch.mm(gblk, bb[e], out=gz1[:, j * r:(j + 1) * r])
            gz1.mul_(scale)
            xs = x.index_select(0, ts)
            torch.mm(gz1.t(), xs, out=g_a1[e])
            if g_x is not None:
                g_x.index_add_(0, ts, torch.mm(gz1, a1[e]))
                g_base1.index_add_(0, ts, ga)
        if g_x is not None:
            g_x.addmm_(g_base1, w1)  # the base first projection ran once per token
        return (g_x, None, g_pw, g_a1 if need[3] else None, g_a2 if need[4] else None, g_b2l if need[5] else None,
                None, None, None, None, None, None, None, None, None, *g_b1)


def sorted_lora_experts_ffn(x, token_idx, pair_weight, a1, a2, b2_lora, w1, b1, w2, b2, counts, swiglu, act_name,
                            act_fn, scale, b1_blocks):
    """LoRA experts (frozen shared base + per-expert LoRA) on pairs sorted by expert: the fused path of ``MoE``."""
    return _SortedLoRAExpertsFFN.apply(x, token_idx, pair_weight, a1, a2, b2_lora, w1, b1, w2, b2,
                                       segment_bounds(counts), swiglu, act_name, act_fn, scale, *b1_blocks)
