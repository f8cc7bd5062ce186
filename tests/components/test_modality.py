"""Modalities: placeholder expansion, embedding placement and masks for images plus a second (toy audio) modality.

The toy audio modality is added the way a family such as Uni-MoE adds video, audio or speech: a subclass registers
its encoder as a submodule and declares the modality; prompt encoding, ``embed_multimodal``, ``media_mask`` and
``forward`` then handle it without any audio-specific code in the LLaVA family.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zoo.components.modality import (
    Modality,
    PlaceholderSpec,
    check_distinct,
    count_placeholders,
    expand_placeholders,
    split_placeholders,
)
from zoo.models.moe_llava import MoELLaVA
from zoo.registry import create_model

CLIP_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=8,
)
LM = dict(
    model_type="phi",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    partial_rotary_factor=0.5,
    max_position_embeddings=256,
)
AUDIO_ID = -300  # outside the vocabulary, like official MoE-LLaVA's -200 for images
AUDIO_TOKENS = 3
AUDIO_SAMPLES = 12


class AudioLLaVA(MoELLaVA):
    """The tiny LLaVA plus a toy audio encoder: a waveform of 12 samples -> 3 tokens of 4 samples, projected."""

    def __init__(self, base: MoELLaVA) -> None:
        super().__init__(base.cfg)
        self.load_state_dict(base.state_dict())
        self.audio_proj = nn.Linear(AUDIO_SAMPLES // AUDIO_TOKENS, self.llm.hidden_size)
        self.add_modality(
            Modality(
                name="audio",
                placeholder="<audio>",
                token_id=AUDIO_ID,
                tokens_per_item=AUDIO_TOKENS,
                input_key="audio_values",
                prepare=lambda wave: torch.as_tensor(wave, dtype=torch.float32).reshape(AUDIO_SAMPLES),
                encode=self.encode_audio,
            )
        )

    def encode_audio(self, waves: torch.Tensor) -> torch.Tensor:
        return self.audio_proj(waves.reshape(waves.shape[0], AUDIO_TOKENS, -1))


@pytest.fixture(scope="module")
def model() -> AudioLLaVA:
    torch.manual_seed(0)
    base = create_model("moe_llava_tiny", vision=dict(kind="hf", config=CLIP_VISION), lm=LM).eval()
    return AudioLLaVA(base).eval()


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))


def _text_ids(model: MoELLaVA, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False).input_ids


IMG = PlaceholderSpec(name="image", placeholder="<image>", token_id=7, tokens_per_item=2)
AUD = PlaceholderSpec(name="audio", placeholder="<audio>", token_id=9, tokens_per_item=3)


def test_split_expand_and_count_placeholders_of_several_modalities():
    text = "<image>\nhear <audio> and <audio>?"
    assert split_placeholders(text, [IMG, AUD]) == [IMG, "\nhear ", AUD, " and ", AUD, "?"]
    assert count_placeholders(text, [IMG, AUD]) == {"image": 1, "audio": 2}
    assert count_placeholders("plain", [IMG, AUD]) == {"image": 0, "audio": 0}
    ids, is_media = expand_placeholders(text, [IMG, AUD], lambda piece: [len(piece)])  # one fake id per piece
    assert ids == [7, 7, 6, 9, 9, 9, 5, 9, 9, 9, 1]
    assert is_media == [True, True, False, True, True, True, False, True, True, True, False]
    # A modality that is not declared is plain text.
    assert expand_placeholders("<audio>", [IMG], lambda piece: [len(piece)]) == ([7], [False])


def test_modalities_must_be_distinguishable():
    with pytest.raises(ValueError, match="share the token_id"):
        check_distinct([IMG, PlaceholderSpec(name="audio", placeholder="<audio>", token_id=7, tokens_per_item=1)])
    with pytest.raises(ValueError, match="share the name"):
        check_distinct([IMG, PlaceholderSpec(name="image", placeholder="<img2>", token_id=8, tokens_per_item=1)])
    with pytest.raises(ValueError, match="is part of"):
        check_distinct([IMG, PlaceholderSpec(name="x", placeholder="<image>x", token_id=8, tokens_per_item=1)])
    with pytest.raises(ValueError, match="tokens_per_item must be >= 1"):
        PlaceholderSpec(name="x", placeholder="<x>", token_id=1, tokens_per_item=0)


def test_the_family_declares_its_image_modality(model):
    image = model.modalities["image"]
    assert list(model.modalities) == ["image", "audio"]
    assert image.placeholder == "<image>" and image.input_key == "pixel_values"
    assert image.token_id == model.image_token_id == model.tokenizer.convert_tokens_to_ids("<image>")
    assert image.tokens_per_item == model.num_image_tokens == 4
    with pytest.raises(ValueError, match="share the placeholder"):
        model.add_modality(
            Modality(name="speech", placeholder="<audio>", token_id=-301, tokens_per_item=1, input_key="speech",
                     prepare=torch.as_tensor, encode=model.encode_audio)  # fmt: skip
        )


def test_prompt_expansion_places_every_modality_in_order(model):
    waves = [torch.arange(12.0), torch.arange(12.0) * -1, torch.ones(12)]
    prompts = ["what is heard ?", "<audio> then <audio> : same ?", "describe a red star ."]
    batch = model.build_generation_inputs(
        [_image(0), None, None], prompts, apply_template=False, media={"audio": [waves[0], waves[1:], None]}
    )
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "audio_values"}
    n_img = model.num_image_tokens
    nl = _text_ids(model, "\n")
    # Row 0: no placeholders in the prompt, so one per item goes in front, image before audio (declaration order).
    row0 = [model.image_token_id] * n_img + nl + [AUDIO_ID] * AUDIO_TOKENS + nl + _text_ids(model, prompts[0])
    row1 = (
        [AUDIO_ID] * AUDIO_TOKENS + _text_ids(model, " then ") + [AUDIO_ID] * AUDIO_TOKENS
        + _text_ids(model, " : same ?")
    )  # fmt: skip
    row2 = _text_ids(model, prompts[2])
    width = max(map(len, (row0, row1, row2)))
    for b, row in enumerate((row0, row1, row2)):  # left padding
        assert batch["input_ids"][b, width - len(row) :].tolist() == row
        assert batch["attention_mask"][b].tolist() == [0] * (width - len(row)) + [1] * len(row)
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    assert torch.equal(batch["audio_values"], torch.stack(waves))  # items in order of appearance

    # A batch without audio has no audio tensor at all (no dummy), and images alone are as before.
    images_only = model.build_generation_inputs([_image(0)], ["q ?"], apply_template=False)
    assert images_only["audio_values"] is None and images_only["pixel_values"].shape[0] == 1
    assert not (images_only["input_ids"] == AUDIO_ID).any()


def test_embedding_placement_and_masks(model):
    waves = [torch.randn(12), torch.randn(12)]
    batch = model.build_generation_inputs(
        [None, _image(1), None], ["<audio> ?", "is it red ?", "two <audio> <audio>"],
        media={"audio": [waves[0], None, waves]},
    )  # fmt: skip
    ids = batch["input_ids"]
    audio = ids == AUDIO_ID
    image = ids == model.image_token_id
    assert audio.sum(1).tolist() == [3, 0, 6] and image.sum(1).tolist() == [0, 4, 0]
    assert torch.equal(model.media_mask(ids), audio | image)
    assert torch.equal(model.image_mask(ids), image)
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, batch["pixel_values"], audio_values=batch["audio_values"])
        audio_feats = model.encode_audio(torch.stack([waves[0], *waves]))  # [3 items, 3 tokens, D]
        image_feats = model.encode_images(batch["pixel_values"])
        text = model.llm.embed(ids.masked_fill(audio | image, 0))
    assert torch.equal(embeds[audio], audio_feats.reshape(-1, audio_feats.shape[-1]))
    assert torch.equal(embeds[image], image_feats.reshape(-1, image_feats.shape[-1]))
    assert torch.equal(embeds[~(audio | image)], text[~(audio | image)])

    # forward carries the audio too (and is differentiable through the audio encoder).
    loss, logits, _ = model(
        ids, batch["attention_mask"], batch["pixel_values"], labels=ids.masked_fill(audio | image, -100),
        audio_values=batch["audio_values"],
    )  # fmt: skip
    loss.backward()
    assert logits.shape[:2] == ids.shape and model.audio_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_media_errors_name_the_modality(model):
    with pytest.raises(ValueError, match=r"prompt 0 has 2 <audio> placeholder\(s\) but 1 audio\(s\)"):
        model.build_generation_inputs([None], ["<audio> <audio>"], media={"audio": [torch.zeros(12)]})
    with pytest.raises(ValueError, match=r"no modality \['video'\]; it reads \['image', 'audio'\]"):
        model.build_generation_inputs([None], ["q"], media={"video": [torch.zeros(2)]})
    with pytest.raises(ValueError, match="both as the images argument and as media"):
        model.build_generation_inputs([_image(0)], ["q"], media={"image": [_image(1)]})
    with pytest.raises(ValueError, match="2 audio entries for 1 prompts"):
        model.build_generation_inputs([None], ["q"], media={"audio": [None, None]})
    ids = model.build_generation_inputs([None], ["<audio>"], media={"audio": [torch.zeros(12)]})["input_ids"]
    with pytest.raises(ValueError, match=r"3 audio tokens .* but audio_values has 0 audio"):
        model.embed_multimodal(ids)
    with pytest.raises(TypeError, match=r"unexpected media input\(s\) \['video_values'\]"):
        model.embed_multimodal(ids, audio_values=torch.zeros(1, 12), video_values=torch.zeros(1, 2))
    # media['image'] is the same as the images argument.
    a = model.build_generation_inputs(None, ["q"], media={"image": [_image(2)]})
    b = model.build_generation_inputs([_image(2)], ["q"])
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "pixel_values"))


def test_a_model_without_an_image_id_runs_on_text_only():
    torch.manual_seed(0)
    model = create_model("moe_llava_tiny", vision=dict(kind="hf", config=CLIP_VISION), lm=LM, tokenizer=None)
    ids = torch.tensor([[5, 6, 7]])
    assert model.modalities == {} and not model.media_mask(ids).any()
    with torch.no_grad():
        assert torch.equal(model.embed_multimodal(ids), model.llm.embed(ids))
    with pytest.raises(ValueError, match="neither image_token_id nor a tokenizer"):
        model.embed_multimodal(ids, torch.zeros(1, 3, 16, 16))
