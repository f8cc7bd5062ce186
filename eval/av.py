"""Audio, video and speech benchmarks: official-format readers, their scoring, and the synthetic Shapes tasks.

Facts on the files and the scoring: ``shared/reference/audio_video_benchmarks.md`` section 4.

Readers (``reader:`` in a task YAML; media are loaded lazily, audio as 16 kHz mono float32, video as a list of
RGB frames):
  clotho_aqa        ``clotho_aqa_<split>.csv`` (``file_name, QuestionText, answer, confidence``; one row per
                    annotator answer) + the audio folder. ``reader_args.subset``: ``all`` (one document per row, as
                    lmms-eval's ``ClothoAQA_test_all``), ``majority`` (one per question, the answer at least 2 of its
                    annotators gave; questions without one are dropped and counted), ``unanimous``.
  clotho_captions   ``clotho_captions_<split>.csv`` (``file_name, caption_1 .. caption_5``) + the audio folder.
  audiocaps         ``<split>.csv`` (``audiocap_id, youtube_id, start_time, caption``), rows grouped by
                    (youtube_id, start_time) into one clip with its captions; audio file names from
                    ``reader_args.audio_pattern`` (how the clips were downloaded is the user's business).
  msvd_qa           ``test_qa.json`` (``[{id, question, answer, video_id}]``); video ``vid<video_id>`` as a folder
                    of extracted frames (``reader_args.num_frames`` taken Uni-MoE's way: every ``total // n``-th).
  activitynet_qa    ``test_q.json`` (``{video_name, question, question_id}``) + ``test_a.json``
                    (``{answer, type, question_id}``); frames in ``v_<video_name>/``.
  unimoe_mcq        a Uni-MoE eval JSON (``id``, optional ``image``, ``voice`` list, ``conversations``, ``answer``):
                    MMBench-Audio-style spoken questions about an image, and the English listening test. Options
                    are the ``A. text`` lines of the human turn; the gold may be a letter, a one-letter list (as
                    MMBench1.1.json) or the option's text (as RACE-Audio).
  shapes_video_qa / shapes_audio_qa / shapes_speech_vqa   generated from ``data.video`` / ``data.audio`` /
                    ``data.shapes`` + ``data.speech`` (test split, ``reader_args`` = the world's config).

Scorers:
  clotho_aqa        lmms-eval ``exact_match``: lower-case and delete ``string.punctuation`` on both sides (no
                    whitespace strip), then string equality; by yes/no vs single-word questions.
  captioning        coco-caption (pycocoevalcap, what aac-metrics reproduces): BLEU-1..4, ROUGE-L, CIDEr-D
                    (pycocoevalcap's ``Cider``); METEOR with ``meteor: true`` (runs the bundled jar: needs Java);
                    SPICE is not offered (its jar downloads Stanford CoreNLP on first use: impossible offline).
                    Tokens: ``tokenizer: simple`` (lower-case, PTB punctuation removed, in Python) or ``ptb`` (the
                    bundled Stanford PTBTokenizer, Java): the official one.
  video_qa_exact    MSVD-QA / ActivityNet-QA exact-match accuracy, by question type. ``normalize: none`` is
                    ActivityNet-QA's ``eval.py`` (raw string equality); ``lower`` (lower-case + strip + drop a
                    final period) is MSVD-QA's classification-era protocol applied to generated words. ``judge:``
                    names a registered GPT-style judge (:func:`register_judge`); off by default, and its numbers are
                    reported separately as ``judge_accuracy`` / ``judge_score`` (not comparable across judges).
  mcq_letter        the letter by MMBench's rules (option form, then option text; no GPT fallback), accuracy.
  shapes_vqa        (eval/scorers.py) exact match per question kind, reused by the three synthetic tasks.
"""

from __future__ import annotations

import csv
import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from eval.metrics import GroupedAccuracy
from eval.parsers import mmbench_extract
from eval.readers import read_json, require
from eval.registry import Doc, TaskSpec, register_prompt, register_reader, register_scorer
from eval.scorers import Scorer, _require_target

__all__ = [
    "load_audio_16k",
    "load_frames",
    "lmms_exact_match",
    "CaptionMetric",
    "JUDGES",
    "register_judge",
    "ANET_TYPES",
]

ANET_TYPES = {0: "motion", 1: "spatial", 2: "temporal", 3: "yes_no", 4: "color", 5: "object", 6: "location",
              7: "number", 8: "other"}  # fmt: skip
_FRAME_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


# ------------------------------------------------------------------------------------------------------ media


def load_audio_16k(path: Path, where: str) -> np.ndarray:
    """A PCM WAV file as 16 kHz mono float32 (resampled with scipy's polyphase filter when its rate differs)."""
    from math import gcd

    from scipy.signal import resample_poly

    from data.speech import read_wav

    if not path.is_file():
        raise FileNotFoundError(f"{where}: audio file {path} does not exist (check the data root)")
    import wave

    with wave.open(str(path), "rb") as f:
        rate = f.getframerate()
    x = read_wav(path, expect_rate=None)
    if rate != 16_000:
        g = gcd(16_000, rate)
        x = resample_poly(x, 16_000 // g, rate // g).astype(np.float32)
    return x


def load_frames(folder: Path, num_frames: int, where: str) -> list:
    """``num_frames`` frames of an extracted-frames folder, Uni-MoE's sampling: frame ``i * (total // n)``."""
    from PIL import Image

    if not folder.is_dir():
        hint = ""
        for ext in (".avi", ".mp4", ".webm", ".mkv"):
            if folder.with_suffix(ext).is_file():
                hint = (f"; found {folder.with_suffix(ext)}: extract its frames into {folder}/ first (e.g. "
                        f"ffmpeg -i {folder.with_suffix(ext).name} {folder.name}/%05d.jpg)")  # fmt: skip
        raise FileNotFoundError(f"{where}: video frame folder {folder} does not exist{hint}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _FRAME_EXTS)
    if not files:
        raise ValueError(f"{where}: {folder} holds no frame images ({', '.join(_FRAME_EXTS)})")
    step = max(1, len(files) // num_frames)
    picked = [files[min(i * step, len(files) - 1)] for i in range(num_frames)]
    out = []
    for p in picked:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        return [(line, row) for line, row in enumerate(reader, 2)]


# ------------------------------------------------------------------------------------------------------ readers


@register_reader("clotho_aqa")
def read_clotho_aqa(spec: TaskSpec, files: Mapping[str, Path]) -> list[Doc]:
    subset = spec.reader_args.get("subset", "all")
    if subset not in ("all", "majority", "unanimous"):
        raise ValueError(f"{spec.source or spec.name}: reader_args.subset must be all/majority/unanimous, got {subset!r}")
    rows = _read_csv(files["csv"], ("file_name", "QuestionText", "answer"))
    groups: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for line, row in rows:
        groups[(row["file_name"], row["QuestionText"])].append((line, row["answer"]))
    docs: list[Doc] = []
    for q_index, ((file_name, question), answers) in enumerate(groups.items()):
        where = f"{files['csv']}:{answers[0][0]}"
        audio = partial(load_audio_16k, files["audio"] / file_name, where)
        counts = Counter(a for _, a in answers)
        if subset == "all":
            chosen = [(line, a) for line, a in answers]
        else:
            top, n = counts.most_common(1)[0]
            keep = n == len(answers) if subset == "unanimous" else n >= 2
            chosen = [(answers[0][0], top)] if keep else []
        for line, answer in chosen:
            kind = "yes/no" if answer.strip().lower() in ("yes", "no") else "single word"
            docs.append(Doc(
                doc_id=f"{q_index}" if subset != "all" else f"{q_index}/{line}", question=question, target=answer,
                media={"audio": [audio]}, fields={"answer_type": kind, "file_name": file_name},
                source=f"{files['csv']}:{line}",
            ))  # fmt: skip
    return docs


@register_reader("clotho_captions")
def read_clotho_captions(spec: TaskSpec, files: Mapping[str, Path]) -> list[Doc]:
    cols = [f"caption_{k}" for k in range(1, 6)]
    docs = []
    for line, row in _read_csv(files["csv"], ("file_name", *cols)):
        where = f"{files['csv']}:{line}"
        refs = [row[c] for c in cols if row[c]]
        if not refs:
            raise ValueError(f"{where}: field 'caption_1..5': no reference caption")
        docs.append(Doc(
            doc_id=row["file_name"], question="", target=refs,
            media={"audio": [partial(load_audio_16k, files["audio"] / row["file_name"], where)]},
            fields={"file_name": row["file_name"]}, source=where,
        ))  # fmt: skip
    return docs


@register_reader("audiocaps")
def read_audiocaps(spec: TaskSpec, files: Mapping[str, Path]) -> list[Doc]:
    pattern = spec.reader_args.get("audio_pattern", "{youtube_id}_{start_time}.wav")
    groups: dict[tuple[str, str], list[tuple[int, dict]]] = defaultdict(list)
    for line, row in _read_csv(files["csv"], ("audiocap_id", "youtube_id", "start_time", "caption")):
        groups[(row["youtube_id"], row["start_time"])].append((line, row))
    docs = []
    for (youtube_id, start_time), rows in groups.items():
        where = f"{files['csv']}:{rows[0][0]}"
        name = pattern.format(youtube_id=youtube_id, start_time=start_time)
        docs.append(Doc(
            doc_id=f"{youtube_id}_{start_time}", question="", target=[r["caption"] for _, r in rows],
            media={"audio": [partial(load_audio_16k, files["audio"] / name, where)]},
            fields={"audiocap_ids": [r["audiocap_id"] for _, r in rows]}, source=where,
        ))  # fmt: skip
    return docs


@register_reader("msvd_qa")
def read_msvd_qa(spec: TaskSpec, files: Mapping[str, Path]) -> list[Doc]:
    n_frames = int(spec.reader_args.get("num_frames", 8))
    records = read_json(files["qa"])
    if not isinstance(records, list):
        raise ValueError(f"{files['qa']}: expected a JSON list of {{id, question, answer, video_id}}")
    docs = []
    for k, rec in enumerate(records):
        where = f"{files['qa']}: record {k}"
        vid = require(rec, "video_id", where, int)
        docs.append(Doc(
            doc_id=str(require(rec, "id", where)), question=require(rec, "question", where, str),
            target=require(rec, "answer", where, str),
            media={"video": [partial(load_frames, files["frames"] / f"vid{vid}", n_frames, where)]},
            fields={"video_id": vid, "type": require(rec, "question", where, str).split(" ")[0].lower()},
            source=where,
        ))  # fmt: skip
    return docs


@register_reader("activitynet_qa")
def read_activitynet_qa(spec: TaskSpec, files: Mapping[str, Path]) -> list[Doc]:
    n_frames = int(spec.reader_args.get("num_frames", 8))
    questions, answers = read_json(files["questions"]), read_json(files["answers"])
    for path, data in ((files["questions"], questions), (files["answers"], answers)):
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
    by_id = {}
    for k, a in enumerate(answers):
        by_id[require(a, "question_id", f"{files['answers']}: record {k}")] = (k, a)
    docs = []
    for k, q in enumerate(questions):
        where = f"{files['questions']}: record {k}"
        qid = require(q, "question_id", where)
        if qid not in by_id:
            raise ValueError(f"{where}: question_id {qid!r} has no record in {files['answers']}")
        ak, a = by_id[qid]
        a_where = f"{files['answers']}: record {ak}"
        qtype = require(a, "type", a_where, int)
        if qtype not in ANET_TYPES:
            raise ValueError(f"{a_where}: field 'type' must be 0..8, got {qtype}")
        video = require(q, "video_name", where, str)
        docs.append(Doc(
            doc_id=str(qid), question=require(q, "question", where, str), target=require(a, "answer", a_where, str),
            media={"video": [partial(load_frames, files["frames"] / f"v_{video}", n_frames, where)]},
            fields={"type": ANET_TYPES[qtype], "video_name": video}, source=where,
        ))  # fmt: skip
    return docs


_OPTION_LINE = re.compile(r"^\s*([A-H])[.:)]\s*(.+?)\s*$", re.M)


@register_reader("unimoe_mcq")
def read_unimoe_mcq(spec: TaskSpec, files: Mapping[str, Path]) -> list[Doc]:
    root = files["json"].parent if "media" not in files else files["media"]
    records = read_json(files["json"])
    if not isinstance(records, list):
        raise ValueError(f"{files['json']}: expected a JSON list of Uni-MoE records")
    docs = []
    for k, rec in enumerate(records):
        where = f"{files['json']}: record {k}"
        turns = require(rec, "conversations", where, list)
        human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
        if not isinstance(human, str):
            raise ValueError(f"{where}: field 'conversations': no human turn")
        options = dict(_OPTION_LINE.findall(human))
        if len(options) < 2:
            raise ValueError(f"{where}: field 'conversations[0].value': fewer than two 'A. option' lines")
        gold = require(rec, "answer", where, (str, list))
        gold = gold[0] if isinstance(gold, list) and len(gold) == 1 else gold
        if not isinstance(gold, str):
            raise ValueError(f"{where}: field 'answer' must be a letter, a one-letter list or the option text")
        letter = gold.strip() if gold.strip() in options else next(
            (key for key, text in options.items() if text.strip().lower() == gold.strip().lower()), None)
        if letter is None:
            raise ValueError(f"{where}: field 'answer' {gold!r} is neither an option letter nor an option's text "
                             f"(options {sorted(options)})")  # fmt: skip
        voices = rec.get("voice", [])
        if human.count("<audio>") != len(voices):
            raise ValueError(f"{where}: field 'voice': {len(voices)} file(s) but {human.count('<audio>')} "
                             "'<audio>' placeholder(s)")  # fmt: skip
        media: dict[str, list] = {"audio": [partial(load_audio_16k, root / v, where) for v in voices]}
        image = rec.get("image")
        if isinstance(image, list):
            image = image[0] if image else None
        text = re.sub(r"<(image|audio|video)>\n?", "", human).strip()
        docs.append(Doc(
            doc_id=str(rec.get("id", rec.get("question_id", k))), question=text, target=letter,
            image=None if image is None else str(root / image), media=media,
            fields={"options": options, "category": _first(rec.get("category")) or ""}, source=where,
        ))  # fmt: skip
    return docs


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


# ------------------------------------------------------------------------------------------------ synthetic tasks


def _count(spec: TaskSpec, n_key: str, default: int) -> int:
    return int(spec.reader_args.get(n_key, default))


def _clip_world_docs(spec: TaskSpec, world: Any, modality: str, media_of: Any, limit: int | None) -> list[Doc]:
    """One document per question of each clip of a synthetic video or audio world (clips drawn in order)."""
    docs: list[Doc] = []
    for clip in world.iter_clips(spec.split, _count(spec, "num_clips", 200)):
        if limit is not None and len(docs) >= limit:
            break
        for k, qa in enumerate(clip.qa):
            docs.append(Doc(
                doc_id=f"{clip.index}/{k}", question=qa.question, target=qa.answer, media={modality: [media_of(clip)]},
                fields={"kind": qa.kind, "clip": clip.index},
                source=f"shapes {modality} {spec.split} clip {clip.index} qa[{k}]",
            ))  # fmt: skip
    return docs


def _world_args(spec: TaskSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.reader_args.items() if k != "num_clips"}


@register_reader("shapes_video_qa")
def read_shapes_video_qa(spec: TaskSpec, files: Mapping[str, Path], limit: int | None = None) -> list[Doc]:
    from data.video import VideoConfig, VideoWorld

    world = VideoWorld(VideoConfig(**_world_args(spec)))
    return _clip_world_docs(spec, world, "video", lambda clip: clip.frames, limit)


@register_reader("shapes_audio_qa")
def read_shapes_audio_qa(spec: TaskSpec, files: Mapping[str, Path], limit: int | None = None) -> list[Doc]:
    from data.audio import AudioConfig, AudioWorld

    world = AudioWorld(AudioConfig(**_world_args(spec)))
    return _clip_world_docs(spec, world, "audio", lambda clip: clip.waveform, limit)


@register_reader("shapes_speech_vqa")
def read_shapes_speech_vqa(spec: TaskSpec, files: Mapping[str, Path], limit: int | None = None) -> list[Doc]:
    """ShapesVQA asked by voice: the image, and the question as speech (``Doc.question`` is empty)."""
    from data.shapes import ShapesWorld, WorldConfig
    from data.speech import speak

    args = dict(spec.reader_args)
    n = int(args.pop("num_scenes", 200))
    world = ShapesWorld(WorldConfig(image_size=int(args.pop("image_size", 64)), seed=int(args.pop("seed", 0)),
                                    **dict(args.pop("world", {}) or {})))  # fmt: skip
    docs: list[Doc] = []
    for index in range(n):
        if limit is not None and len(docs) >= limit:
            break
        scene = world.scene(index, split=spec.split)
        for k, qa in enumerate(scene.vqa):
            docs.append(Doc(
                doc_id=f"{index}/{k}", question="", target=qa.answer, image=scene.image,
                media={"audio": [partial(speak, qa.question)]},
                fields={"kind": qa.kind, "scene": index, "transcript": qa.question},
                source=f"shapes {spec.split} scene {index} spoken vqa[{k}]",
            ))  # fmt: skip
    return docs


@register_prompt("activitynet")
def activitynet_prompt(doc: Doc, spec: TaskSpec) -> str:
    """lmms-eval's ActivityNet-QA prompt: the question capitalised, a question mark, then the post-prompt."""
    question = doc.question[:1].upper() + doc.question[1:]
    return spec.pre_prompt + question + "?" + spec.post_prompt


# ------------------------------------------------------------------------------------------------------ scorers


def lmms_exact_match(prediction: str, target: str) -> bool:
    """lmms-eval's ``exact_match`` (HF evaluate port): lower-case, delete ASCII punctuation, compare (no strip)."""
    table = str.maketrans("", "", string.punctuation)
    return prediction.lower().translate(table) == target.lower().translate(table)


@register_scorer("clotho_aqa")
class ClothoAQAScorer(Scorer):
    def build_metric(self, docs):
        return GroupedAccuracy(groups=("yes/no", "single word"))

    def score(self, predictions, docs):
        records, scores = [], []
        for pred, doc in zip(predictions, docs, strict=True):
            s = float(lmms_exact_match(pred, _require_target(doc)))
            records.append({"parsed": pred, "score": s, "unparsed": False})
            scores.append(s)
        self.metric.update(scores, [[d.fields["answer_type"]] for d in docs], [False] * len(docs))
        return records


def _bytes(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


class CaptionMetric(Metric):
    """coco-caption metrics of generated captions against their references, accumulated over batches and ranks.

    Corpus-level metrics (CIDEr-D's IDF comes from all references) need every caption at ``compute``; the texts are
    kept as UTF-8 byte tensors (list states concatenate across processes), with lengths to split them again.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, tokenizer: str = "simple", meteor: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if tokenizer not in ("simple", "ptb"):
            raise ValueError(f"CaptionMetric tokenizer must be 'simple' or 'ptb', got {tokenizer!r}")
        self.tokenizer, self.meteor = tokenizer, meteor
        self.add_state("text", default=[], dist_reduce_fx="cat")  # all UTF-8 bytes, one after another
        self.add_state("lengths", default=[], dist_reduce_fx="cat")  # byte length of each text
        self.add_state("n_refs", default=[], dist_reduce_fx="cat")  # references per sample (candidate first)

    def update(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        for cand, refs in zip(candidates, references, strict=True):
            texts = [cand, *refs]
            self.text.append(torch.cat([_bytes(t) for t in texts]) if any(texts) else torch.zeros(0, dtype=torch.uint8))
            self.lengths.append(torch.tensor([len(t.encode("utf-8")) for t in texts], dtype=torch.long))
            self.n_refs.append(torch.tensor([len(refs)], dtype=torch.long))

    def _samples(self) -> list[tuple[str, list[str]]]:
        if not self.n_refs or (isinstance(self.n_refs, Tensor) and self.n_refs.numel() == 0):
            return []
        data = bytes(dim_zero_cat(self.text).tolist())
        lengths = dim_zero_cat(self.lengths).tolist()
        out, pos, li = [], 0, 0
        for n in dim_zero_cat(self.n_refs).tolist():
            texts = []
            for _ in range(n + 1):
                texts.append(data[pos: pos + lengths[li]].decode("utf-8"))
                pos, li = pos + lengths[li], li + 1
            out.append((texts[0], texts[1:]))
        return out

    def compute(self) -> dict[str, Tensor]:
        samples = self._samples()
        if not samples:
            return {"n_samples": torch.tensor(0.0)}
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in caption_scores(samples, self.tokenizer,
                                                                                      self.meteor).items()}


_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def simple_tokenize(text: str) -> str:
    """Python stand-in for coco-caption's PTB step: lower-case, split off punctuation, drop PTB punctuation tokens."""
    tokens = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", text.lower())
    return " ".join(t for t in tokens if t not in _PTB_PUNCT and t not in string.punctuation)


def caption_scores(samples: Sequence[tuple[str, Sequence[str]]], tokenizer: str = "simple",
                   meteor: bool = False) -> dict[str, float]:  # fmt: skip
    """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR) with pycocoevalcap, as coco-caption computes them (x100)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise ImportError("captioning scores need pycocoevalcap: pip install 'mmzoo[captions]'") from err

    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        res = ptb.tokenize({i: [{"caption": c}] for i, (c, _) in enumerate(samples)})
        gts = ptb.tokenize({i: [{"caption": r} for r in refs] for i, (_, refs) in enumerate(samples)})
    else:
        res = {i: [simple_tokenize(c)] for i, (c, _) in enumerate(samples)}
        gts = {i: [simple_tokenize(r) for r in refs] for i, (_, refs) in enumerate(samples)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu_{n + 1}": 100.0 * b for n, b in enumerate(bleu)}
    out["rouge_l"] = 100.0 * Rouge().compute_score(gts, res)[0]
    out["cider_d"] = 100.0 * Cider().compute_score(gts, res)[0]
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        out["meteor"] = 100.0 * scorer.compute_score(gts, res)[0]
        del scorer  # its __del__ stops the Java process
    out["n_samples"] = float(len(samples))
    return out


@register_scorer("captioning")
class CaptioningScorer(Scorer):
    primary = "cider_d"

    def build_metric(self, docs):
        return CaptionMetric(tokenizer=self.args.get("tokenizer", "simple"), meteor=bool(self.args.get("meteor")))

    def score(self, predictions, docs):
        refs = [_require_target(d) for d in docs]
        self.metric.update([p.strip() for p in predictions], refs)
        return [{"parsed": p.strip(), "score": None, "unparsed": not p.strip()} for p in predictions]


# A judge maps (question, gold answer, prediction) to ("yes" | "no", score 0..5), as Video-ChatGPT's GPT prompt does.
Judge = Callable[[str, str, str], tuple[str, float]]
JUDGES: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str):
    """Register a judge factory ``factory(**judge_args) -> judge``; a task turns it on with ``scorer_args.judge``."""

    def wrap(factory):
        if name in JUDGES and JUDGES[name] is not factory:
            raise ValueError(f"judge {name!r} is registered twice")
        JUDGES[name] = factory
        return factory

    return wrap


def _normalize_answer(text: str, how: str) -> str:
    if how == "none":
        return text
    if how == "lower":
        return text.strip().lower().rstrip(".").strip()
    raise ValueError(f"video_qa_exact: normalize must be 'none' or 'lower', got {how!r}")


class _JudgeMetric(Metric):
    """Judge accuracy (share of "yes", %) and mean judge score (0..5), overall."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for key in ("yes", "count", "score"):
            self.add_state(key, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, verdicts: Sequence[str], scores: Sequence[float]) -> None:
        self.yes += float(sum(v == "yes" for v in verdicts))
        self.count += float(len(verdicts))
        self.score += float(sum(scores))

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1)
        return {"judge_accuracy": 100.0 * self.yes / n, "judge_score": self.score / n}


@register_scorer("video_qa_exact")
class VideoQAScorer(Scorer):
    def __init__(self, spec: TaskSpec, docs: Sequence[Doc], **args: Any) -> None:
        super().__init__(spec, docs, **args)
        self.normalize = args.get("normalize", "none")
        _normalize_answer("", self.normalize)
        judge = args.get("judge")
        if judge is not None and judge not in JUDGES:
            raise KeyError(f"task {spec.name!r}: unknown judge {judge!r}; registered: {sorted(JUDGES)}")
        self.judge = None if judge is None else JUDGES[judge](**dict(args.get("judge_args") or {}))
        self.judge_metric = _JudgeMetric() if self.judge is not None else None

    def build_metric(self, docs):
        return GroupedAccuracy(groups=sorted({d.fields["type"] for d in docs}))

    def score(self, predictions, docs):
        records, scores, verdicts, judged = [], [], [], []
        for pred, doc in zip(predictions, docs, strict=True):
            parsed = _normalize_answer(pred, self.normalize)
            s = float(parsed == _normalize_answer(_require_target(doc), self.normalize))
            record = {"parsed": parsed, "score": s, "unparsed": False}
            if self.judge is not None:
                verdict, jscore = self.judge(doc.question, doc.target, pred)
                if verdict not in ("yes", "no"):
                    raise ValueError(f"{doc.source}: judge returned {verdict!r}; expected 'yes' or 'no'")
                record["judge"] = {"pred": verdict, "score": float(jscore)}
                verdicts.append(verdict)
                judged.append(float(jscore))
            records.append(record)
            scores.append(s)
        self.metric.update(scores, [[d.fields["type"]] for d in docs], [False] * len(docs))
        if self.judge_metric is not None:
            self.judge_metric.update(verdicts, judged)
        return records

    def compute(self):
        out = super().compute()
        if self.judge_metric is not None:
            out |= {k: float(v) for k, v in self.judge_metric.compute().items()}
        return out


@register_scorer("mcq_letter")
class MCQLetterScorer(Scorer):
    def build_metric(self, docs):
        return GroupedAccuracy(groups=sorted({d.fields.get("category", "") for d in docs} - {""}))

    def score(self, predictions, docs):
        records, scores = [], []
        for pred, doc in zip(predictions, docs, strict=True):
            letter = mmbench_extract(pred, doc.fields["options"])
            s = float(letter is not None and letter == _require_target(doc))
            records.append({"parsed": letter, "score": s, "unparsed": letter is None})
            scores.append(s)
        self.metric.update(scores, [[d.fields["category"]] if d.fields.get("category") else [] for d in docs],
                           [r["unparsed"] for r in records])  # fmt: skip
        return records
