"""Every registered weight, in one table: the demo weights shipped under ``zoo/weights/`` and the official releases.

``zoo.registry`` imports this module on first use (``zoo list --pretrained``, ``zoo.load(name)``), so each name
below resolves in a fresh interpreter without importing ``eval`` or a family module first. A shipped entry records
the sha256 of its ``model.safetensors``; ``zoo.load`` refuses a file whose hash differs (re-shipping weights means
updating the hash here). Official releases carry a hub id: ``zoo.load(name)`` fetches one through huggingface_hub
and converts it on first use (``zoo.registry.fetch_official``); a release fetched by hand loads with
``zoo.load(<its directory or .pt>)`` or converts with ``zoo convert auto SRC OUT``.

``moe_llava_tiny.shapes``: the tiny recipe's stage-III (MoE) model, float16 (``zoo.load`` rebuilds it in float32).
``metrics`` holds the run's own evaluation (first 1000 documents per task, in percent) and, under ``demo64/``, what
the shipped file scores on the first 64 documents per task, which ``tests/moe_llava/test_demo_weights.py`` checks.
Made with ``recipes/moe_llava/ship_demo.py``.

``clip_vit_tiny4.shapes``: the tiny MoE-LLaVA's vision tower, the whole CLIP (image and text towers) of
``recipes/clip/shapes_tiny4_patch.yaml``, float16; the tiny MoE-LLaVA recipe starts stage I from it, as MoE-LLaVA
starts from a released CLIP. ``metrics``: zero-shot accuracy of the run (600 single-object test scenes) and, under
``demo200/``, of the shipped file on the first 200, which ``tests/clip/test_tower_weights.py`` checks. Made with
``recipes/clip/ship_tower.py``.

``uni_moe_tiny.shapes_av``: stage 3 (moe) of ``recipes/uni_moe/shapes_av_tiny.yaml``, float16; ``metrics`` holds the
run's own evaluation (first 200 documents per task) and, under ``demo32/``, what the shipped file scores on the first
32 documents per task, which ``tests/uni_moe/test_demo_weights.py`` checks. Made with ``recipes/uni_moe/ship_demo.py``.

``dit_moe_tiny.digits``: EMA weights; scores from 100 samples per class, 25 Euler steps, cfg 1.5, seed 0, 1 CPU
thread; FID-digits / KID / IS in the shipped digit classifier's feature space against all 1797 real digits
(re-checked by ``tests/dit/test_weights.py``).

``digit_cnn.digits``: the FID-digits feature network and class-accuracy judge; its held-out accuracy is re-checked
by ``tests/generation/test_digit_classifier.py``.
"""

from __future__ import annotations

from zoo.registry import WeightsCfg, register_weights

__all__ = ["CLIP_VIT_TINY4_SHAPES", "MOE_LLAVA_TINY_SHAPES", "UNI_MOE_TINY_SHAPES_AV", "DIT_MOE_TINY_DIGITS", "DIGIT_CNN_DIGITS", "SHIPPED", "OFFICIAL"]

MOE_LLAVA_TINY_SHAPES = WeightsCfg(
    file="moe_llava_tiny.shapes",
    sha256="ffc4f726d2e89278f9faef0155d44ca483af579162c6d082ea8444df74c957fa",
    recipe="recipes/moe_llava/shapes_tiny.yaml@929650dab0ccb8d9c344629f1e1dc149cbd5a2b1",
    metrics={
        'params_total_M': 2.5013,
        'params_active_M': 1.9744,
        'shapes_vqa/accuracy': 92.9,
        'shapes_pope_adversarial/f1': 95.26,
        'shapes_pope_popular/f1': 97.51,
        'shapes_pope_random/f1': 96.67,
        'shapes_pope/f1': 96.48,
        'demo64/shapes_vqa/accuracy': 96.875,
        'demo64/shapes_pope_adversarial/f1': 93.75,
        'demo64/shapes_pope_popular/f1': 96.774194,
        'demo64/shapes_pope_random/f1': 95.238095,
        'demo64/shapes_pope/f1': 95.254096,
    },
    license="apache-2.0",
    notes=(
        "stage III (moe) of `make train` on a fresh clone of this commit, idle 2-core machine (align 66 s, sft 686 s, "
        "moe 57 s; 15:29 in all, install included); the dense stage-II model of the same run scored ShapesVQA 92.8, "
        "POPE F1 96.5 (first 1000 documents per task)"
    ),
)
CLIP_VIT_TINY4_SHAPES = WeightsCfg(
    file="clip_vit_tiny4.shapes",
    sha256="cba020bff229c0614aaa096ceeab572ec6d21ca4d2d5c4bbaa7500ca5c3b797c",
    recipe="recipes/clip/shapes_tiny4_patch.yaml@cb07fb78635912c4f20f8edf8240481fc8974a1d",
    metrics={
        "zeroshot_acc": 95.333332,
        "color_acc": 100.0,
        "shape_acc": 95.333333,
        "demo200/zeroshot_acc": 94.0,
        "demo200/color_acc": 100.0,
        "demo200/shape_acc": 94.0,
    },
    license="apache-2.0",
    notes=(
        "stage clip of recipes/moe_llava/shapes_tiny.yaml at that commit, the settings of shapes_tiny4_patch.yaml "
        "(1000 steps x 64, 420 s on the 2-core machine partly shared with a test run); 4.1M parameters, 0.84M of "
        "them the image tower"
    ),
)

UNI_MOE_TINY_SHAPES_AV = WeightsCfg(
    file="uni_moe_tiny.shapes_av",
    sha256="e0a934be6db477880972a081bc87d5000a117a8981892da107afb9b481912917",
    recipe="recipes/uni_moe/shapes_av_tiny.yaml@53d1bf1f9c25a0858fe34182bb21cf324ecb314d",
    metrics={
        'params_total_M': 3.6457,
        'params_active_M': 2.5101,
        'shapes_vqa/accuracy': 81.0,
        'shapes_video_qa/accuracy': 35.0,
        'shapes_audio_qa/accuracy': 60.0,
        'shapes_speech_vqa/accuracy': 39.0,
        'demo32/shapes_vqa/accuracy': 93.75,
        'demo32/shapes_video_qa/accuracy': 37.5,
        'demo32/shapes_audio_qa/accuracy': 71.875,
        'demo32/shapes_speech_vqa/accuracy': 46.875,
        'demo32/shapes_av/accuracy': 52.083333,
    },
    license="apache-2.0",
    notes=(
        "stage 3 (moe) of the recipe on a shared 2-core machine (894 s CPU for all seven stages, 33:39 wall); below "
        "the recipe's 80% target on video, sound and spoken questions (recipes/uni_moe/README.md); the recipe's "
        "dense baseline scored 76.5 / 35.0 / 52.5 / 40.0 on the same documents"
    ),
)

DIT_MOE_TINY_DIGITS = WeightsCfg(
    file="dit_moe_tiny.digits",
    sha256="cef5747bdf89294776f4d44d511993ae73882154a49edf2ab57629f569367c03",
    recipe="recipes/dit_moe/digits_tiny.yaml@0a5bf7d",
    metrics={"fid_digits": 0.6539, "kid_digits": 0.0562, "is_digits": 9.0645, "class_acc": 97.8, "val_loss": 0.1454},
    license="Apache-2.0 (weights); data: scikit-learn digits (BSD-3, UCI optdigits)",
    notes="pixel-space 16x16 digits, rectified flow; 628K params, 333K activated",
)

DIGIT_CNN_DIGITS = WeightsCfg(
    file="digit_cnn.digits",
    sha256="b4ff269d2c8814a4b8c057f276a6be6d7377ba1a6225c0f1b774623634a23bc6",
    recipe="eval/generation/train_digit_classifier.py",
    # the same numbers as the metrics block of its config.json, written by the training script
    metrics={"heldout_acc": 99.16434540389972, "train_acc": 100.0, "n_train": 1438.0, "n_heldout": 359.0},
    license="Apache-2.0 (weights); data: scikit-learn digits (BSD-3, UCI optdigits)",
    notes="feature network for FID-digits and the class-accuracy judge of the digits generators",
)

# "arch.tag" -> shipped weights under zoo/weights/<file>/
SHIPPED: dict[str, WeightsCfg] = {
    "clip_vit_tiny4.shapes": CLIP_VIT_TINY4_SHAPES,
    "moe_llava_tiny.shapes": MOE_LLAVA_TINY_SHAPES,
    "uni_moe_tiny.shapes_av": UNI_MOE_TINY_SHAPES_AV,
    "dit_moe_tiny.digits": DIT_MOE_TINY_DIGITS,
    "digit_cnn.digits": DIGIT_CNN_DIGITS,
}

_MOE_LLAVA_NOTES = "official release (DeepSpeed MoE layout); convert with `zoo convert moe-llava DIR OUT`"
_DIT_MOE_NOTES = "official release; convert with `zoo convert dit ARCH FILE.pt OUT` (or `zoo convert auto`)"

# "arch.official" -> hub releases. DiT-XL/2's own .pt files are at dl.fbaipublicfiles.com/DiT/models/.
OFFICIAL: dict[str, WeightsCfg] = {
    "moe_llava_stablelm_4e.official": WeightsCfg(
        hf_hub_id="LanguageBind/MoE-LLaVA-StableLM-1.6B-4e", license="apache-2.0", notes=_MOE_LLAVA_NOTES
    ),
    "moe_llava_qwen_4e.official": WeightsCfg(
        hf_hub_id="LanguageBind/MoE-LLaVA-Qwen-1.8B-4e", license="apache-2.0", notes=_MOE_LLAVA_NOTES
    ),
    "moe_llava_phi2_4e.official": WeightsCfg(
        hf_hub_id="LanguageBind/MoE-LLaVA-Phi2-2.7B-4e", license="apache-2.0", notes=_MOE_LLAVA_NOTES
    ),
    "moe_llava_stablelm_4e_384.official": WeightsCfg(
        hf_hub_id="LanguageBind/MoE-LLaVA-StableLM-1.6B-4e-384", license="apache-2.0", notes=_MOE_LLAVA_NOTES
    ),
    "moe_llava_phi2_4e_384.official": WeightsCfg(
        hf_hub_id="LanguageBind/MoE-LLaVA-Phi2-2.7B-4e-384", license="apache-2.0", notes=_MOE_LLAVA_NOTES
    ),
    "dit_moe_s_2_8e2a.official": WeightsCfg(
        hf_hub_id="feizhengcong/DiT-MoE", filename="dit_moe_s_8E2A.pt", license="Apache-2.0", notes=_DIT_MOE_NOTES
    ),
    "dit_moe_b_2_8e2a.official": WeightsCfg(
        hf_hub_id="feizhengcong/DiT-MoE", filename="dit_moe_b_8E2A.pt", license="Apache-2.0", notes=_DIT_MOE_NOTES
    ),
    "dit_moe_xl_2_8e2a.official": WeightsCfg(
        hf_hub_id="feizhengcong/DiT-MoE", filename="dit_moe_xl_8E2A.pt", license="Apache-2.0", notes=_DIT_MOE_NOTES
    ),
    "dit_moe_g_2_16e2a.official": WeightsCfg(
        hf_hub_id="feizhengcong/DiT-MoE", filename="dit_moe_g_16E2A.pt", license="Apache-2.0", notes=_DIT_MOE_NOTES
    ),
}

for _name, _cfg in {**SHIPPED, **OFFICIAL}.items():
    register_weights(*_name.split("."), _cfg)
