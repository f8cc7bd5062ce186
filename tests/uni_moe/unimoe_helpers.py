"""Small Uni-MoE configurations shared by the Uni-MoE tests."""

from __future__ import annotations

import torch

from zoo.models.uni_moe import UniMoE
from zoo.registry import create_model

CLIP_VISION = dict(
    model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=32, patch_size=8,
)
LM = dict(
    model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
)
# 3000 log-Mel frames (a real 30-s chunk) at width 16: cheap enough for a test.
WHISPER = dict(
    vocab_size=8, num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=1500,
    max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
)
BEATS = dict(input_patch_size=16, embed_dim=8, encoder_layers=2, encoder_embed_dim=16, encoder_ffn_embed_dim=32,
             encoder_attention_heads=2, conv_pos=8, conv_pos_groups=2, num_buckets=32, max_distance=64, mel_bins=128)
QFORMER = dict(qformer=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            cross_attention_frequency=2, encoder_hidden_size=16, vocab_size=8),
               num_query_tokens=3, projector="linear")
AUDIO = dict(beats=BEATS, qformer=QFORMER, seconds=1.0)
SPEECH = dict(whisper=WHISPER, num_query_tokens=4, projector="linear", max_chunks=2)
MOE = dict(num_experts=4, top_k=2, layers="dense", expert_lora_rank=2, expert_lora_alpha=4.0,
           expert_lora_dropout=0.0)
LORA = dict(rank=2, alpha=4.0, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"])


def small(**overrides) -> UniMoE:
    """A CPU-sized Uni-MoE with every path (tokenizer from the synthetic world's vocabulary)."""
    torch.manual_seed(0)
    args = dict(vision=dict(kind="hf", config=CLIP_VISION), lm=LM, speech=SPEECH, audio=AUDIO, uni_moe=MOE,
                lora=LORA, video_frames=3)
    args.update(overrides)
    return create_model("uni_moe_tiny", **args).eval()


@torch.no_grad()
def randomise_lora(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """LoRA B starts at zero (the wrapped model equals its base); give every LoRA tensor values so tests see it."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
