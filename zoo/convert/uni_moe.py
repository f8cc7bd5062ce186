"""Official Uni-MoE checkpoints (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs) -> ``zoo.models.uni_moe.UniMoE``.

Facts: ``shared/reference/moe_llava_unimoe.md`` B4 and ``audio_video_benchmarks.md`` 2. Both layouts are a
fine-tuned directory ``SRC`` (the "-e2" release) read on top of a base directory (``base``: the "-base" release with
``config.json`` and the full LLaMA weights), in the official load order:

``uni-moe-v1`` (4 experts; ``zoo convert uni-moe-v1 SRC OUT --base DIR``):
1. base weights: ``model.layers.{L}.mlp.gate.weight`` [E, d] routers, ``model.layers.{L}.mlp.experts.{e}.
   {gate,up,down}_proj.weight`` experts (dense layers of the "interval" models keep ``mlp.{gate,up,down}_proj``);
2. ``SRC/non_lora_trainables.bin``: ``base_model.`` stripped, then ``model.`` when keys start ``model.model.``;
3. the PEFT adapter (``adapter_config.json`` + ``adapter_model.bin``/``.safetensors``, keys
   ``base_model.model.<module>.lora_{A,B}.weight``) merged: W += (lora_alpha / r) * B @ A, on attention projections
   and on every expert's projections; the result has no LoRA (``expert_lora_rank=0``, ``lora=None``);
4. ``SRC/mm_audio_aligner.bin``: the Whisper-decoder aligner (or the audio model's Q-Former) and query tokens;
5. ``SRC/mlp_gates.bin``: routers, overriding the base's.

``uni-moe-8e`` (8 experts, DeepSpeed MoE; ``zoo convert uni-moe-8e SRC OUT --base DIR``): as above, but the MoE
keys are ``model.layers.{L}.mlp.deepspeed_moe.gate.wg.weight`` and ``...deepspeed_moe.experts.deepspeed_experts.{e}.
{gate,up,down}_proj.weight`` plus loralib LoRA ``..._proj_lora_{A,B}.weight``, read from ``SRC/{rank}_mlp_experts.bin``
files (local expert i of rank file r is global expert ``r * E / ranks + i``); the expert LoRA stays LoRA
(``ExpertLoRAExperts`` of rank ``lora_r``), the attention adapter is merged; routing is DeepSpeed top-2, dropless
(the release runs ``drop_tokens=False``), balance loss ``aux_balance_loss_coef``. The base's own ``mlp.*`` tensors
of MoE layers are replaced by the expert files, as the official loader does.

Both: ``lm_head``, ``model.embed_tokens``, ``model.norm``, ``model.layers.*`` -> ``llm.lm.*``; ``model.mm_projector``
-> ``mm_projector``; towers from the checkpoint (``model.vision_tower.vision_tower.*``, ``model.audio_tower.
audio_tower.*``) or, when absent (the official code loads them from their own paths), from ``vision_weights`` (a
transformers CLIP directory) and ``whisper_weights`` (a transformers Whisper directory). Dropped on purpose: rotary
``inv_freq`` buffers (recomputed) and the never-used random ``model.audio_tower.{encoder,decoder}.*`` copy. Anything
else that does not map is a strict-load error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoint import load_state_dict_strict
from zoo.convert import register_converter
from zoo.convert.common import fit_vision_keys, read_config, read_state_dict, read_tokenizer_spec
from zoo.convert.moe_llava import KNOWN_TOWERS, _vision_state_dict
from zoo.models.uni_moe import (
    AUDIO_PAPER,
    QFORMER_UNIMOE,
    WHISPER_SMALL,
    UniMoE,
    UniMoEConfig,
    UniMoESettings,
)

__all__ = [
    "official_config_to_model_args",
    "official_to_zoo_state_dict",
    "read_release",
    "load_uni_moe_v1",
    "load_uni_moe_8e",
]

_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "tie_word_embeddings", "attention_bias")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.(?:experts|deepspeed_moe\.experts\.deepspeed_experts)\.(\d+)\."
                     r"(gate_proj|up_proj|down_proj)(_lora_A|_lora_B)?\.weight$")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.mlp\.(?:gate|deepspeed_moe\.gate\.wg)\.weight$")
_RANK_FILE = re.compile(r"^(\d+)_mlp_experts\.bin$")


# ----------------------------------------------------------------------------------------------------------------
# Reading a release (official keys, official load order)
# ----------------------------------------------------------------------------------------------------------------


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    from zoo.checkpoint import read_safetensors, torch_load_safely

    return read_safetensors(path) if path.suffix == ".safetensors" else torch_load_safely(path)


def _strip_peft(key: str) -> str:
    """``base_model.model.model.x`` / ``base_model.model.x`` -> ``model.x`` / ``x`` (non_lora_trainables rule)."""
    if key.startswith("base_model."):
        key = key[len("base_model."):]
    if key.startswith("model.model."):
        key = key[len("model."):]
    return key


def _merge_adapter(sd: dict[str, torch.Tensor], src: Path) -> None:
    """Merge the PEFT adapter of ``src`` into ``sd`` in place (PEFT's ``merge_and_unload``)."""
    cfg_path = src / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{src}: no adapter_config.json (the PEFT LoRA adapter of the release)")
    cfg = json.loads(cfg_path.read_text())
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), int | float):
            raise ValueError(f"{cfg_path}: field {field!r} missing or not a number")
    scale = cfg["lora_alpha"] / cfg["r"]
    weights = next((src / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (src / n).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{src}: no adapter_model.safetensors / adapter_model.bin")
    adapter = _read_bin(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        m = re.match(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$", key)
        if m is None:
            raise ValueError(f"{weights}: key {key!r} is not a PEFT LoRA tensor (base_model.model.X.lora_A.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    for module, ab in pairs.items():
        target = f"{module}.weight"
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights}: {module} has lora_{''.join(ab)} only; both lora_A and lora_B are needed")
        if target not in sd:
            raise ValueError(f"{weights}: LoRA for {module}, which the base checkpoint does not have ({target})")
        w = sd[target]
        sd[target] = (w.float() + scale * (ab["B"].float() @ ab["A"].float())).to(w.dtype)


def read_release(src: str | os.PathLike, base: str | os.PathLike, *, merge_adapter: bool = True
                 ) -> dict[str, torch.Tensor]:
    """The official state dict after the official load order (see the module docstring), official key names."""
    src, base = Path(src), Path(base)
    sd = dict(read_state_dict(base))
    side = src / "non_lora_trainables.bin"
    if side.exists():
        sd.update({_strip_peft(k): v for k, v in _read_bin(side).items()})
    if merge_adapter:
        _merge_adapter(sd, src)
    for name in ("mm_audio_aligner.bin", "mlp_gates.bin"):
        path = src / name
        if not path.exists():
            raise FileNotFoundError(f"{src}: no {name} (the release's {name[:-4].replace('_', ' ')} weights)")
        sd.update({_strip_peft(k): v for k, v in _read_bin(path).items()})
    return sd


def _read_rank_experts(src: Path, num_experts: int) -> dict[str, torch.Tensor]:
    files = sorted((int(m.group(1)), p) for p in src.iterdir() if (m := _RANK_FILE.match(p.name)))
    if not files:
        raise FileNotFoundError(f"{src}: no {{rank}}_mlp_experts.bin files (the 8-expert release's experts)")
    ranks = len(files)
    if num_experts % ranks or [r for r, _ in files] != list(range(ranks)):
        raise ValueError(f"{src}: expert files for ranks {[r for r, _ in files]} do not split {num_experts} experts")
    local = num_experts // ranks
    out: dict[str, torch.Tensor] = {}
    for rank, path in files:
        for key, value in _read_bin(path).items():
            key = _strip_peft(key)
            m = re.match(r"(model\.layers\.\d+\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..+)$", key)
            if m is None or int(m.group(2)) >= local:
                raise ValueError(f"{path}: key {key!r} is not a local DeepSpeed expert tensor (index < {local})")
            out[f"{m.group(1)}{rank * local + int(m.group(2))}{m.group(3)}"] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# Config and keys
# ----------------------------------------------------------------------------------------------------------------


def _moe_layers(sd: dict[str, torch.Tensor], num_layers: int) -> str | list[int]:
    layers = sorted({int(m.group(1)) for k in sd if (m := _ROUTER.match(k))})
    if layers == list(range(num_layers)):
        return "dense"
    if layers == list(range(0, num_layers, 2)):
        return "sparse"
    return layers


def official_config_to_model_args(src: str | os.PathLike, base: str | os.PathLike, sd: dict[str, torch.Tensor], *,
                                  deepspeed: bool, vision_config: dict[str, Any] | None = None,
                                  whisper_config: dict[str, Any] | None = None,
                                  audio: dict[str, Any] | None = None) -> dict[str, Any]:
    """``UniMoEConfig`` fields for a release (``src/config.json``, falling back to ``base/config.json``)."""
    src = Path(src)
    cfg_dir = src if (src / "config.json").exists() else Path(base)
    cfg = read_config(cfg_dir)
    where = cfg_dir / "config.json"
    if "model.embed_tokens.weight" not in sd:
        raise ValueError(f"{base}: no model.embed_tokens.weight; expected the base release's LLaMA weights")
    lm = {k: cfg[k] for k in _LLAMA_FIELDS if k in cfg}
    lm.update(model_type="llama", vocab_size=int(sd["model.embed_tokens.weight"].shape[0]))
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if k not in lm:
            raise ValueError(f"{where}: field {k!r} missing (a LLaMA config is expected)")
    if not cfg.get("moe"):
        raise ValueError(f"{where}: field 'moe' is empty; this is not a Uni-MoE MoE release")
    tower = cfg.get("mm_vision_tower")
    if vision_config is None:
        if tower not in KNOWN_TOWERS:
            raise ValueError(f"{where}: field 'mm_vision_tower' = {tower!r} is not a known tower "
                             f"({sorted(KNOWN_TOWERS)}); pass vision_config=")
        vision_config = dict(KNOWN_TOWERS[tower])
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"{where}: field 'mm_vision_select_feature' must be 'patch'")
    vision = dict(kind="hf", config=vision_config, select_layer=int(cfg.get("mm_vision_select_layer", -2)))
    num_experts = int(cfg.get("num_experts", 4))
    settings: dict[str, Any] = dict(num_experts=num_experts, top_k=int(cfg.get("num_experts_per_tok", 2)),
                                    layers=_moe_layers(sd, lm["num_hidden_layers"]))
    if deepspeed:
        settings.update(router="deepspeed_top2", aux_loss_coef=float(cfg.get("aux_balance_loss_coef", 0.0) or 0.0)
                        if cfg.get("aux_balance_loss") else 0.0, expert_lora_rank=int(cfg.get("lora_r", 8)),
                        expert_lora_alpha=float(cfg.get("lora_alpha", 16)),
                        expert_lora_dropout=float(cfg.get("lora_dropout", 0.05)))
    else:
        settings.update(expert_lora_rank=0, expert_lora_dropout=0.0)
    queries = int(cfg.get("query_tokens_size", 50))
    projector = cfg.get("audio_projector_type") or "linear"
    args: dict[str, Any] = dict(
        vision=vision, lm=lm, projector=cfg.get("mm_projector_type", "mlp2x_gelu"), template="vicuna_v1",
        tokenizer=read_tokenizer_spec(base), uni_moe=UniMoESettings.from_dict(settings).to_dict(), lora=None,
    )
    if any(k.startswith("model.mm_audio_aligner.qformer.") for k in sd):
        audio = dict(audio or AUDIO_PAPER)
        audio.setdefault("qformer", dict(qformer=QFORMER_UNIMOE, num_query_tokens=queries, projector=projector))
        args.update(audio={**audio, "name": "audio", "placeholder": "<audio>", "token_id": -300}, speech=None)
    else:
        args["speech"] = dict(whisper=whisper_config or WHISPER_SMALL, num_query_tokens=queries, projector=projector)
    return args


def official_to_zoo_state_dict(sd: dict[str, torch.Tensor], model: UniMoE) -> dict[str, torch.Tensor]:
    """Rename / restack official keys to ``model``'s (checked strictly by the caller)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    moe_layers = {i for i, _ in model.moe_layer_modules()}
    audio_side = "audio_connector" if model.audio_connector is not None else "speech"
    tower_side = "audio_encoder" if model.audio_encoder is not None else "speech.encoder"
    prefixes = [
        ("model.mm_projector.", "mm_projector."),
        ("model.vision_tower.vision_tower.", "vision_tower.model."),
        ("model.audio_tower.audio_tower.", f"{tower_side}."),
        ("model.mm_audio_aligner.decoder.audio_decoder.", "speech.decoder."),
        ("model.mm_audio_aligner.qformer.qformer.", "audio_connector.qformer."),
        ("model.mm_audio_aligner.projector.", f"{audio_side}.projector."),
        ("lm_head.", "llm.lm.lm_head."),
    ]
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq") or key.startswith(("model.audio_tower.encoder.",
                                                                   "model.audio_tower.decoder.")):
            continue
        if key == "model.query_tokens":
            out["speech.query_tokens"] = value
            continue
        if key == "model.mm_audio_aligner.query_tokens":
            out["audio_connector.query_tokens"] = value
            continue
        if (m := _ROUTER.match(key)) is not None:
            out[f"llm.lm.model.layers.{m.group(1)}.mlp.router.weight"] = value.float()
            continue
        if (m := _EXPERT.match(key)) is not None:
            layer, e, proj, lora = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) or ""
            experts.setdefault((layer, proj + lora), {})[e] = value
            continue
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if m is not None and int(m.group(1)) in moe_layers:
            continue  # the base's dense / pre-MoE FFN of an MoE layer: the experts replace it (official loader)
        for old, new in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                if new.endswith("projector.") and not rest[0].isdigit():
                    rest = "0." + rest  # a linear projector is our one-layer nn.Sequential
                out[new + rest] = value
                break
        else:
            out["llm.lm." + key if key.startswith("model.") else key] = value
    for (layer, name), by_expert in experts.items():
        n = max(by_expert) + 1
        if sorted(by_expert) != list(range(n)):
            raise ValueError(f"layer {layer} {name}: experts {sorted(by_expert)} are not 0..{n - 1}")
        stacked = torch.stack([by_expert[e] for e in range(n)])
        prefix = f"llm.lm.model.layers.{layer}.mlp.experts."
        base = prefix + ("base." if isinstance(model.llm.layers[layer].mlp.experts, _expert_lora_type()) else "")
        proj, _, lora = name.partition("_lora_")
        short = proj.removesuffix("_proj")
        if lora:
            out[f"{prefix}lora_{lora}_{short}"] = stacked  # loralib: A [r, in], B [out, r], as ours per expert
        elif short == "down":
            out[base + "down_proj"] = stacked
        else:
            out.setdefault(base + "gate_up_proj", {})[short] = stacked  # type: ignore[assignment]
    for key in [k for k in out if k.endswith("gate_up_proj")]:
        parts = out[key]
        if not isinstance(parts, dict) or set(parts) != {"gate", "up"}:
            raise ValueError(f"{key}: need both gate_proj and up_proj expert weights")
        out[key] = torch.cat([parts["gate"], parts["up"]], dim=1)
    return out


def _expert_lora_type() -> type:
    from zoo.moe.layer import ExpertLoRAExperts

    return ExpertLoRAExperts


# ----------------------------------------------------------------------------------------------------------------
# Load / convert
# ----------------------------------------------------------------------------------------------------------------


def _whisper_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Encoder tensors of a transformers Whisper directory, under ``model.audio_tower.audio_tower.``."""
    sd = read_state_dict(path)
    for prefix in ("model.encoder.", "encoder."):
        enc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if enc:
            return {f"model.audio_tower.audio_tower.{k}": v for k, v in enc.items()}
    raise ValueError(f"{path}: no Whisper encoder tensors (model.encoder.* or encoder.*)")


def _load(src: str | os.PathLike, base: str | os.PathLike | None, deepspeed: bool,
          vision_weights: str | os.PathLike | None, whisper_weights: str | os.PathLike | None,
          vision_config: dict[str, Any] | None, whisper_config: dict[str, Any] | None,
          audio: dict[str, Any] | None, dtype: torch.dtype) -> UniMoE:
    src = Path(src)
    if base is None:
        raise ValueError(f"{src}: a Uni-MoE release is read on top of its base release; pass base=<the -base "
                         "directory> (zoo convert: --base DIR)")
    sd = read_release(src, base)
    if deepspeed:
        cfg = read_config(src if (src / "config.json").exists() else Path(base))
        sd.update(_read_rank_experts(src, int(cfg.get("num_experts", 8))))
        # The 8e routers and experts live under deepspeed_moe; the shared base's v1 gates and experts are not used.
        sd = {k: v for k, v in sd.items() if not re.match(r"model\.layers\.\d+\.mlp\.(gate\.weight$|experts\.)", k)}
    if vision_weights is not None:
        sd.update({f"model.vision_tower.vision_tower.{k}": v for k, v in _vision_state_dict(vision_weights).items()})
    if whisper_weights is not None:
        sd.update(_whisper_state_dict(whisper_weights))
    args = official_config_to_model_args(src, base, sd, deepspeed=deepspeed, vision_config=vision_config,
                                         whisper_config=whisper_config, audio=audio)
    for prefix, what, option in (("model.vision_tower.vision_tower.", "vision tower", "vision_weights"),
                                 ("model.audio_tower.audio_tower.", "audio / speech encoder", "whisper_weights")):
        if not any(k.startswith(prefix) for k in sd):
            raise ValueError(f"{src}: neither the release nor the base holds the {what} ({prefix}*); the official "
                             f"code loads it from its own path: pass {option}=<local transformers directory>")
    architecture = "uni_moe_custom"
    model = UniMoE(UniMoEConfig(**args), architecture=architecture)
    out = official_to_zoo_state_dict(sd, model)
    fit_vision_keys(out, model)
    load_state_dict_strict(model, out, src, architecture)
    return model.to(dtype).eval()


def load_uni_moe_v1(src: str | os.PathLike, base: str | os.PathLike | None = None,
                    vision_weights: str | os.PathLike | None = None, whisper_weights: str | os.PathLike | None = None,
                    vision_config: dict[str, Any] | None = None, whisper_config: dict[str, Any] | None = None,
                    audio: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> UniMoE:
    """A v1 release (4 experts, PEFT adapter merged) as our model (strict load)."""
    return _load(src, base, False, vision_weights, whisper_weights, vision_config, whisper_config, audio, dtype)


def load_uni_moe_8e(src: str | os.PathLike, base: str | os.PathLike | None = None,
                    vision_weights: str | os.PathLike | None = None, whisper_weights: str | os.PathLike | None = None,
                    vision_config: dict[str, Any] | None = None, whisper_config: dict[str, Any] | None = None,
                    audio: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> UniMoE:
    """An 8-expert DeepSpeed release as our model (expert LoRA kept, attention adapter merged; strict load)."""
    return _load(src, base, True, vision_weights, whisper_weights, vision_config, whisper_config, audio, dtype)


def _converter(load):
    def convert(src: str | os.PathLike, out_dir: str | os.PathLike, **options: Any) -> Path:
        from zoo.registry import save_pretrained

        model = load(src, **options)
        return save_pretrained(model, out_dir, "uni_moe_custom", model.model_args, converted_from=str(src),
                               source_format=load.__name__.removeprefix("load_"))

    return convert


def _is_release(src: Path, deepspeed: bool) -> bool:
    if not src.is_dir() or not (src / "mlp_gates.bin").exists() or not (src / "mm_audio_aligner.bin").exists():
        return False
    has_rank_files = any(_RANK_FILE.match(p.name) for p in src.iterdir())
    return has_rank_files == deepspeed


_OPTIONS = {
    "base": "the -base release directory the fine-tuned release is read on top of (required)",
    "vision_weights": "local transformers CLIP directory when the checkpoints lack the vision tower",
    "whisper_weights": "local transformers Whisper directory when the checkpoints lack the speech encoder",
}

register_converter(
    "uni-moe-v1", detect=lambda p: _is_release(p, False), load=load_uni_moe_v1, convert=_converter(load_uni_moe_v1),
    options=_OPTIONS, summary="official Uni-MoE v1 release (-e2 directory on top of its -base; PEFT adapter merged)",
)
register_converter(
    "uni-moe-8e", detect=lambda p: _is_release(p, True), load=load_uni_moe_8e, convert=_converter(load_uni_moe_8e),
    options=_OPTIONS, summary="official Uni-MoE 8-expert DeepSpeed release (rank expert files, gate wg, expert LoRA)",
)
