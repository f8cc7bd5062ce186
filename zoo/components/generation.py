"""The generation engine every LLaVA-like family uses (prompt batch -> KV-cache decode loop -> texts + stats).

``MultimodalGenerationMixin`` gives a model ``generate`` (texts in, texts out) and ``generate_ids`` (token level). A
family writes no decoding code: it provides ``llm`` (a ``CausalLMWrapper``), ``tokenizer``, ``template``,
``build_generation_inputs(images, prompts, apply_template[, media=...])`` returning left-padded ``input_ids``,
``attention_mask`` and its media tensors, ``embed_multimodal(input_ids, **media_tensors)`` and
``media_mask(input_ids)``. A ``zoo.methods`` method (or bare hooks / layer kwargs / an attention implementation) runs
in prefill and in every decode step. ``GenerationStats`` is the one record of a call; ``eval`` reads it directly.
``decoder_prefill_flops`` turns the per-layer token counts of a call into FLOPs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zoo.components.attention import use_attention
from zoo.components.lm import CausalLMWrapper, LayerHook
from zoo.methods import Method, MethodContext, build_method
from zoo.moe import MoE

__all__ = [
    "GenerationStats",
    "MultimodalGenerationMixin",
    "next_token",
    "stop_token_ids",
    "decode_until_stop",
    "decoder_prefill_flops",
]


@dataclass(frozen=True, kw_only=True)
class GenerationStats:
    """Timing and cost of one batched ``generate`` call, as measured inside the model.

    Attributes:
        prefill_seconds: time to process the prompts (media + text) up to the first generated token.
        decode_seconds: time spent in the token-by-token decode steps after that.
        generated_tokens: new tokens over the batch (not counting padding after a sequence ended).
        prompt_tokens: prompt tokens over the batch (media tokens included, padding excluded).
        decode_steps: decode forward passes; if None, decode latency per step is estimated as
            ``decode_seconds * batch_size / generated_tokens`` (exact when all sequences have the same length).
        batch_size: prompts in the call.
        method: the spec of the method the call ran with (``"none"`` for the plain model).
        prefill_layer_tokens: per decoder layer, the non-padding tokens it processed in prefill, summed over the
            batch (what a token-dropping method changes; FLOPs are counted from it).
        extra: numbers a method reports (``"<method>/<name>"``).
    """

    prefill_seconds: float
    decode_seconds: float
    generated_tokens: int
    prompt_tokens: int | None = None
    decode_steps: int | None = None
    batch_size: int | None = None
    method: str = "none"
    prefill_layer_tokens: tuple[int, ...] | None = None
    extra: dict[str, float] = field(default_factory=dict)


def next_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` ids: argmax, or a sample at ``temperature`` from the nucleus ``top_p``."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_token_ids(tokenizer: Any, template: Any) -> set[int]:
    """eos, plus the template's end-of-answer string (sep2, or "\\n" for the plain template) when it is one token."""
    stop = set()
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    tid = tokenizer.convert_tokens_to_ids(template.stop_str) if template.stop_str else None
    if tid is not None and tid != tokenizer.unk_token_id:
        stop.add(tid)
    return stop


def decode_until_stop(tokenizer: Any, tokens: torch.Tensor, stop: Sequence[int] | set[int]) -> list[str]:
    """``[B, n]`` generated ids -> texts, each cut before its first stop id."""
    texts = []
    for row in tokens.tolist():
        keep = []
        for t in row:
            if t in stop:
                break
            keep.append(t)
        texts.append(tokenizer.decode(keep, skip_special_tokens=True).strip())
    return texts


def _mlp_macs_per_token(mlp: nn.Module) -> int:
    """Multiply-accumulates of one token through a decoder layer's FFN: dense, or MoE counted by activated experts."""
    if not isinstance(mlp, MoE):
        return sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    experts = mlp.experts
    if not hasattr(experts, "num_experts") or any(
        p.ndim != 3 for n, p in experts.named_parameters() if "bias" not in n
    ):
        raise TypeError(
            f"cannot count FLOPs of {type(experts).__name__} experts (stacked [E, out, in] weights only)"
        )
    per_expert = sum(p[0].numel() for n, p in experts.named_parameters() if "bias" not in n)
    dense = sum(
        m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear)
    )  # shared expert and its gate
    return mlp.router.weight.numel() + mlp.cfg.routed_top_k * per_expert + dense


def decoder_prefill_flops(llm: CausalLMWrapper, layer_lengths: Sequence[Sequence[int] | torch.Tensor]) -> int:
    """FLOPs of a prefill through the decoder layers, from the real tokens each row held at each layer.

    ``layer_lengths`` is ``LMState.layer_lengths`` (per layer, per row) of a prefill from an empty cache. Counted
    as 2 FLOPs per multiply-accumulate: the attention projections and the FFN per token (an MoE FFN by its router,
    ``top_k`` experts and any shared expert), and per head ``n * n`` query-key scores and as many value products for
    a row of ``n`` tokens (what a dense attention kernel computes). Norms, rotary embeddings, the softmax and the
    ``lm_head`` are left out: they do not change between the methods being compared.
    """
    cfg = llm.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if len(layer_lengths) != len(llm.layers):
        raise ValueError(f"got lengths for {len(layer_lengths)} layers, the decoder has {len(llm.layers)}")
    total = 0
    for layer, lengths in zip(llm.layers, layer_lengths):
        rows = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        proj = sum(m.weight.numel() for m in layer.self_attn.modules() if isinstance(m, nn.Linear))
        per_token = proj + _mlp_macs_per_token(layer.mlp)
        total += 2 * per_token * sum(rows) + 2 * 2 * heads * head_dim * sum(n * n for n in rows)
    return total


class MultimodalGenerationMixin:
    """``generate`` / ``generate_ids`` for a LLaVA-like ``nn.Module`` (see the module docstring for what it needs).

    After each call ``last_generation_stats`` holds the call's ``GenerationStats``.
    """

    last_generation_stats: GenerationStats | None = None

    def stop_ids(self) -> set[int]:
        """Token ids that end an answer: the tokenizer's eos and the template's stop string."""
        return stop_token_ids(self.tokenizer, self.template)

    @torch.no_grad()
    def generate(
        self,
        images: list[Any],
        prompts: list[str],
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        apply_template: bool = True,
        generator: torch.Generator | None = None,
        *,
        media: Any = None,
        method: str | Method | None = None,
        hooks: Sequence[LayerHook] = (),
        layer_kwargs: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
    ) -> list[str]:
        """Answer ``prompts`` about ``images`` (one PIL image, a list, or None per prompt), batched.

        Prompts are user questions; each is wrapped in the model's conversation template (``apply_template``) and
        gets its media placeholders from the family's ``build_generation_inputs`` (``media`` carries other
        modalities there). Greedy by default; ``do_sample`` with ``temperature`` and nucleus ``top_p``. ``method``
        (a ``zoo.methods`` spec such as ``"none"`` or a ``Method``), ``hooks``, ``layer_kwargs`` and
        ``attn_implementation`` act on prefill and every decode step (see ``generate_ids``).
        """
        was_training = self.training
        self.eval()
        try:
            extra = {} if media is None else {"media": media}
            batch = self.build_generation_inputs(images, prompts, apply_template, **extra)
            dev = next(self.parameters()).device
            tensors = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            stop = sorted(self.stop_ids())
            tokens = self.generate_ids(
                tensors.pop("input_ids"),
                tensors.pop("attention_mask"),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                stop_ids=stop,
                generator=generator,
                method=method,
                hooks=hooks,
                layer_kwargs=layer_kwargs,
                attn_implementation=attn_implementation,
                **tensors,
            )
            return decode_until_stop(self.tokenizer, tokens, stop)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
        *,
        method: str | Method | None = None,
        hooks: Sequence[LayerHook] = (),
        layer_kwargs: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        **media_tensors: Any,
    ) -> torch.Tensor:
        """Token-level generation from left-padded ids: returns ``[B, n <= max_new_tokens]`` new ids.

        ``media_tensors`` (e.g. ``pixel_values``) go to ``embed_multimodal``. A row that emitted a stop id keeps it;
        later positions of that row hold 0 (ignore everything after a stop). Prefill runs once with a KV cache;
        each step feeds one token per row and lets the cache extend every layer's mask (layers may hold different
        lengths after a method dropped tokens). The method's plan (hooks, layer kwargs, attention implementation)
        applies to prefill and every step, with ``hooks`` / ``layer_kwargs`` / ``attn_implementation`` added.
        """
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        dev = input_ids.device
        bsz = input_ids.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        chosen = build_method(method)
        plan = chosen.plan(
            MethodContext(
                model=self, input_ids=input_ids, attention_mask=mask, media_mask=self.media_mask(input_ids)
            )
        )
        if (
            attn_implementation
            and plan.attn_implementation
            and attn_implementation != plan.attn_implementation
        ):
            raise ValueError(
                f"method {chosen.spec()!r} runs attention {plan.attn_implementation!r}; "
                f"attn_implementation={attn_implementation!r} conflicts with it"
            )
        all_hooks = [*plan.hooks, *hooks]
        kwargs = {**plan.layer_kwargs, **(layer_kwargs or {})}
        stop = torch.tensor(list(stop_ids), device=dev, dtype=torch.long)
        generated: list[torch.Tensor] = []
        decode_steps = 0
        with use_attention(self, attn_implementation or plan.attn_implementation):
            t0 = time.perf_counter()
            embeds = self.embed_multimodal(input_ids, **media_tensors)
            out = self.llm(
                inputs_embeds=embeds,
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=1,
                hooks=all_hooks,
                layer_kwargs=kwargs,
            )
            prefill_state, cache = out.state, out.cache
            t1 = time.perf_counter()
            done = torch.zeros(bsz, dtype=torch.bool, device=dev)
            n_new = torch.zeros(bsz, dtype=torch.long, device=dev)
            logits = out.logits[:, -1]
            for step in range(max_new_tokens):
                nxt = next_token(logits, do_sample, temperature, top_p, generator)
                nxt = torch.where(done, torch.zeros_like(nxt), nxt)
                generated.append(nxt)
                n_new += (~done).long()
                done = done | torch.isin(nxt, stop)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                out = self.llm(input_ids=nxt[:, None], cache=cache, hooks=all_hooks, layer_kwargs=kwargs)
                decode_steps += 1
                logits = out.logits[:, -1]
            t2 = time.perf_counter()
        finish = chosen.finish(prefill_state)
        self.last_generation_stats = GenerationStats(
            prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1,
            generated_tokens=int(n_new.sum()),
            prompt_tokens=int(mask.sum()),
            decode_steps=decode_steps,
            batch_size=bsz,
            method=chosen.spec(),
            prefill_layer_tokens=tuple(torch.stack(prefill_state.layer_lengths).sum(1).tolist()),
            extra={f"{chosen.name}/{k}": float(v) for k, v in finish.items()},
        )
        if not generated:
            return torch.zeros(bsz, 0, dtype=torch.long, device=dev)
        return torch.stack(generated, 1)
