"""Every official-format reader on its miniature fixture (tests/eval/fixtures/<bench>/), and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from eval.registry import READERS, get_task, load_task_yaml, resolve_files

FIXTURES = Path(__file__).parent / "fixtures"
MME_SUBTASKS = ["existence", "artwork", "code_reasoning"]


def read(name: str, root: Path = FIXTURES, **changes):
    spec = get_task(name)
    if changes:
        spec = dataclasses.replace(spec, **changes)
    return READERS[spec.reader](spec, resolve_files(spec, data_root=root))


@pytest.fixture(autouse=True)
def _no_env_roots(monkeypatch):
    for var in ("MMZOO_DATA", "MMZOO_VQAV2", "MMZOO_POPE"):
        monkeypatch.delenv(var, raising=False)


def test_vqav2():
    docs = read("vqav2_val")
    assert [d.doc_id for d in docs] == ["42000", "42001", "73000"]
    assert docs[0].question == "What color is the bus?"
    assert docs[0].target[:7] == ["red"] * 7 and len(docs[0].target) == 10
    assert docs[1].fields["answer_type"] == "number" and docs[2].fields["answer_type"] == "yes/no"
    assert docs[0].image.name == "COCO_val2014_000000000042.jpg"
    assert docs[0].load_image().size == (8, 8)


def test_gqa():
    docs = read("gqa_testdev_balanced")
    assert [(d.doc_id, d.target, d.fields["structural"]) for d in docs] == [
        ("20968379", "blue", "choose"),
        ("201640614", "man", "query"),
    ]
    assert docs[0].load_image() is not None


def test_textvqa():
    docs = read("textvqa_val")
    assert docs[0].fields["ocr_tokens"] == ["DAKOTA", "DIGITAL", "Single-Use"]
    assert docs[0].target.count("dakota") == 5 and docs[1].fields["ocr_tokens"] == []
    assert docs[1].image.name == "0054c91397f2fe05.jpg"


def test_vizwiz():
    docs = read("vizwiz_val")
    assert [d.doc_id for d in docs] == ["VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg"]
    assert docs[0].target.count("unanswerable") == 9 and docs[0].fields["answer_type"] == "unanswerable"


def test_scienceqa_image_subset():
    docs = read("scienceqa_img")
    assert [(d.doc_id, d.target) for d in docs] == [
        ("10", 0),
        ("11", 1),
    ]  # pid 5 has no image, pid 20 is train
    assert docs[1].fields["hint"].startswith("Read the text")
    assert docs[0].image == FIXTURES / "scienceqa/images/test/10/image.png"
    everything = read("scienceqa_img", reader_args={"image_only": False})
    assert [d.doc_id for d in everything] == ["5", "10", "11"] and everything[0].image is None


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_pope_splits(split):
    docs = read(f"pope_{split}")
    assert [d.target for d in docs] == ["yes", "no", "yes", "no"]
    assert docs[0].question == "Is there a dining table in the image?"
    assert docs[0].fields["category"] == split


def test_mme_both_folder_layouts():
    docs = read("mme", reader_args={"subtasks": MME_SUBTASKS})
    assert len(docs) == 8
    by_task = {t: [d for d in docs if d.fields["subtask"] == t] for t in MME_SUBTASKS}
    assert [d.fields["pair_id"] for d in by_task["existence"]] == [0, 0, 1, 1]
    assert [d.target for d in by_task["artwork"]] == ["Yes", "No"]
    assert by_task["artwork"][0].image.parent.name == "images"  # the images/ + questions_answers_YN/ layout
    assert by_task["code_reasoning"][0].image.suffix == ".png"
    assert all(d.load_image() is not None for d in docs)


def test_mmbench_circular_expansion():
    docs = read("mmbench_en_dev")
    assert [d.doc_id for d in docs] == ["0", "1000000", "2000000", "3000000", "1", "1000001"]
    # The answer letter follows its option ("blue") through the rotations.
    assert [(d.target, d.fields["options"][d.target]) for d in docs[:4]] == [
        ("C", "blue"), ("B", "blue"), ("A", "blue"), ("D", "blue"),
    ]  # fmt: skip
    assert docs[1].fields["options"] == {"A": "green", "B": "blue", "C": "yellow", "D": "red"}
    assert docs[4].fields["options"] == {"A": "circle", "B": "square"} and docs[4].fields["hint"].startswith(
        "The"
    )
    assert docs[0].fields["hint"] == ""  # "nan" cells are absent hints
    assert {d.fields["question_index"] for d in docs} == {0, 1}
    assert docs[0].load_image().size == (8, 8)
    assert len(read("mmbench_en_dev", reader_args={"circular": False})) == 2


# ------------------------------------------------------------------------------------------------------ bad input
def _copy(tmp_path: Path, bench: str) -> Path:
    shutil.copytree(FIXTURES / bench, tmp_path / bench)
    return tmp_path


def test_missing_root_names_the_env_vars():
    with pytest.raises(FileNotFoundError, match="MMZOO_VQAV2.*MMZOO_DATA"):
        resolve_files(get_task("vqav2_val"))


def test_root_from_per_task_env_and_mapping(monkeypatch):
    monkeypatch.setenv("MMZOO_POPE", str(FIXTURES / "pope"))
    assert resolve_files(get_task("pope_random"))["questions"].name == "coco_pope_random.json"
    files = resolve_files(get_task("vqav2_val"), data_roots={"vqav2": FIXTURES / "vqav2"})
    assert files["images"].is_dir()


def test_missing_file_is_named(tmp_path):
    root = _copy(tmp_path, "vqav2")
    (root / "vqav2/v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match="annotations file .*v2_mscoco_val2014_annotations.json"):
        read("vqav2_val", root)


def test_malformed_question_names_record_and_field(tmp_path):
    root = _copy(tmp_path, "vqav2")
    path = root / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(path.read_text())
    del data["questions"][1]["question"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"questions\[1\]: missing field 'question'"):
        read("vqav2_val", root)


def test_wrong_type_names_field(tmp_path):
    root = _copy(tmp_path, "vqav2")
    path = root / "vqav2/v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"][2]["answers"] = "yes"
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"annotations\[2\] \(question_id 73000\): field 'answers' should be list"
    ):
        read("vqav2_val", root)


def test_invalid_json_names_position(tmp_path):
    root = _copy(tmp_path, "gqa")
    (root / "gqa/testdev_balanced_questions.json").write_text('{"1": {"question": ')
    with pytest.raises(ValueError, match="testdev_balanced_questions.json: not valid JSON at line 1"):
        read("gqa_testdev_balanced", root)


def test_pope_bad_label_names_line(tmp_path):
    root = _copy(tmp_path, "pope")
    path = root / "pope/coco_pope_random.json"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"no"', '"maybe"')
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"coco_pope_random.json:2: field 'label' should be 'yes' or 'no'"):
        read("pope_random", root)


def test_mmbench_bad_answer_names_row(tmp_path):
    root = _copy(tmp_path, "mmbench")
    path = root / "mmbench/mmbench_dev_20230712.tsv"
    path.write_text(path.read_text().replace("\tB\timage_topic", "\tC\timage_topic"))
    with pytest.raises(ValueError, match=r"tsv:3 \(index 1\): field 'answer' = 'C' is not one of the 2"):
        read("mmbench_en_dev", root)


def test_mme_bad_txt_names_file(tmp_path):
    root = _copy(tmp_path, "mme")
    txt = root / "mme/MME_Benchmark_release_version/existence/000000006040.txt"
    txt.write_text(txt.read_text() + "Is there a cat?\tNo\n")
    with pytest.raises(ValueError, match="000000006040.txt: expected 2 lines"):
        read("mme", root, reader_args={"subtasks": MME_SUBTASKS})
    with pytest.raises(FileNotFoundError, match="subtask folder .*/OCR"):
        read("mme", root, reader_args={"subtasks": ["OCR"]})


def test_scienceqa_split_lists_unknown_problem(tmp_path):
    root = _copy(tmp_path, "scienceqa")
    (root / "scienceqa/pid_splits.json").write_text(json.dumps({"test": ["10", "999"]}))
    with pytest.raises(ValueError, match="lists problem '999'"):
        read("scienceqa_img", root)


def test_missing_image_names_file_and_record(tmp_path):
    root = _copy(tmp_path, "pope")
    (root / "pope/val2014/COCO_val2014_000000210789.jpg").unlink()
    docs = read("pope_random", root)
    docs[0].load_image()
    with pytest.raises(
        FileNotFoundError, match=r"coco_pope_random.json:3: image file .*210789.jpg does not exist"
    ):
        docs[2].load_image()


def test_task_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nreader: pope\nscorer: pope\nprompt_template: oops\n")
    with pytest.raises(
        ValueError, match=r"bad.yaml: unknown key\(s\) \['prompt_template'\]; allowed: .*post_prompt"
    ):
        load_task_yaml(bad)
    bad.write_text("include: _missing.yaml\nname: x\n")
    with pytest.raises(FileNotFoundError, match="_missing.yaml does not exist"):
        load_task_yaml(bad)
    bad.write_text("name: x\nreader: pope\n")
    with pytest.raises(ValueError, match="missing required key 'scorer'"):
        load_task_yaml(bad)


def test_include_merges_template():
    spec = get_task("pope_adversarial")
    assert (spec.group, spec.scorer, spec.split) == ("pope", "pope", "adversarial")
    assert spec.generation == {"max_new_tokens": 16, "do_sample": False}


def test_mmbench_bad_image_names_row(tmp_path):
    root = _copy(tmp_path, "mmbench")
    path = root / "mmbench/mmbench_dev_20230712.tsv"
    lines = path.read_text().splitlines()
    cells = lines[2].split("\t")
    cells[9] = "not*base64!"  # the image column
    lines[2] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tsv:3 \(index 1\): field 'image' is not valid base64"):
        read("mmbench_en_dev", root)
