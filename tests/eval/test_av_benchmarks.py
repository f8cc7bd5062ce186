"""Audio / video / speech benchmarks: readers on official-format fixtures, official scoring rules, report examples."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import eval.av as av
from eval.registry import get_task, resolve_files
from tests.eval.conftest import FIXTURES


def _docs(name, sub):
    spec = get_task(name)
    files = resolve_files(spec, data_roots={spec.data_subdir: FIXTURES / sub})
    from eval.registry import READERS

    return spec, READERS[spec.reader](spec, files)


def _score(spec, docs, predictions, **args):
    from eval.registry import SCORERS

    scorer = SCORERS[spec.scorer](spec, docs, **{**dict(spec.scorer_args), **args})
    records = scorer.score(predictions, docs)
    return scorer.compute(), records


# ------------------------------------------------------------------------------------------------------ ClothoAQA


def test_clotho_aqa_subsets_and_lmms_exact_match():
    spec, docs = _docs("clotho_aqa_test_all", "clotho_aqa")
    assert len(docs) == 12  # one document per annotator row
    spec_m, majority = _docs("clotho_aqa_test_majority", "clotho_aqa")
    # "What is falling on the roof?" has three different answers: no majority, dropped.
    assert [d.target for d in majority] == ["yes", "no", "dog"]
    assert [d.fields["answer_type"] for d in majority] == ["yes/no", "yes/no", "single word"]
    spec_u = replace(spec_m, reader_args={"subset": "unanimous"})
    from eval.registry import READERS

    files = resolve_files(spec_u, data_roots={"clotho_aqa": FIXTURES / "clotho_aqa"})
    assert [d.target for d in READERS["clotho_aqa"](spec_u, files)] == ["yes", "no"]
    # Audio: 44.1 kHz in the release, 16 kHz mono for the model (0.1 s -> 1600 samples).
    audio = majority[0].load_media()["audio"][0]
    assert audio.dtype == np.float32 and len(audio) == 1600
    # lmms-eval exact_match: case and punctuation do not matter, surrounding whitespace does.
    metrics, records = _score(spec_m, majority, ["Yes.", " no", "DOG!"])
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0]
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert metrics["accuracy_yes/no"] == 50.0 and metrics["accuracy_single word"] == 100.0


def test_clotho_aqa_missing_column_is_named(tmp_path):
    (tmp_path / "clotho_aqa_test.csv").write_text("file_name,question,answer\nx.wav,Q?,yes\n")
    (tmp_path / "audio_files").mkdir()
    spec = get_task("clotho_aqa_test_all")
    from eval.registry import READERS

    with pytest.raises(ValueError, match=r"clotho_aqa_test.csv: missing column\(s\) \['QuestionText'\]"):
        READERS["clotho_aqa"](spec, resolve_files(spec, data_roots={"clotho_aqa": tmp_path}))


# ------------------------------------------------------------------------------------------------------ captioning


def test_captioning_matches_pycocoevalcap_and_accumulates():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    spec, clotho = _docs("clotho_v2_eval", "clotho")
    _, caps = _docs("audiocaps_test", "audiocaps")
    assert [len(d.target) for d in clotho] == [5, 5] and [len(d.target) for d in caps] == [5, 5]
    assert caps[0].doc_id == "abc123_30" and caps[0].fields["audiocap_ids"] == ["100", "101", "102", "103", "104"]
    assert len(caps[1].load_media()["audio"][0]) == 3200
    docs = clotho + caps
    preds = ["Birds chirp in the morning.", "Cars pass on a busy road!", "A man speaks to a crowd", "A dog barks"]
    scorer_cls = __import__("eval.registry", fromlist=["SCORERS"]).SCORERS["captioning"]
    scorer = scorer_cls(spec, docs, tokenizer="simple")
    scorer.score(preds[:3], docs[:3])  # two batches
    scorer.score(preds[3:], docs[3:])
    got = scorer.compute()
    # Reference: pycocoevalcap on the whole set at once, with the same tokenisation.
    gts = {i: [av.simple_tokenize(r) for r in d.target] for i, d in enumerate(docs)}
    res = {i: [av.simple_tokenize(p)] for i, p in enumerate(preds)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert got["bleu_1"] == pytest.approx(100 * bleu[0]) and got["bleu_4"] == pytest.approx(100 * bleu[3])
    assert got["cider_d"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    assert got["rouge_l"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0])
    assert got["n_samples"] == 4 and got["cider_d"] > 50
    assert av.simple_tokenize("Birds, chirping -- LOUDLY!") == "birds chirping loudly"


# ------------------------------------------------------------------------------------------------------ video QA


def test_msvd_qa_reader_frames_and_lowercase_exact_match():
    spec, docs = _docs("msvd_qa", "msvd_qa")
    assert [d.target for d in docs] == ["man", "play", "dog"]
    frames = docs[0].load_media()["video"][0]
    # 12 frames, 8 wanted: every 12 // 8 = 1st frame from 0 (Uni-MoE's sampling), so frames 0..7.
    assert len(frames) == 8 and [f.getpixel((0, 0))[0] for f in frames][:3] == [0, 20, 40]
    metrics, records = _score(spec, docs, ["Man.", "playing", " DOG "])
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0]


def test_activitynet_official_raw_equality_and_types():
    spec, docs = _docs("activitynet_qa", "activitynet_qa")
    assert [d.fields["type"] for d in docs] == ["object", "yes_no", "number"]
    from eval.registry import PROMPTS

    assert PROMPTS[spec.prompt](docs[0], spec) == (
        "What is the person holding? Answer the question using a single word or phrase."
    )
    metrics, records = _score(spec, docs, ["ball", "Yes", "2"])
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0]  # official eval.py: no normalisation at all
    assert metrics["accuracy_yes_no"] == 0.0 and metrics["accuracy_number"] == 100.0
    assert "judge_accuracy" not in metrics  # the judge is off by default


def test_video_qa_judge_is_pluggable():
    calls = []

    @av.register_judge("test_lenient")
    def lenient(threshold: int = 0):
        def judge(question, answer, prediction):
            calls.append((question, answer, prediction))
            ok = answer.lower() in prediction.lower()
            return ("yes" if ok else "no"), (5.0 if ok else threshold)

        return judge

    spec, docs = _docs("activitynet_qa", "activitynet_qa")
    metrics, records = _score(spec, docs, ["a ball", "Yes", "3"], judge="test_lenient", judge_args={"threshold": 1})
    assert metrics["accuracy"] == 0.0  # exact match is unchanged by the judge
    assert metrics["judge_accuracy"] == pytest.approx(200 / 3) and metrics["judge_score"] == pytest.approx(11 / 3)
    assert records[0]["judge"] == {"pred": "yes", "score": 5.0} and len(calls) == 3
    with pytest.raises(KeyError, match="unknown judge 'nope'"):
        _score(spec, docs, ["x"] * 3, judge="nope")


def test_missing_frames_say_how_to_extract(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "vid1.avi").write_bytes(b"")
    (tmp_path / "test_qa.json").write_text(json.dumps([{"id": 0, "question": "q?", "answer": "a", "video_id": 1}]))
    spec, _ = _docs("msvd_qa", "msvd_qa")
    from eval.registry import READERS

    docs = READERS["msvd_qa"](spec, resolve_files(spec, data_roots={"msvd_qa": tmp_path}))
    with pytest.raises(FileNotFoundError, match=r"test_qa.json: record 0: video frame folder .*vid1 .*ffmpeg"):
        docs[0].load_media()


# ------------------------------------------------------------------------------------------------------ spoken MCQ


def test_spoken_mcq_readers_and_letters():
    spec, docs = _docs("mmbench_audio", "mmbench_audio")
    (doc,) = docs
    assert doc.target == "B" and doc.fields["options"] == {"A": "blue", "B": "red", "C": "green", "D": "yellow"}
    media = doc.load_media()
    assert media["image"][0].size == (16, 16) and media["audio"][0].ndim == 1
    assert doc.fields["category"] == "color_attribute"
    spec_l, listening = _docs("english_listening", "english_listening")
    assert [d.target for d in listening] == ["B", "A"]  # option text mapped to its letter
    metrics, records = _score(spec_l, listening, ["B", "The answer is (B)."])
    assert [r["parsed"] for r in records] == ["B", "B"] and metrics["accuracy"] == 50.0


def test_placeholder_mismatch_in_eval_json_is_named(tmp_path):
    rec = {"id": "0", "voice": ["a.wav", "b.wav"], "answer": "A",
           "conversations": [{"from": "human", "value": "<audio>\nA. x\nB. y"}]}  # fmt: skip
    (tmp_path / "mmbench_audio.json").write_text(json.dumps([rec]))
    spec = get_task("mmbench_audio")
    from eval.registry import READERS

    with pytest.raises(ValueError, match=r"record 0: field 'voice': 2 file\(s\) but 1 '<audio>'"):
        READERS["unimoe_mcq"](spec, resolve_files(spec, data_roots={"mmbench_audio": tmp_path}))


# ------------------------------------------------------------------------------------------------------ synthetic


class _FrameDiffModel:
    """Answers direction questions from the frames (frame-difference baseline), everything else with 'x'."""

    def generate(self, images, prompts, max_new_tokens=16, *, media=None, **gen):
        from data.av_baselines import frame_difference_direction

        out = []
        for k, prompt in enumerate(prompts):
            video = (media or {}).get("video", [None] * len(prompts))[k]
            out.append(frame_difference_direction(video) if video is not None and "direction" in prompt else "x")
        return out


def test_shapes_av_tasks_run_and_report_examples(tmp_path):
    import eval

    spec = replace(get_task("shapes_video_qa"), reader_args={"num_clips": 6, "seed": 0})
    results = eval.run(_FrameDiffModel(), [spec], output_dir=tmp_path, progress=False)
    entry = results["results"]["shapes_video_qa"]
    assert entry["accuracy_direction,none"] == 100.0 and entry["accuracy_appear,none"] == 0.0
    examples = results["examples"]["shapes_video_qa"]
    assert len(examples) == 3 and all((tmp_path / f).is_file() for e in examples for f in e["files"])
    assert examples[0]["files"][0].endswith(".gif") and examples[0]["files"][1].endswith(".png")
    md = (tmp_path / "results.md").read_text()
    assert "### Examples" in md and f"]({examples[0]['files'][0]})" in md


def test_shapes_audio_and_speech_docs():
    from eval.registry import READERS

    spec = replace(get_task("shapes_audio_qa"), reader_args={"num_clips": 3, "seed": 0})
    docs = READERS["shapes_audio_qa"](spec, {})
    assert {d.fields["kind"] for d in docs} <= {"order", "first", "exist", "count"}
    assert docs[0].load_media()["audio"][0].dtype == np.float32
    spec = replace(get_task("shapes_speech_vqa"), reader_args={"num_scenes": 2, "seed": 0})
    docs = READERS["shapes_speech_vqa"](spec, {})
    from data.shapes import ShapesWorld
    from data.speech import speak

    scene = ShapesWorld().scene(0, split="test")
    assert docs[0].question == "" and docs[0].fields["transcript"] == scene.vqa[0].question
    assert np.array_equal(docs[0].load_media()["audio"][0], speak(scene.vqa[0].question))


class _MediaOracle:
    """Answers every fixture document correctly, keyed by prompt, image and media (hashes of pixels / samples)."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}

    @staticmethod
    def _key(prompt, image, media) -> str:
        import hashlib

        h = hashlib.sha1(prompt.encode())
        if image is not None:
            h.update(image.tobytes())
        for kind in sorted(media):
            items = media[kind] if isinstance(media[kind], list) else [media[kind]]
            for item in items:
                for part in item if isinstance(item, list) else [item]:
                    h.update(part.tobytes())
        return h.hexdigest()

    def learn(self, spec, docs) -> None:
        from eval.registry import PROMPTS
        from tests.eval.conftest import gold_answer

        for doc in docs:
            media = doc.load_media()
            image = media.pop("image", [None])[0]
            self.table[self._key(PROMPTS[spec.prompt](doc, spec), image, media)] = gold_answer(doc)

    def generate(self, images, prompts, max_new_tokens=16, *, media=None, **gen):
        out = []
        for k, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            mine = {kind: v[k] for kind, v in (media or {}).items() if v[k] is not None}
            out.append(self.table.get(self._key(prompt, image, mine), ""))
        return out


def test_every_av_fixture_task_with_an_oracle(tmp_path):
    import eval
    from eval.registry import READERS, expand_tasks

    # Report examples for two tasks only: drawing spectrograms for all of them would dominate the test's time.
    specs = [replace(s, examples=s.examples if s.name in ("activitynet_qa", "clotho_v2_eval") else 0)
             for s in expand_tasks("clotho_aqa,audio_captioning,video_qa,speech_mcq")]  # fmt: skip
    oracle = _MediaOracle()
    for spec in specs:
        oracle.learn(spec, READERS[spec.reader](spec, resolve_files(spec, data_root=FIXTURES)))
    res = eval.run(oracle, specs, data_root=FIXTURES, progress=False, batch_size=2, output_dir=tmp_path)
    primary = res["primary_metric"]
    got = {t: res["results"][t][f"{primary[t]},none"] for t in res["results"]}
    # ClothoAQA "all" has one document per annotator row, but the oracle knows one answer per (prompt, audio): the
    # last one it learned. "What is falling on the roof?" (rain / water / hail) -> "hail": 1 of 3; "What animal is
    # heard?" -> the majority task's "dog", learned later: 2 of 3; the unanimous questions 6 of 6. 9 of 12.
    assert got.pop("clotho_aqa_test_all") == pytest.approx(100 * 9 / 12)
    assert {t: v for t, v in got.items() if primary[t] == "accuracy"} == {
        "clotho_aqa_test_majority": 100.0, "msvd_qa": 100.0, "activitynet_qa": 100.0, "mmbench_audio": 100.0,
        "english_listening": 100.0,
    }  # fmt: skip
    # Captioning: the oracle says each clip's most frequent reference; CIDEr-D of a reference against the set.
    assert got["clotho_v2_eval"] > 100 and got["audiocaps_test"] > 100
    md = (tmp_path / "results.md").read_text()
    assert md.count("examples/activitynet_qa/") >= 2 and (tmp_path / "examples/clotho_v2_eval/0_audio0.png").is_file()
    assert set(res["examples"]) == {"activitynet_qa", "clotho_v2_eval"}


@pytest.mark.slow  # the METEOR jar loads its paraphrase tables: about 45 s on the 2-core machine
@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="METEOR and the PTB tokenizer run Java")
def test_meteor_and_ptb_tokenizer_with_java():
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _, docs = _docs("clotho_v2_eval", "clotho")
    samples = [("Birds chirp in the morning.", docs[0].target), ("Cars pass on a busy road!", docs[1].target)]
    got = av.caption_scores(samples, tokenizer="ptb", meteor=True)
    ptb = PTBTokenizer()
    res = ptb.tokenize({i: [{"caption": c}] for i, (c, _) in enumerate(samples)})
    gts = ptb.tokenize({i: [{"caption": r} for r in refs] for i, (_, refs) in enumerate(samples)})
    assert res[0] == ["birds chirp in the morning"]
    meteor = Meteor()
    expected = 100 * meteor.compute_score(gts, res)[0]
    del meteor  # stops its Java process
    assert got["meteor"] == pytest.approx(expected)
    assert 0 < got["meteor"] < 100
    # On plain sentences the Python tokenizer gives the PTB tokens, so the n-gram metrics agree.
    assert got["cider_d"] == pytest.approx(av.caption_scores(samples)["cider_d"])
