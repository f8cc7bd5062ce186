"""Grouped (segment-wise) linear layers for tokens sorted by expert.

``grouped_linear(x, weight, bias, counts)`` computes ``x[s_e:t_e] @ weight[e].T (+ bias[e])`` for every expert ``e``,
where rows ``[s_e, t_e)`` of ``x`` are the tokens routed to ``e`` (``counts[e]`` rows, in expert order). Two backends:

* ``torch._grouped_mm`` on CUDA (one fused kernel, bf16/fp16/fp32 where the device supports it);
* a loop over contiguous segments elsewhere (CPU), written as one autograd function that writes every segment's
  result straight into a preallocated output (forward) or gradient buffer (backward). In torch 2.14 the CPU
  ``_grouped_mm`` is itself a loop of ``aten::mm`` and needs 16-byte aligned strides, so it brings nothing there;
  the explicit loop avoids the per-segment ``cat``/``split`` copies that plain autograd over slices would add.

``sorted_experts_ffn`` and ``sorted_lora_experts_ffn`` are the fused CPU paths of ``MoE``: gather, expert FFN and
weighted combine of all (token, expert) pairs in one autograd function each, with hand-written backwards.
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
    if torch.cuda.get_device_capability(x.device) < (8, 0):  # the CUDA kernel needs SM80+ (torch >= 2.9)
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


def _combine_pairs(rows: Tensor, inv: Tensor, k: int, T: int) -> Tensor:
    """Sum the k pair rows of every token: ``rows`` is [N + 1, d] in sorted-pair order with a zero last row,
    ``inv`` [k * T] maps choice-major pair slots (j * T + t) to rows (N for dropped pairs). A gather with the
    inverse permutation plus a k-way add replaces ``index_add_``, which is slow with several CPU threads."""
    u = rows.index_select(0, inv).view(k, T, rows.shape[1])
    return torch.add(u[0], u[1]) if k == 2 else u.sum(dim=0)


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
    Each GEMM writes its segment straight into one preallocated buffer (no per-segment cat/split copies, no
    autograd bookkeeping per expert), and every elementwise step runs once over the whole buffer, so the number of
    kernel launches (parallel regions on CPU) stays at about one per expert per GEMM; that keeps the layer robust
    when the CPU is oversubscribed.
    """

    @staticmethod
    def forward(ctx, x, tok, inv, pw, w1, b1, w2, b2, bounds, swiglu: bool, act_name: str, act_fn):
        N, d = tok.shape[0], x.shape[1]
        h = w2.shape[2]
        xs = x.index_select(0, tok)
        a = x.new_empty(N, w1.shape[1])
        _mm_segments(xs, w1, a, bounds, b1)
        if swiglu:
            hact = F.silu(a[:, :h])
            hact.mul_(a[:, h:])
        else:
            hact = act_fn(a)
        o = x.new_empty(N, d)
        _mm_segments(hact, w2, o, bounds, b2)
        ow = x.new_empty(N + 1, d)
        torch.mul(o, pw.unsqueeze(1), out=ow[:N])
        ow[N].zero_()
        k = inv.shape[0] // x.shape[0]
        y = _combine_pairs(ow, inv, k, x.shape[0])
        ctx.k = k
        ctx.bounds, ctx.swiglu, ctx.act_name, ctx.act_fn = bounds, swiglu, act_name, act_fn
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.save_for_backward(x, tok, inv, pw, w1, w2, xs, a, hact, o)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, tok, inv, pw, w1, w2, xs, a, hact, o = ctx.saved_tensors
        bounds = ctx.bounds
        need = [ctx.needs_input_grad[0], *ctx.needs_input_grad[2:]]  # skip inv: indices as before
        h = w2.shape[2]
        go = gy.contiguous().index_select(0, tok)
        g_pw = (go * o).sum(dim=1) if need[2] else None
        go.mul_(pw.unsqueeze(1))
        g_w2 = _grad_w_segments(go, hact, w2, bounds) if need[5] else None
        g_b2 = _grad_b_segments(go, w2, bounds) if ctx.has_b2 and need[6] else None
        g_h = torch.empty_like(hact)
        _mm_segments(go, w2, g_h, bounds, trans_w=False)
        del go
        if ctx.swiglu:
            ga = torch.empty_like(a)
            gate, up = a[:, :h], a[:, h:]
            torch.mul(g_h, F.silu(gate), out=ga[:, h:])
            g_h.mul_(up)
            torch.ops.aten.silu_backward.grad_input(g_h, gate, grad_input=ga[:, :h])
        elif ctx.act_name in _ATEN_GELU:
            ga = torch.ops.aten.gelu_backward(g_h, a, approximate=_ATEN_GELU[ctx.act_name])
        else:
            with torch.enable_grad():
                a_ = a.detach().requires_grad_(True)
                (ga,) = torch.autograd.grad(ctx.act_fn(a_), a_, g_h)
        del g_h
        g_w1 = _grad_w_segments(ga, xs, w1, bounds) if need[3] else None
        g_b1 = _grad_b_segments(ga, w1, bounds) if ctx.has_b1 and need[4] else None
        g_x = None
        if need[0]:
            N = xs.shape[0]
            g_xs = xs.new_empty(N + 1, xs.shape[1])
            g_xs[N].zero_()
            _mm_segments(ga, w1, g_xs, bounds, trans_w=False)
            g_x = _combine_pairs(g_xs, inv, ctx.k, x.shape[0])
        return g_x, None, None, g_pw, g_w1, g_b1, g_w2, g_b2, None, None, None, None


def _grad_w_segments(g: Tensor, a: Tensor, w: Tensor, bounds) -> Tensor:
    gw = torch.empty_like(w)
    hit = set()
    for e, s, t in bounds:
        torch.mm(g[s:t].t(), a[s:t], out=gw[e])
        hit.add(e)
    for e in range(w.shape[0]):  # experts that got no rows have zero gradient; only they need clearing
        if e not in hit:
            gw[e].zero_()
    return gw


def _grad_b_segments(g: Tensor, w: Tensor, bounds) -> Tensor:
    gb = w.new_zeros(w.shape[0], w.shape[1])
    for e, s, t in bounds:
        torch.sum(g[s:t], dim=0, out=gb[e])
    return gb


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
    inv: Tensor,
) -> Tensor:
    """Routed experts on pairs sorted by expert, weighted and summed per token: the fused CPU path of ``MoE``.

    ``inv`` [k * T] gives, for every choice-major pair slot j * T + t, its row in the sorted pairs (N if dropped).
    """
    bounds = segment_bounds(counts)
    params = (x, pair_weight, w1, b1, w2, b2)
    if not (torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)):
        h = w2.shape[2]
        if torch.get_num_threads() == 1:
            # Single-threaded inference: stream each segment through both projections, so every intermediate is a
            # cache-sized temporary (no page faults of fresh [N, *] buffers). With several threads, the many small
            # parallel regions this needs cost more than they save, so the whole-buffer path below is used.
            y = torch.zeros_like(x)
            for e, s, t in bounds:
                xs = x.index_select(0, token_idx[s:t])
                a = torch.mm(xs, w1[e].t()) if b1 is None else torch.addmm(b1[e], xs, w1[e].t())
                hact = F.silu(a[:, :h]).mul_(a[:, h:]) if swiglu else act_fn(a)
                o = torch.mm(hact, w2[e].t()) if b2 is None else torch.addmm(b2[e], hact, w2[e].t())
                y.index_add_(0, token_idx[s:t], o.mul_(pair_weight[s:t, None]))
            return y
        # Inference: the training steps with nothing saved and the intermediates reused in place.
        a = x.new_empty(token_idx.shape[0], w1.shape[1])
        _mm_segments(x.index_select(0, token_idx), w1, a, bounds, b1)
        hact = F.silu(a[:, :h]).mul_(a[:, h:]) if swiglu else act_fn(a)
        del a
        N = token_idx.shape[0]
        o = x.new_empty(N + 1, x.shape[1])
        o[N].zero_()
        _mm_segments(hact, w2, o, bounds, b2)
        o[:N].mul_(pair_weight.unsqueeze(1))
        return _combine_pairs(o, inv, inv.shape[0] // x.shape[0], x.shape[0])
    return _SortedExpertsFFN.apply(x, token_idx, inv, pair_weight, w1, b1, w2, b2, bounds, swiglu, act_name, act_fn)


class _SortedLoRAExpertsFFN(torch.autograd.Function):
    """LoRA experts over one frozen base FFN, pairs sorted by expert, weighted and summed per token.

    The base first projection runs once per token ([T, H1]) and the base second projection once over all pairs;
    per expert segment only the low-rank LoRA products run. LoRA of the first projection: a1 [E, R1, d],
    b1l [E, H1, R1] (for swiglu a block-diagonal stack of the gate and up LoRA, so that one contiguous GEMM updates
    both halves); of the second: a2 [E, r, h], b2l [E, d, r]. Base weights must not require grad.
    """

    @staticmethod
    def forward(ctx, x, tok, inv, pw, a1, b1l, a2, b2l, w1, b1, w2, b2, bounds, swiglu, act_name, act_fn, scale):
        N = tok.shape[0]
        h, r = w2.shape[1], a2.shape[1]
        base1 = torch.mm(x, w1.t()) if b1 is None else torch.addmm(b1, x, w1.t())  # [T, H1], once per token
        a = base1.index_select(0, tok)
        del base1
        xs = x.index_select(0, tok)
        z1 = x.new_empty(N, a1.shape[1])
        _mm_segments(xs, a1, z1, bounds)
        for e, s, t in bounds:
            a[s:t].addmm_(z1[s:t], b1l[e].t(), alpha=scale)
        hact = F.silu(a[:, :h]).mul_(a[:, h:]) if swiglu else act_fn(a)
        o = x.new_empty(N + 1, x.shape[1])
        o[N].zero_()
        if b2 is None:
            torch.mm(hact, w2.t(), out=o[:N])
        else:
            torch.addmm(b2, hact, w2.t(), out=o[:N])
        z2 = x.new_empty(N, r)
        _mm_segments(hact, a2, z2, bounds)
        for e, s, t in bounds:
            o[s:t].addmm_(z2[s:t], b2l[e].t(), alpha=scale)
        ow = o * torch.cat([pw, pw.new_zeros(1)]).unsqueeze(1)
        y = _combine_pairs(ow, inv, inv.shape[0] // x.shape[0], x.shape[0])
        ctx.meta = (bounds, swiglu, act_name, act_fn, scale)
        ctx.save_for_backward(x, tok, inv, pw, a1, b1l, a2, b2l, w1, w2, xs, a, z1, hact, z2, o)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, tok, inv, pw, a1, b1l, a2, b2l, w1, w2, xs, a, z1, hact, z2, o = ctx.saved_tensors
        bounds, swiglu, act_name, act_fn, scale = ctx.meta
        need = ctx.needs_input_grad
        N, T = tok.shape[0], x.shape[0]
        h, r = w2.shape[1], a2.shape[1]
        go = gy.contiguous().index_select(0, tok)
        g_pw = (go * o[:N]).sum(dim=1) if need[3] else None
        go.mul_(pw.unsqueeze(1))
        # second projection: frozen base over all pairs, LoRA per segment
        g_a2, g_b2l = torch.zeros_like(a2), torch.zeros_like(b2l)
        gz2 = x.new_empty(N, r)
        for e, s, t in bounds:
            torch.mm(go[s:t].t(), z2[s:t], out=g_b2l[e])
            torch.mm(go[s:t], b2l[e], out=gz2[s:t])
        g_b2l.mul_(scale)
        gz2.mul_(scale)
        for e, s, t in bounds:
            torch.mm(gz2[s:t].t(), hact[s:t], out=g_a2[e])
        g_h = torch.mm(go, w2)
        del go
        for e, s, t in bounds:
            g_h[s:t].addmm_(gz2[s:t], a2[e])
        ga = x.new_empty(N + 1, a.shape[1])
        ga[N].zero_()
        if swiglu:
            gate, up = a[:, :h], a[:, h:]
            torch.mul(g_h, F.silu(gate), out=ga[:N, h:])
            g_h.mul_(up)
            torch.ops.aten.silu_backward.grad_input(g_h, gate, grad_input=ga[:N, :h])
        elif act_name in _ATEN_GELU:
            torch.ops.aten.gelu_backward.grad_input(g_h, a, approximate=_ATEN_GELU[act_name], grad_input=ga[:N])
        else:
            with torch.enable_grad():
                a_ = a.detach().requires_grad_(True)
                ga[:N] = torch.autograd.grad(act_fn(a_), a_, g_h)[0]
        del g_h
        # first projection LoRA blocks
        g_b1l = torch.zeros_like(b1l)
        gz1 = torch.empty_like(z1)
        for e, s, t in bounds:
            torch.mm(ga[s:t].t(), z1[s:t], out=g_b1l[e])
            torch.mm(ga[s:t], b1l[e], out=gz1[s:t])
        g_b1l.mul_(scale)
        gz1.mul_(scale)
        g_a1 = _grad_w_segments(gz1, xs, a1, bounds)
        g_x = None
        if need[0]:
            g_xs = x.new_empty(N + 1, x.shape[1])
            g_xs[N].zero_()
            _mm_segments(gz1, a1, g_xs, bounds, trans_w=False)
            k = inv.shape[0] // T
            g_x = _combine_pairs(g_xs, inv, k, T)
            g_x.addmm_(_combine_pairs(ga, inv, k, T), w1)  # the base first projection ran once per token
        return (g_x, None, None, g_pw, g_a1 if need[4] else None, g_b1l if need[5] else None,
                g_a2 if need[6] else None, g_b2l if need[7] else None, None, None, None, None, None, None, None, None,
                None)


def sorted_lora_experts_ffn(x, token_idx, pair_weight, a1, b1_lora, a2, b2_lora, w1, b1, w2, b2, counts, swiglu,
                            act_name, act_fn, scale, inv):
    """LoRA experts (frozen shared base + per-expert LoRA) on pairs sorted by expert: the fused path of ``MoE``."""
    return _SortedLoRAExpertsFFN.apply(x, token_idx, inv, pair_weight, a1, b1_lora, a2, b2_lora, w1, b1, w2, b2,
                                       segment_bounds(counts), swiglu, act_name, act_fn, scale)
