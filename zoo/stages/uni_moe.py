"""Uni-MoE's three progressive training stages as one stage type (``type: uni_moe``).

Which stage a recipe entry is follows from its settings (paper section 3.3; ``shared/reference/moe_llava_unimoe.md``
part B):

* **1, cross-modality alignment**: the dense model (``model.uni_moe: null``) on modality-caption pairs
  (``data.kind: caption``: image / video / audio captions, speech transcripts); the recipe trains the connectors
  (``mm_projector.*``, the Whisper aligner's queries, decoder and projector).
* **2, modality-specific experts**: the dense model, ``init_from`` stage 1, on one modality's instruction data
  (``data.modalities: [video]``); the recipe trains the LLM's FFNs (``llm.lm.model.layers.*.mlp.*``). One stage per
  modality; each exports its whole model, whose FFNs are what stage 3 reads.
* **3, LoRA tuning**: ``model.uni_moe`` and ``model.lora`` set, ``init_from`` the dense stage-1 model and
  ``model.expert_sources`` naming one stage-2 stage per expert: expert ``e`` of every MoE layer starts as the FFN
  of ``expert_sources[e]`` (specialised, not identical copies) with its own LoRA, the attention projections get
  LoRA, routers start fresh; the recipe trains LoRA, projectors and routers on mixed instruction data.

``expert_sources`` are stage names of the same recipe, checked against the earlier stages when the recipe is
validated (:meth:`UniMoEModelConfig.earlier_stage_refs`) and resolved, like ``init_from``, to their ``final/`` exports.

Data: the synthetic worlds (``data.shapes_av``: one sample of each listed modality in turn) or Uni-MoE JSON files
(``data.unimoe``). A sample becomes ``input_ids`` / ``labels`` with the model's own placeholders expanded (answers
supervised, media and prompts not) and one tensor per media item prepared by the model's modality (``voice`` files
go to the Whisper modality ``audio``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.checkpoint import load_state_dict_strict
from zoo.stages import register_stage
from zoo.stages.base import StageModule
from zoo.stages.uni_moe_config import UniMoEDataConfig, UniMoEEvalConfig, UniMoEModelConfig

__all__ = ["UniMoEStage", "UniMoEDataset", "encode_unimoe_sample", "collate_unimoe"]

IGNORE_INDEX = -100
# Media fields of a Uni-MoE sample -> the model modality that reads them.
SAMPLE_MEDIA = {"image": "image", "video": "video", "voice": "audio"}


def encode_unimoe_sample(model: Any, template: Any, sample: Any, max_length: int, with_media: bool = True
                         ) -> dict[str, Any]:
    """``input_ids`` / ``labels`` (answers only) and each modality's prepared items of one ``UniMoESample``
    (``with_media=False``: the checks and token ids only, without the cost of preparing the media).

    Raises ``ValueError`` naming the sample and field on a placeholder count that does not match its media, a
    sample over ``max_length`` (media positions cannot be cut), or a sample with no answer.
    """
    from zoo.components.modality import count_placeholders, expand_placeholders
    from zoo.conversation import Turn

    specs = list(model.modalities.values())
    turns = [Turn(role=t["from"], text=t["value"]) for t in sample.conversations]
    counts = count_placeholders("".join(t.text for t in turns if t.role == "human"), specs)
    media: dict[str, list[Tensor]] = {}
    for field_name, modality in SAMPLE_MEDIA.items():
        value = getattr(sample, field_name)
        items = [] if value is None else [value] if field_name != "voice" else list(value)
        if items and modality not in model.modalities:
            raise ValueError(f"sample {sample.id!r}: field {field_name!r}: this model has no {modality!r} modality "
                             f"(it reads {list(model.modalities)})")
        if modality in model.modalities and counts[modality] != len(items):
            spec = model.modalities[modality]
            raise ValueError(f"sample {sample.id!r}: field {field_name!r} has {len(items)} item(s) but the human "
                             f"turns hold {counts[modality]} {spec.placeholder} placeholder(s)")
        if items and with_media:
            spec = model.modalities[modality]
            media[spec.input_key] = [spec.prepare(item) for item in items]
    tok = model.tokenizer
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised in template.segments(turns):
        toks, is_media = expand_placeholders(text, specs, lambda piece: tok(piece, add_special_tokens=False).input_ids)
        ids += toks
        labels += [t if supervised and not m else IGNORE_INDEX for t, m in zip(toks, is_media)]
    if len(ids) > max_length:
        raise ValueError(f"sample {sample.id!r}: field 'conversations' is {len(ids)} tokens with its media expanded, "
                         f"over data.max_length={max_length}")
    if all(lab == IGNORE_INDEX for lab in labels):
        raise ValueError(f"sample {sample.id!r}: field 'conversations' has no gpt answer to supervise")
    return {"input_ids": ids, "labels": labels, "media": media, "id": sample.id}


def collate_unimoe(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids`` / ``labels`` / ``attention_mask`` and, per modality input, the items of the batch
    stacked in row order (the order ``fill_media`` fills them); a modality no sample has is absent."""
    n = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    media: dict[str, list[Tensor]] = {}
    for b, it in enumerate(items):
        k = len(it["input_ids"])
        ids[b, :k] = torch.tensor(it["input_ids"])
        labels[b, :k] = torch.tensor(it["labels"])
        mask[b, :k] = 1
        for key, tensors in it["media"].items():
            media.setdefault(key, []).extend(tensors)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "media": {key: torch.stack(tensors) for key, tensors in media.items()}}


class UniMoEDataset(Dataset):
    """Item ``i``: ``encode_unimoe_sample`` of ``get_sample(i)`` (synthetic samples are built on demand)."""

    def __init__(self, get_sample: Callable[[int], Any], num_samples: int, encode: Callable[[Any], dict[str, Any]]):
        self.get_sample, self.num_samples, self.encode = get_sample, num_samples, encode

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.encode(self.get_sample(i))


@register_stage("uni_moe")
class UniMoEStage(StageModule):
    ModelConfig = UniMoEModelConfig
    DataConfig = UniMoEDataConfig
    EvalConfig = UniMoEEvalConfig

    def __init__(self, model_cfg: UniMoEModelConfig, data_cfg: UniMoEDataConfig, eval_cfg: UniMoEEvalConfig,
                 stage: Any) -> None:
        super().__init__(model_cfg, data_cfg, eval_cfg, stage)
        from zoo.registry import create_model

        self.architecture = model_cfg.architecture
        args: dict[str, Any] = {}
        for key in ("vision", "lm", "speech", "audio", "video_frames", "video_pooling", "video_frame_pool", "template",
                    "image_pos_code", "video_time_code"):
            if getattr(model_cfg, key) is not None:
                args[key] = getattr(model_cfg, key)
        # Always explicit: the architectures default to the stage-3 model, and stages 1 and 2 are dense.
        args["uni_moe"], args["lora"] = model_cfg.uni_moe, model_cfg.lora
        if model_cfg.tokenizer == "av_words":
            from data.shapes_av import AVWorlds, av_tokenizer
            from zoo.tokenizers import tokenizer_to_json

            tok = av_tokenizer(AVWorlds(**asdict(model_cfg.vocab_world)), model_cfg.vocab_items)
            args["tokenizer"] = {"kind": "word_level", "json": tokenizer_to_json(tok)}
        elif model_cfg.tokenizer == "pretrained":
            from transformers import AutoTokenizer

            from zoo.models.moe_llava import tokenizer_spec

            path = _local_dir(model_cfg.pretrained_lm, "model.pretrained_lm (needed by tokenizer: pretrained)")
            args["tokenizer"] = tokenizer_spec(AutoTokenizer.from_pretrained(path, local_files_only=True))
        self.model = create_model(self.architecture, **args)
        if model_cfg.widen_ffn > 1:  # the architecture's LM (or model.lm) with wider FFNs: built once more
            lm = dict(self.model.cfg.lm)
            lm["intermediate_size"] = model_cfg.widen_ffn * int(lm["intermediate_size"])
            self.model = create_model(self.architecture, **{**args, "lm": lm})
        self.model_args = self.model.model_args
        if getattr(stage, "init_source", None) is None:  # pretrained parts start the first stage only
            self._load_pretrained()
        self._t_start: float | None = None
        self._t_train = 0.0
        self.skipped: dict[str, int] = {}

    # ---- init ------------------------------------------------------------------------------------------------------

    def _load_pretrained(self) -> None:
        cfg = self.model_cfg
        if cfg.pretrained_lm is not None:
            from transformers import AutoModelForCausalLM

            path = _local_dir(cfg.pretrained_lm, "model.pretrained_lm")
            lm = self.model.llm.lm
            hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=lm.dtype)
            load_state_dict_strict(lm, hf.state_dict(), path, "model.lm of this stage")
        if cfg.pretrained_vision is not None:
            path = _local_dir(cfg.pretrained_vision, "model.pretrained_vision")
            inner = getattr(self.model.vision_tower, "model", None)
            if inner is None or not hasattr(type(inner), "from_pretrained"):
                raise ValueError("model.pretrained_vision needs an hf vision tower (model.vision.kind: hf)")
            hf = type(inner).from_pretrained(path, local_files_only=True)
            load_state_dict_strict(inner, hf.state_dict(), path, "model.vision of this stage")
        if cfg.pretrained_whisper is not None:
            from transformers import WhisperModel

            path = _local_dir(cfg.pretrained_whisper, "model.pretrained_whisper")
            if self.model.speech is None:
                raise ValueError("model.pretrained_whisper needs the speech path (model.speech)")
            hf = WhisperModel.from_pretrained(path, local_files_only=True)
            # The aligner is a Whisper decoder over learnable queries: both halves start from the checkpoint.
            load_state_dict_strict(self.model.speech.encoder, hf.encoder.state_dict(), path, "model.speech (encoder)")
            load_state_dict_strict(self.model.speech.decoder, hf.decoder.state_dict(), path, "model.speech (decoder)")

    def _check_same_tokenizer(self, source: Path, args: dict[str, Any]) -> None:
        if args.get("tokenizer") != self.model_args.get("tokenizer"):
            raise ValueError(f"{source}: its tokenizer differs from this stage's (check model.tokenizer, vocab_world "
                             "and vocab_items: every stage of a recipe must read the same vocabulary)")

    def init_from(self, source: Path) -> None:
        """Same kind of model: strict load. Dense -> MoE (stage 3): experts from ``expert_sources`` (or copies of the
        source's FFN), LoRA added, then a strict load of the result. Another architecture: its vision tower only."""
        from zoo.registry import load

        source = Path(source)
        config = json.loads((source / "config.json").read_text())
        args = config.get("model_args", {})
        if config.get("architecture") != self.architecture:
            self._load_vision_tower(source, config.get("architecture"))
            return
        self._check_same_tokenizer(source, args)
        if self.model_cfg.widen_ffn > 1:
            self._init_widened(source)
            return
        own_moe, src_moe = self.model_args.get("uni_moe"), args.get("uni_moe")
        if src_moe is not None and own_moe is None:
            raise ValueError(f"{source}: holds an MoE model but this stage builds a dense one (set model.uni_moe)")
        if src_moe is not None or own_moe is None:
            if self.model_cfg.expert_sources:
                raise ValueError(f"model.expert_sources is set but {source} already has MoE layers; expert sources "
                                 "initialise experts only when a dense model becomes an MoE model")
            super().init_from(source)
            return
        dense = load(source)
        experts = [self._expert_ffns(name, e) for e, name in enumerate(self.model_cfg.expert_sources)] or None
        dense.enable_moe(own_moe, expert_ffns=experts)
        if self.model_args.get("lora") is not None and args.get("lora") is None:
            dense.enable_lora(self.model_args["lora"])
        where = f"{source} (experts from {self.model_cfg.expert_sources or 'copies of its FFN'})"
        load_state_dict_strict(self.model, dense.state_dict(), where, self.architecture)

    def _load_vision_tower(self, source: Path, arch: str | None) -> None:
        """Only the vision tower of another LLaVA-like model (e.g. the MoE-LLaVA demo weights, trained on the
        same shapes world) or of a CLIP (its ``.visual``): the first stage's starting point."""
        from zoo.registry import load

        other = load(source)
        tower = getattr(other, "vision_tower", None)
        target = self.model.vision_tower
        if tower is None and getattr(other, "visual", None) is not None and hasattr(target, "visual"):
            tower, target = other.visual, target.visual
        if tower is None:
            raise ValueError(f"{source}: a {arch!r} model has no vision tower to start a {self.architecture!r} "
                             "stage from; init_from takes a Uni-MoE export, a LLaVA-like model or a CLIP")
        expected = f"model.vision of this stage (it must describe the same tower as the {arch!r} checkpoint)"
        load_state_dict_strict(target, tower.state_dict(), source, expected)
        if self.model_cfg.init_other == "vision_lm":
            self._load_other_lm(other, source, arch)

    def _load_other_lm(self, other: Any, source: Path, arch: str | None) -> None:
        """The projector and LM of another LLaVA-like model (``init_other: vision_lm``): the tiny recipe's LM then
        starts from one trained on the same shapes world, as the paper's starts pretrained. Embedding and LM-head
        rows are matched by token string (rows of words the source lacks keep their fresh init); the FFN of an MoE
        layer is the mean of its experts (upcycled from one FFN, they stay close)."""
        if getattr(other, "mm_projector", None) is None or getattr(other, "llm", None) is None:
            raise ValueError(f"{source}: init_other=vision_lm needs a LLaVA-like model with a projector and an LM")
        load_state_dict_strict(self.model.mm_projector, other.mm_projector.state_dict(), source,
                               "the projector of this stage")
        src_vocab, own_vocab = other.tokenizer.get_vocab(), self.model.tokenizer.get_vocab()
        own_sd = self.model.llm.lm.state_dict()
        sd = dense_lm_state(other.llm.lm.state_dict())
        shared = [(own_vocab[w], i) for w, i in src_vocab.items() if w in own_vocab]
        for key, value in list(sd.items()):
            if value.shape[:1] == (len(src_vocab),) and key in own_sd and own_sd[key].shape[:1] == (len(own_vocab),):
                rows = own_sd[key].clone()
                rows[[o for o, _ in shared]] = value[[i for _, i in shared]]
                sd[key] = rows
        expected = f"model.lm of this stage (init_other=vision_lm: it must describe the {arch!r} model's LM)"
        load_state_dict_strict(self.model.llm.lm, sd, source, expected)
        print(f"stage {self.stage.name}: projector and LM from {source} ({len(shared)} of {len(own_vocab)} tokens "
              "found in its vocabulary)", flush=True)

    def _init_widened(self, source: Path) -> None:
        """Dense baseline (``widen_ffn: k``): every weight from the dense ``source``; each FFN keeps the source's
        hidden units and gets (k - 1) times as many new ones, random in, zero out, so the model computes the
        source's function at step 0 and the new units (unlike copies, which would get identical gradients forever)
        learn their own features."""
        from zoo.registry import load

        dense = load(source)
        if self.model_args.get("lora") is not None and dense.cfg.lora is None:
            dense.enable_lora(self.model_args["lora"])
        sd = dense.state_dict()
        own = self.model.state_dict()
        for key, value in sd.items():
            mine = own.get(key)
            if mine is None or mine.shape == value.shape or ".mlp." not in key:
                continue
            grown = mine.clone()
            if key.endswith(("down_proj.weight", "fc2.weight")):  # [d, k*h]: the new units' outputs start at zero
                grown.zero_()
                grown[:, : value.shape[1]] = value
            else:  # gate / up / fc1 rows [k*h, d] and fc1 bias: the source's units first, the rest stay random
                grown[: value.shape[0]] = value
            sd[key] = grown
        load_state_dict_strict(self.model, sd, f"{source} (FFNs widened {self.model_cfg.widen_ffn}x)",
                               self.architecture)

    def _expert_ffns(self, name: str, expert: int) -> list[Any]:
        """The decoder-layer FFNs of stage ``name``'s export (the runner's layout: runs/<recipe>/<stage>/final)."""
        from zoo.registry import load

        path = self.stage.run_dir().parent / name / "final"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"stage {self.stage.name!r} takes expert {expert} from stage {name!r}, which has "
                                    f"no export at {path}; run that stage first")
        args = json.loads((path / "config.json").read_text()).get("model_args", {})
        self._check_same_tokenizer(path, args)
        if args.get("uni_moe") is not None:
            raise ValueError(f"{path}: expert source {name!r} is an MoE model; experts start from dense FFNs")
        return [layer.mlp for layer in load(path).llm.layers]

    # ---- data ------------------------------------------------------------------------------------------------------

    def _encoder(self, with_media: bool = True) -> Callable[[Any], dict[str, Any]]:
        from zoo.conversation import get_template

        template = get_template(self.model.cfg.template)
        return lambda sample: encode_unimoe_sample(self.model, template, sample, self.data_cfg.max_length, with_media)

    def train_dataset(self) -> Dataset:
        d = self.data_cfg
        encode = self._encoder()
        if d.source == "shapes_av":
            from data.shapes_av import AVWorlds

            worlds = AVWorlds(**asdict(d.world))
            mods = list(d.modalities)
            if not mods:
                raise ValueError(f"stage {self.stage.name}: data.modalities is empty")

            def get_sample(i: int) -> Any:
                return worlds.sample(mods[i % len(mods)], d.kind, i // len(mods))

            ds = UniMoEDataset(get_sample, d.items_per_modality * len(mods), encode)
            print(f"stage {self.stage.name}: {len(ds)} {d.kind} samples of {mods} (synthetic worlds)", flush=True)
            return ds
        return self._json_dataset(encode)

    def _json_dataset(self, encode: Callable[[Any], dict[str, Any]]) -> Dataset:
        """Every record read and checked before step 1 (placeholders, length: errors name file and sample, or
        skipped and counted); media are prepared per item when a batch is built, so memory holds decoded files
        rather than Whisper features."""
        from data.unimoe import UniMoEJsonReader

        d = self.data_cfg
        if not d.json_paths:
            raise ValueError(f"stage {self.stage.name}: data.source=unimoe_json needs data.json_paths")
        check = self._encoder(with_media=False)
        samples: list[Any] = []
        for p in d.json_paths:
            reader = UniMoEJsonReader(os.path.expandvars(p), d.media_root and os.path.expandvars(d.media_root),
                                      skip_bad=d.on_error == "skip")
            for sample in reader:
                try:
                    check(sample)
                    samples.append(sample)
                except ValueError as err:
                    if d.on_error == "raise":
                        raise ValueError(f"{p}: {err}") from None
                    self.skipped["unencodable"] = self.skipped.get("unencodable", 0) + 1
            if reader.report.skipped:
                self.skipped["bad record"] = self.skipped.get("bad record", 0) + len(reader.report.skipped)
        print(f"stage {self.stage.name}: {len(samples)} samples from {len(d.json_paths)} file(s); skipped "
              f"{self.skipped or 0}", flush=True)
        return UniMoEDataset(samples.__getitem__, len(samples), encode)

    def collate_fn(self, samples: list[Any]) -> dict[str, Any]:
        pad = self.model.tokenizer.pad_token_id
        return collate_unimoe(samples, 0 if pad is None else pad)

    def skipped_samples(self) -> dict[str, int]:
        return dict(self.skipped)

    # ---- training --------------------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._t_start = time.perf_counter()

    def on_train_end(self) -> None:
        if self._t_start is not None:
            self._t_train += time.perf_counter() - self._t_start
            self._t_start = None

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        loss, _, aux = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"], **batch["media"])
        return loss, dict(aux)

    # ---- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        counts = self.model.num_parameters()
        metrics: dict[str, float] = {"params_total_M": counts["total"] / 1e6, "params_active_M": counts["active"] / 1e6}
        if self._t_train > 0:
            metrics["train_s"] = self._t_train
        if self.eval_cfg.routing_samples and self.model.moe_layer_modules():
            metrics.update(self.routing_report(Path(out_dir), self.eval_cfg.routing_samples))
        if not self.eval_cfg.tasks:
            return metrics
        import eval as zoo_eval
        from zoo.stages.moe_llava import summarise_eval

        t0 = time.perf_counter()
        res = zoo_eval.run(self.model, tasks=list(self.eval_cfg.tasks), limit=self.eval_cfg.limit,
                           batch_size=self.eval_cfg.batch_size, output_dir=Path(out_dir) / "eval",
                           model_name=f"{self.architecture} ({self.stage.name})",
                           model_args={"stage": self.stage.name}, progress=False)
        metrics["eval_s"] = time.perf_counter() - t0
        metrics.update(summarise_eval(res))
        return metrics

    @torch.no_grad()
    def routing_report(self, out_dir: Path, n: int) -> dict[str, float]:
        """Which experts each modality's instruction samples use: the share of top-k choices per expert over every
        token of ``n`` train-split synthetic instruction samples of each modality, averaged over MoE layers.
        Writes ``routing.json`` (also per token kind and layer) and ``routing.png`` (the heatmap)."""
        from data.shapes_av import AV_MODALITIES, AVWorlds

        worlds = AVWorlds(**asdict(self.data_cfg.world))
        encode = self._encoder()
        was_training = self.model.training
        self.model.eval()
        table: dict[str, list[float]] = {}
        detail: dict[str, dict[str, list[list[float]]]] = {}
        for modality in AV_MODALITIES:
            batch = collate_unimoe([encode(worlds.sample(modality, "instruction", i)) for i in range(n)],
                                   self.model.tokenizer.pad_token_id or 0)
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["media"])
            by_kind = self.model.routing_by_modality(batch["input_ids"], batch["attention_mask"])
            detail[modality] = {kind: share.tolist() for kind, share in by_kind.items()}
            # Every token of the sample (text and media): the counts of each kind weighted by its token count.
            valid = batch["attention_mask"].bool()
            total = torch.zeros_like(next(iter(by_kind.values())))
            for kind, share in by_kind.items():
                spec = self.model.modalities.get(kind)
                kind_mask = valid & (batch["input_ids"] == spec.token_id) if spec is not None else None
                tokens = int(kind_mask.sum()) if kind_mask is not None else None
                if tokens is None:  # text: every valid position that no modality holds
                    tokens = int(valid.sum()) - sum(
                        int((valid & (batch["input_ids"] == m.token_id)).sum()) for m in self.model.modalities.values())
                total += share * tokens
            table[modality] = (total.mean(0) / total.mean(0).sum()).tolist()
        self.model.train(was_training)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {"experts_by_modality": table, "by_token_kind_and_layer": detail, "samples_per_modality": n}
        (out_dir / "routing.json").write_text(json.dumps(report, indent=1))
        _plot_heatmap(table, out_dir / "routing.png")
        return {f"routing/{m}/expert{e}": v for m, row in table.items() for e, v in enumerate(row)}


def dense_lm_state(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A causal LM's state dict with every ``zoo.moe`` layer made a dense FFN: ``mlp.experts.*`` averaged over
    experts into ``mlp.fc1`` / ``fc2`` (gelu experts) or ``mlp.gate_proj`` / ``up_proj`` / ``down_proj`` (swiglu),
    routers dropped."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        head, sep, tail = key.partition(".mlp.")
        if not sep or not (tail.startswith("experts.") or tail.startswith("router.")):
            out[key] = value
            continue
        name = tail.removeprefix("experts.")
        mean = value.float().mean(dim=0).to(value.dtype)
        if name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            out[f"{head}.mlp.{name.replace('_', '.')}"] = mean
        elif name == "gate_up_proj":
            out[f"{head}.mlp.gate_proj.weight"], out[f"{head}.mlp.up_proj.weight"] = mean.chunk(2, dim=0)
        elif name == "down_proj":
            out[f"{head}.mlp.down_proj.weight"] = mean
        elif not tail.startswith("router."):
            raise ValueError(f"{key}: only plain gelu / swiglu experts can be averaged into a dense FFN")
    return out


def _plot_heatmap(table: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    values = [table[r] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(values[0]), 0.6 + 0.5 * len(rows)))
    im = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(max(v) for v in values))
    ax.set_xticks(range(len(values[0])), [f"expert {e}" for e in range(len(values[0]))], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for e, v in enumerate(row):
            ax.text(e, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="share of top-k choices")
    ax.set_title("expert usage by modality")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _local_dir(path: str | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is not set")
    p = Path(os.path.expandvars(path))
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: {p} is not a directory (mmzoo never downloads; put the files there first)")
    return p
