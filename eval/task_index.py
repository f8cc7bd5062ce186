"""The names, groups and descriptions of the registered benchmark tasks, written out so that `zoo eval --list`,
`zoo list --tasks` and a misspelt `--tasks` answer without importing torch, the readers or any model (the full task
registry imports them: seconds; this file: milliseconds).

Generated from the live registry by ``python -m eval.task_index``; tests/test_model_index.py fails, naming that
command, when a task is added or dropped without regenerating it. ``eval.registry`` stays the authority.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["TASKS", "GROUPS", "render"]

# task name -> (group, description)
TASKS: dict[str, tuple[str, str]] = {
    'activitynet_qa': ('video_qa', 'ActivityNet-QA test, official raw exact match per type; GPT-style judge pluggable, off'),
    'audiocaps_test': ('audio_captioning', 'AudioCaps test captions, BLEU-1..4 / ROUGE-L / CIDEr-D (pycocoevalcap)'),
    'clotho_aqa_test_all': ('clotho_aqa', 'ClothoAQA test, all annotator answers, lmms-eval exact match (yes/no and single-word)'),
    'clotho_aqa_test_majority': ('clotho_aqa', 'ClothoAQA test, majority answers, lmms-eval exact match (yes/no and single-word)'),
    'clotho_v2_eval': ('audio_captioning', 'Clotho v2 evaluation captions, BLEU-1..4 / ROUGE-L / CIDEr-D (pycocoevalcap)'),
    'digits_gen': ('generation', "class-conditional digits (16x16): FID/KID/IS in the shipped digit classifier's feature space against all 1797 sklearn digits, share of samples classified as their class; routing heatmaps for MoE"),
    'english_listening': ('speech_mcq', 'English high-school listening MCQ (Uni-MoE JSON), letter extraction, accuracy'),
    'gqa_testdev_balanced': ('gqa', 'GQA testdev balanced questions, exact match (LLaVA convert_gqa_for_eval + GQA eval.py accuracy)'),
    'mmbench_audio': ('speech_mcq', 'spoken-question MCQ about an image (Uni-MoE JSON), MMBench letter extraction, accuracy'),
    'mmbench_en_dev': ('mmbench', 'MMBench-EN dev, circular evaluation (rotated options), rule-based answer extraction'),
    'mme': ('mme', 'MME perception (10 subtasks) and cognition (4), acc + acc+ per subtask'),
    'msvd_qa': ('video_qa', 'MSVD-QA test, exact match after lower-casing (the classification-era protocol); judge off'),
    'png_val': ('refseg_png', 'Panoptic Narrative Grounding (val2017), average recall'),
    'pope_adversarial': ('pope', 'POPE adversarial split (coco_pope_adversarial.json over COCO val2014), POPE/LLaVA yes-no parsing'),
    'pope_popular': ('pope', 'POPE popular split (coco_pope_popular.json over COCO val2014), POPE/LLaVA yes-no parsing'),
    'pope_random': ('pope', 'POPE random split (coco_pope_random.json over COCO val2014), POPE/LLaVA yes-no parsing'),
    'refcoco_parquet': ('refseg_parquet', 'RefCOCO-family parquet (harness layout), referring segmentation'),
    'refcoco_testa': ('refseg_refcoco', 'refcoco testA split, referring segmentation (cIoU, mIoU)'),
    'refcoco_testb': ('refseg_refcoco', 'refcoco testB split, referring segmentation (cIoU, mIoU)'),
    'refcoco_val': ('refseg_refcoco', 'refcoco val split, referring segmentation (cIoU, mIoU)'),
    'refcocog_test': ('refseg_refcoco', 'refcocog test split, referring segmentation (cIoU, mIoU)'),
    'refcocog_val': ('refseg_refcoco', 'refcocog val split, referring segmentation (cIoU, mIoU)'),
    'refcocoplus_testa': ('refseg_refcoco', 'refcoco+ testA split, referring segmentation (cIoU, mIoU)'),
    'refcocoplus_testb': ('refseg_refcoco', 'refcoco+ testB split, referring segmentation (cIoU, mIoU)'),
    'refcocoplus_val': ('refseg_refcoco', 'refcoco+ val split, referring segmentation (cIoU, mIoU)'),
    'scienceqa_img': ('scienceqa', 'ScienceQA test, image subset (IMG-Accuracy), LLaVA letter extraction'),
    'shapes_audio_qa': ('shapes_av', 'synthetic ShapesAudioQA (order, existence, count of sounds), accuracy per kind'),
    'shapes_pope_adversarial': ('shapes_pope', 'synthetic ShapesPOPE, adversarial negatives (test split), POPE parser and metrics'),
    'shapes_pope_popular': ('shapes_pope', 'synthetic ShapesPOPE, popular negatives (test split), POPE parser and metrics'),
    'shapes_pope_random': ('shapes_pope', 'synthetic ShapesPOPE, random negatives (test split), POPE parser and metrics'),
    'shapes_refseg': ('refseg', 'synthetic referring segmentation (test split; attribute, position and relation expressions)'),
    'shapes_speech_vqa': ('shapes_av', 'synthetic ShapesVQA with the question spoken instead of written, accuracy per kind'),
    'shapes_video_qa': ('shapes_av', 'synthetic ShapesVideoQA (motion, appear/leave, order, colour change, counts), accuracy per kind'),
    'shapes_vqa': ('shapes', 'synthetic ShapesVQA (test split), VQA accuracy with the single ground truth repeated 10x'),
    'textvqa_val': ('textvqa', 'TextVQA 0.5.1 val, OCR tokens in the prompt, MMF soft VQA accuracy'),
    'vizwiz_val': ('vizwiz', 'VizWiz-VQA val (Annotations/val.json), unanswerable as an ordinary answer'),
    'vqav2_val': ('vqav2', "VQAv2 val2014 (official questions + annotations JSON), VQA accuracy after LLaVA's answer processor"),
}

# group name -> its tasks (a group name is accepted wherever a task name is)
GROUPS: dict[str, list[str]] = {}
for _task, (_group, _) in TASKS.items():
    if _group:
        GROUPS.setdefault(_group, []).append(_task)


def render() -> str:
    """This file's text with TASKS taken from the live registry."""
    from eval.registry import get_task, list_tasks

    rows = "".join(f"    {n!r}: ({get_task(n).group or ''!r}, {get_task(n).description!r}),\n" for n in list_tasks())
    text = Path(__file__).read_text()
    head, rest = text.split("TASKS: dict[str, tuple[str, str]] = {\n", 1)
    return head + "TASKS: dict[str, tuple[str, str]] = {\n" + rows + rest[rest.index("}\n"):]


if __name__ == "__main__":
    Path(__file__).write_text(render())
    print(f"wrote {Path(__file__)}", file=sys.stderr)
