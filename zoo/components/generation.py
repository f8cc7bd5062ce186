"""The generation engine every LLaVA-like family uses (prompt batch -> KV-cache decode loop -> texts + stats).

``GenerationStats`` is the one record of a ``generate`` call; ``eval`` reads it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GenerationStats"]


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
