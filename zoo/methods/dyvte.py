"""DyVTE, dynamic visual-token exit (Wu et al., arXiv 2411.19628): per-layer routers decide when images may leave.

After each decoder layer a small router (a 2-layer MLP, as in the official code: ``Linear(2d, h, no bias) -> GELU ->
Linear(h, 2, no bias)``) reads two vectors of that layer's output for every row: the mean of the text tokens that
follow the row's image span, up to but excluding the last prompt token, and the last prompt token itself. Class 1
means "exit": the first layer whose router gives ``p(exit) > threshold`` removes *all* of that row's media tokens
(``CausalLMWrapper.drop_tokens``: original RoPE positions kept, per-layer caches), so later layers and every decode step
run on the shorter sequence. ``threshold=0.5`` is the official rule (``logit[1] > logit[0]``); a threshold of 1 or
more never exits and reproduces the plain model exactly.

Spans are derived per row from the media mask (never from fixed offsets as in the batch-of-one official code), so
rows of a left-padded batch exit at different layers. After an exit the rows that left and those that kept their image
run the later prefill layers as separate sub-batches, each padded only to its own longest row (``min_group_saving``),
which is what turns the saved FLOPs into saved time for a batch. Decisions are made in prefill only; decode steps make none
(the official code fails on the first decode step when prefill did not exit). Rows without media tokens, or without
text between the media and the last prompt token, never exit.

Router weights live in their own small safetensors file beside the base model (``dyvte_routers.safetensors`` with
``dyvte_routers.json``); ``ROUTER_WEIGHTS`` registers trained ones by the name of the base weights they belong to,
so ``--method dyvte:routers=moe_llava_tiny.shapes`` finds the shipped routers. The training stage is
``zoo/stages/dyvte.py``; ``import_visual_gates`` maps the official checkpoints' ``visual_gates`` keys onto ours.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.methods import Method, MethodContext, MethodPlan, register_method
from zoo.methods.accounting import prefill_accounting

__all__ = [
    "ExitRouterConfig",
    "ExitRouters",
    "DyVTE",
    "router_features",
    "compact_like_drop",
    "save_routers",
    "load_routers",
    "import_visual_gates",
    "ROUTER_FILE",
    "ROUTER_CONFIG",
    "ROUTER_WEIGHTS",
]

ROUTER_FILE = "dyvte_routers.safetensors"
ROUTER_CONFIG = "dyvte_routers.json"
_SHIPPED = Path(__file__).resolve().parent.parent / "weights"
# Trained routers, by the name of the base weights they were trained on (their directory holds ROUTER_FILE).
ROUTER_WEIGHTS: dict[str, Path] = {"moe_llava_tiny.shapes": _SHIPPED / "moe_llava_tiny.shapes"}


@dataclass(frozen=True, kw_only=True)
class ExitRouterConfig:
    """Shape of the routers: one per decoder layer of an LM of width ``hidden_size``.

    ``router_hidden`` is 2048 in the official code (for LLaMA widths of 4096-5120); a tiny LM takes less.
    """

    hidden_size: int
    num_layers: int
    router_hidden: int = 2048


class ExitRouters(nn.Module):
    """One exit router per decoder layer; ``forward(layer, features) -> [B, 2]`` logits (class 1 = exit)."""

    def __init__(self, cfg: ExitRouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.router_hidden
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * d, h, bias=False), nn.GELU(), nn.Linear(h, 2, bias=False))
            for _ in range(cfg.num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The official init_weight.py: Xavier-uniform (gain 1) on every router Linear.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        gate = self.gates[layer]
        return gate(features.to(gate[0].weight.dtype))


def router_features(
    hidden: torch.Tensor, media: torch.Tensor, padding: torch.Tensor, last: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[text_mean ; text_last]`` per row (``[B, 2D]``) and whether the row has both (``[B]`` bool).

    ``media``: ``[B, T]`` bool media positions; ``padding``: ``[B, T]`` real tokens; ``last``: ``[B]`` column of the
    last prompt token. The text span is every real token after the row's last media token and before ``last``.
    """
    bsz, seq = media.shape
    cols = torch.arange(seq, device=media.device).expand(bsz, -1)
    last_media = torch.where(media, cols, torch.full_like(cols, -1)).amax(1)
    span = (cols > last_media[:, None]) & (cols < last[:, None]) & padding.bool()
    count = span.sum(1)
    # one batched matmul instead of a [B, T, D] product and its sum: this runs after every layer of a prefill
    mean = (span[:, None, :].to(hidden.dtype) @ hidden).squeeze(1) / count.clamp(min=1)[:, None].to(hidden.dtype)
    last_state = hidden[torch.arange(bsz, device=hidden.device), last]
    valid = (last_media >= 0) & (count > 0)
    return torch.cat([mean, last_state], dim=-1), valid


def compact_like_drop(values: torch.Tensor, keep: torch.Tensor, padding: torch.Tensor, fill: Any = 0) -> torch.Tensor:
    """Rearrange a ``[B, T]`` per-token tensor exactly as ``CausalLMWrapper.drop_tokens(state, keep)`` rearranges
    the tokens (kept real tokens, left-padded to the longest kept row), so token-aligned masks and labels follow.
    """
    keep = keep.bool() & padding.bool()
    kept = keep.sum(1)
    new_len = int(kept.max()) if kept.numel() else 0
    rows, cols = keep.nonzero(as_tuple=True)
    dest = (keep.long().cumsum(1) - 1 + (new_len - kept)[:, None])[rows, cols]
    out = values.new_full((values.shape[0], new_len), fill)
    out[rows, dest] = values[rows, cols]
    return out


@register_method("dyvte")
class DyVTE(Method):
    """Visual-token exit by per-layer routers (see the module docstring).

    Args:
        routers: registered base-weights name (``ROUTER_WEIGHTS``), a directory holding ``dyvte_routers.safetensors``,
            that file, or an ``ExitRouters`` module.
        threshold: exit when ``p(exit) > threshold`` (0.5: the official rule; >= 1: never).
        min_group_saving: after an exit the rows that left and those that kept their image run the later layers as
            separate sub-batches when that saves at least this share of the padded token-slots (0: whenever it
            saves any; >= 1: never, one tensor padded to the longest row). Outputs are the same either way.
    """

    def __init__(
        self, routers: str | ExitRouters | None = None, threshold: float = 0.5, min_group_saving: float = 0.2
    ) -> None:
        if routers is None:
            raise ValueError(
                f"dyvte needs routers=NAME_OR_PATH: a registered name ({', '.join(sorted(ROUTER_WEIGHTS))}) or a "
                f"directory holding {ROUTER_FILE} (written by a `type: dyvte_routers` stage)"
            )
        if not 0.0 <= float(threshold):
            raise ValueError(f"dyvte threshold must be >= 0, got {threshold}")
        self.routers = routers if isinstance(routers, str) else "<module>"
        self.threshold = float(threshold)
        if not 0.0 <= float(min_group_saving):
            raise ValueError(f"dyvte min_group_saving must be >= 0, got {min_group_saving}")
        self.min_group_saving = float(min_group_saving)
        self._module = routers if isinstance(routers, ExitRouters) else None
        self._exit_layer: torch.Tensor | None = None
        self._llm: Any = None

    def _load(self, like: torch.Tensor) -> ExitRouters:
        if self._module is None:
            self._module = load_routers(self.routers)
        return self._module.to(device=like.device).eval()

    def plan(self, ctx: MethodContext) -> MethodPlan:
        llm = ctx.model.llm
        num_layers = len(llm.layers)
        routers = self._load(ctx.input_ids)
        if routers.cfg.num_layers != num_layers or routers.cfg.hidden_size != llm.hidden_size:
            raise ValueError(
                f"dyvte routers {self.routers!r} are for {routers.cfg.num_layers} layers of width "
                f"{routers.cfg.hidden_size}; this model's LM has {num_layers} layers of width {llm.hidden_size}"
            )
        bsz = ctx.input_ids.shape[0]
        self._llm = llm
        # num_layers = no exit (visual tokens kept in every layer), the official "average layers kept" proxy.
        exit_layer = torch.full((bsz,), num_layers, dtype=torch.long, device=ctx.input_ids.device)
        self._exit_layer = exit_layer
        media_cols = ctx.media_mask.bool() & ctx.attention_mask.bool()
        # Media flags by (row, RoPE position): positions survive every drop and every length-grouped sub-batch
        # (``LMState.rows``), so each layer reads its tokens' flags without re-compacting a mask per drop.
        tracked: dict[str, Any] = {"by_position": None, "prefill": True}
        threshold = self.threshold
        min_saving = self.min_group_saving if self.min_group_saving < 1.0 else None

        def media_of(state: Any) -> torch.Tensor:
            if tracked["by_position"] is None:
                if state.position_ids.shape != media_cols.shape:
                    raise ValueError(
                        f"dyvte: the prompt's media mask has shape {tuple(media_cols.shape)}, the first layer's "
                        f"tokens {tuple(state.position_ids.shape)} (another hook dropped tokens before dyvte's)"
                    )
                width = int(state.position_ids.max()) + 1
                by_position = torch.zeros(bsz, width, dtype=torch.bool, device=media_cols.device)
                by_position.scatter_(1, state.position_ids.expand(bsz, -1), media_cols)  # pads: position 0, False
                by_position[:, 0] |= (media_cols & (state.position_ids == 0)).any(1)
                tracked["by_position"] = by_position
            by_position = tracked["by_position"]
            rows_flags = by_position if state.rows is None else by_position[state.rows]
            positions = state.position_ids.expand(rows_flags.shape[0], -1)
            return rows_flags.gather(1, positions) & state.padding_mask.bool()

        def hook(i: int, state: Any) -> Any:
            if not tracked["prefill"]:
                return None  # decisions are made once, in prefill
            if i == num_layers - 1:
                tracked["prefill"] = False
                return None  # an exit after the last layer removes nothing from prefill or decoding
            if threshold >= 1.0:
                return None
            rows = state.rows if state.rows is not None else torch.arange(bsz, device=exit_layer.device)
            waiting = exit_layer[rows] == num_layers
            if not bool(waiting.any()):
                return None
            media = media_of(state)
            if not bool((waiting & media.any(1)).any()):
                return None
            last = torch.full((len(rows),), state.hidden.shape[1] - 1, dtype=torch.long, device=media.device)
            with torch.no_grad():
                feats, valid = router_features(state.hidden, media, state.padding_mask, last)
                p_exit = routers(i, feats).float().softmax(-1)[:, 1]
            leave = waiting & valid & (p_exit > threshold)
            if not bool(leave.any()):
                return None
            exit_layer[rows[leave]] = i
            keep = state.padding_mask.bool() & ~(media & leave[:, None])
            # the rows that kept their image may run the next layers as their own sub-batch
            return llm.drop_tokens(state, keep, group_min_saving=min_saving)

        return MethodPlan(hooks=[hook])

    def finish(self, state: Any) -> dict[str, float]:
        if self._exit_layer is None:
            return {}
        layers = len(self._llm.layers)
        exits = self._exit_layer.float()
        return {
            # layers that ran with the visual tokens: exit layer + 1, or all of them (the official proxy)
            "mean_layers_with_visual": float((exits + 1).clamp(max=layers).mean()),
            "exit_rate": float((exits < layers).float().mean()),
            **prefill_accounting(self._llm, state.layer_lengths),
        }

    def exit_layers(self) -> list[int]:
        """Per row of the last call, the layer after which its visual tokens left (the layer count: never)."""
        return [] if self._exit_layer is None else self._exit_layer.tolist()


# ---- weights --------------------------------------------------------------------------------------------------------


def _router_dir(routers: str | os.PathLike) -> Path:
    if str(routers) in ROUTER_WEIGHTS:
        return ROUTER_WEIGHTS[str(routers)]
    path = Path(os.path.expandvars(str(routers)))
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"dyvte routers {str(routers)!r}: neither a registered name ({', '.join(sorted(ROUTER_WEIGHTS))}) nor an "
        f"existing directory or {ROUTER_FILE}"
    )


def save_routers(routers: ExitRouters, out_dir: str | os.PathLike, **info: Any) -> Path:
    """Write ``dyvte_routers.safetensors`` and ``dyvte_routers.json`` (config + ``info``) atomically into ``out_dir``."""
    from safetensors.torch import save_file

    from zoo.registry import atomic_write

    out = Path(out_dir)
    config = {"config": asdict(routers.cfg), **info}
    json.dumps(config)  # fail before writing anything if ``info`` is not JSON
    state = {k: v.detach().contiguous().cpu() for k, v in routers.state_dict().items()}
    atomic_write(out / ROUTER_FILE, lambda tmp: save_file(state, tmp))
    atomic_write(out / ROUTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out


def load_routers(routers: str | os.PathLike) -> ExitRouters:
    """Routers from a registered name, a directory or the safetensors file (strict: a missing key is an error)."""
    from zoo.checkpoint import load_file_strict

    folder = _router_dir(routers)
    cfg_file, weights = folder / ROUTER_CONFIG, folder / ROUTER_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"dyvte routers {str(routers)!r}: no {f}")
    try:
        cfg = ExitRouterConfig(**json.loads(cfg_file.read_text())["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: field 'config' must hold {ExitRouterConfig.__name__} fields ({e})") from None
    module = ExitRouters(cfg)
    load_file_strict(module, weights, "dyvte routers")
    return module.eval()


def import_visual_gates(state_dict: dict[str, torch.Tensor]) -> ExitRouters:
    """Routers from an official DyVTE checkpoint's ``...visual_gates.<layer>.<index>.weight`` tensors.

    The official gate is a Sequential whose two Linear layers come first and last (a Dropout is defined but unused),
    so per layer the ``[h, 2d]`` weight is the first Linear and the ``[2, h]`` weight the second, whatever their
    indices; they are told apart by shape.
    """
    per_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if "visual_gates" not in parts or not key.endswith(".weight"):
            continue
        at = parts.index("visual_gates")
        try:
            layer, index = int(parts[at + 1]), int(parts[at + 2])
        except (IndexError, ValueError):
            raise ValueError(f"official checkpoint key {key!r}: expected visual_gates.<layer>.<index>.weight") from None
        per_layer.setdefault(layer, []).append((index, value))
    if not per_layer:
        raise ValueError("no 'visual_gates' keys in the checkpoint (the official DyVTE router weights)")
    layers = sorted(per_layer)
    if layers != list(range(len(layers))):
        raise ValueError(f"visual_gates layers {layers} are not 0..{len(layers) - 1}")
    first = sorted(per_layer[0])[0][1]
    cfg = ExitRouterConfig(hidden_size=first.shape[1] // 2, num_layers=len(layers), router_hidden=first.shape[0])
    routers = ExitRouters(cfg)
    for layer in layers:
        weights = [w for _, w in sorted(per_layer[layer])]
        if len(weights) != 2 or weights[0].shape != (cfg.router_hidden, 2 * cfg.hidden_size) or weights[1].shape != (
            2,
            cfg.router_hidden,
        ):
            raise ValueError(
                f"visual_gates.{layer}: expected weights of shapes {(cfg.router_hidden, 2 * cfg.hidden_size)} and "
                f"{(2, cfg.router_hidden)}, got {[tuple(w.shape) for w in weights]}"
            )
        routers.gates[layer][0].weight.data.copy_(weights[0])
        routers.gates[layer][2].weight.data.copy_(weights[1])
    return routers.eval()

