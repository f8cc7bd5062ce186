"""Attention-sink dimensions: the sink score, the published dimension table, and a finder for new backbones.

A language model's attention sinks (BOS, ".", "\\n") carry *massive activations*: a few fixed hidden dimensions of
their residual-stream state are orders of magnitude above the rest. VAR (``zoo.methods.var``) calls a token a sink
at layer ``l`` when one of those dimensions, RMS-normalised, exceeds ``tau`` in the state entering layer ``l``:

    phi(x) = max_{d in D_sink} | x[d] / RMS(x) |,   RMS without the learned norm weight, eps 1e-6, in fp32.

The dimensions are a property of the language backbone. ``PUBLISHED_SINK_DIMS`` lists the ones published for
common backbones; ``find_sink_dims`` finds them for any LM the wrapper runs: it feeds a few prompts, RMS-normalises
the residual state of each prompt's first token (the text sink every causal LM grows) in the middle layers, and
ranks dimensions by their mean magnitude there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PUBLISHED_SINK_DIMS",
    "RMS_EPS",
    "rms_normalise",
    "sink_score",
    "SinkDimReport",
    "find_sink_dims",
    "resolve_sink_dims",
]

RMS_EPS = 1e-6

# Massive-activation dimensions per backbone (the VAR paper's official code and secondary summaries; see
# shared/reference/dyvte_var_flmm.md, section 2.1). Keys name the backbone, not a checkpoint path.
PUBLISHED_SINK_DIMS: dict[str, tuple[int, ...]] = {
    "llama2_7b": (1415, 2533),  # LLaVA-1.5-7B
    "llama2_13b": (2100, 4743),  # LLaVA-1.5-13B, LLaVA-1.6-vicuna-13B
    "qwen2_7b": (458, 2570),  # Qwen2-VL-7B
    "internlm2_7b": (3584,),  # InternVL2-8B's language model
}


def rms_normalise(hidden: torch.Tensor) -> torch.Tensor:
    """``x / RMS(x)`` over the last dimension, in fp32, without a learned weight (eps 1e-6)."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def sink_score(hidden: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``[..., D]`` residual states -> ``[...]`` phi: the largest ``|x[d] / RMS(x)|`` over ``dims``."""
    if not len(dims):
        raise ValueError("sink_score needs at least one sink dimension")
    if max(dims) >= hidden.shape[-1] or min(dims) < 0:
        raise ValueError(f"sink dimensions {list(dims)} do not fit hidden size {hidden.shape[-1]}")
    idx = torch.as_tensor(list(dims), device=hidden.device)
    return rms_normalise(hidden).index_select(-1, idx).abs().amax(-1)


@dataclass(frozen=True)
class SinkDimReport:
    """What ``find_sink_dims`` found.

    Attributes:
        dims: the chosen dimensions, strongest first.
        values: their mean ``|x[d] / RMS(x)|`` at the probed tokens.
        median: the median of that mean over all dimensions (what an ordinary dimension looks like).
        layers: the decoder layers whose *input* state was probed.
        tokens: probed tokens (one per prompt and layer).
    """

    dims: tuple[int, ...]
    values: tuple[float, ...]
    median: float
    layers: tuple[int, ...]
    tokens: int

    @property
    def ratio(self) -> float:
        """How far the strongest dimension stands out: its value over the median dimension's."""
        return self.values[0] / max(self.median, 1e-12)

    def massive(self, tau: float = 20.0) -> bool:
        """Whether the strongest dimension reaches the sink threshold ``tau`` (else no token can score a sink)."""
        return self.values[0] > tau

    def describe(self, tau: float = 20.0) -> str:
        vals = ", ".join(f"{d}: {v:.1f}" for d, v in zip(self.dims, self.values))
        verdict = f"{'the strongest' if self.massive(tau) else 'no'} dimension exceeds tau={tau:g}"
        return (
            f"sink dims {{{vals}}} (|x/RMS| at the first token, layers {list(self.layers)} inputs, "
            f"{self.tokens} probes); median dim {self.median:.2f}, ratio {self.ratio:.1f}x; {verdict}"
        )


@torch.no_grad()
def find_sink_dims(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    top_k: int = 2,
    layers: Sequence[int] | None = None,
    hooks: Sequence[Any] = (),
) -> SinkDimReport:
    """The massive-activation dimensions of a language model.

    ``model`` is a ``CausalLMWrapper``, a zoo model with ``.llm``, or a transformers model (e.g.
    ``LlavaForConditionalGeneration``, run text-only with ``output_hidden_states=True``). ``input_ids`` ``[B, T]``
    are a few left-padded text prompts; the probed token of each row is its first real token. ``layers`` are the
    decoder layers whose input state is probed (default: the middle ones, ``2 .. L-2``, at least one layer);
    ``hooks`` are extra wrapper hooks run first (a test plants activations with one; wrapper only).
    """
    model = getattr(model, "llm", model)
    wrapper = hasattr(model, "run_layer")  # our CausalLMWrapper owns the layer loop; anything else is transformers
    n_layers = len(model.layers) if wrapper else model.config.get_text_config().num_hidden_layers
    if layers is None:
        layers = range(min(2, n_layers - 1), max(n_layers - 1, min(2, n_layers - 1) + 1))
    layers = tuple(int(i) for i in layers)
    if not layers or min(layers) < 1 or max(layers) >= n_layers:
        raise ValueError(f"probe layers {list(layers)} must lie in 1..{n_layers - 1} (their input is a layer output)")
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    first = mask.long().argmax(1)  # left padding: the first 1 is the first real token
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    states: dict[int, torch.Tensor] = {}
    if wrapper:

        def probe(i: int, state: Any) -> None:
            if i + 1 in layers:  # the output of layer i is the input of layer i + 1
                states[i + 1] = state.hidden[rows, first]

        model(input_ids=input_ids, attention_mask=mask, hooks=[*hooks, probe], logits_to_keep=1)
    else:
        if hooks:
            raise ValueError("hooks= runs on our LM wrapper only; plant activations in a transformers model with "
                             "forward hooks")  # fmt: skip
        # transformers' hidden_states[l] is the input of decoder layer l (index 0: the embeddings)
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        states = {layer: out.hidden_states[layer][rows, first] for layer in layers}
    mean = torch.cat([rms_normalise(states[layer]).abs() for layer in layers]).mean(0)
    top = mean.topk(min(top_k, mean.numel()))
    return SinkDimReport(
        dims=tuple(int(d) for d in top.indices),
        values=tuple(float(v) for v in top.values),
        median=float(mean.median()),
        layers=layers,
        tokens=len(layers) * input_ids.shape[0],
    )


def resolve_sink_dims(dims: Any) -> tuple[int, ...] | None:
    """A ``dims`` option -> dimensions: a ``PUBLISHED_SINK_DIMS`` key, ``"3+17"``, an int, a list; None = find them."""
    if dims is None or dims == "auto":
        return None
    if isinstance(dims, str):
        if dims in PUBLISHED_SINK_DIMS:
            return PUBLISHED_SINK_DIMS[dims]
        try:
            return tuple(int(d) for d in dims.split("+"))
        except ValueError:
            raise ValueError(
                f"sink dims {dims!r}: expected 'auto', a published backbone ({', '.join(PUBLISHED_SINK_DIMS)}) "
                "or dimensions joined by '+', e.g. 1415+2533"
            ) from None
    if isinstance(dims, int):
        return (dims,)
    return tuple(int(d) for d in dims)
