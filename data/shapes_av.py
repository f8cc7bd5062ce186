"""The synthetic worlds (shapes scenes, videos, sounds, spoken questions) as Uni-MoE training samples.

Four modalities, each with a caption kind (stage 1, cross-modality alignment) and an instruction kind (stages 2
and 3), phrased exactly as the evaluation tasks ``shapes_vqa`` / ``shapes_video_qa`` / ``shapes_audio_qa`` /
``shapes_speech_vqa`` ask (so a model trained here is scored on the prompts it learnt):

=========  ==========================================================  =============================================
modality   caption (stage 1)                                           instruction (stages 2, 3)
=========  ==========================================================  =============================================
image      ``<image>`` "Describe the image briefly." -> scene caption   ``<image>`` question + short-answer prompt
video      ``<video>`` "Describe what happens in the video." -> caption ``<video>`` question + short-answer prompt
audio      ``<audio>`` "Generate audio caption." -> clip caption        ``<audio>`` question + short-answer prompt
speech     ``<audio>`` "Transcribe the speech." -> the spoken words     ``<image>`` ``<audio>`` spoken question
=========  ==========================================================  =============================================

Sounds and speech both use the ``<audio>`` placeholder: Uni-MoE's speech models read every voice file through the
Whisper path. Sample ``i`` is a pure function of ``i`` (train split, modality ``modalities[i % M]``, item
``i // M``), so the stream resumes exactly. ``av_tokenizer`` builds the word-level vocabulary from the same texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from data.audio import AudioConfig, AudioWorld
from data.shapes import ShapesWorld, WorldConfig
from data.speech import speak
from data.unimoe import SHORT_ANSWER, UniMoESample
from data.video import VideoConfig, VideoWorld

__all__ = ["AV_MODALITIES", "AVWorlds", "CAPTION_PROMPTS", "QUESTIONS_PER_ITEM", "SPOKEN_ANSWER", "av_tokenizer"]

AV_MODALITIES: tuple[str, ...] = ("image", "video", "audio", "speech")
CAPTION_PROMPTS = {
    "image": "<image>\nDescribe the image briefly.",
    "video": "<video>\nDescribe what happens in the video.",
    "audio": "<audio>\nGenerate audio caption.",
    "speech": "<audio>\nTranscribe the speech.",
}
# The text part of shapes_speech_vqa's prompt (eval/tasks/shapes_av/shapes_speech_vqa.yaml).
SPOKEN_ANSWER = "Answer the spoken question using a single word or phrase."
# Questions taken from each scene / clip: scenes have 5-6 (one per kind first), videos 2-6, sound clips 2-4.
QUESTIONS_PER_ITEM = {"image": 5, "speech": 5, "video": 4, "audio": 4}


@dataclass(frozen=True, kw_only=True)
class AVWorlds:
    """The three worlds, configured as the eval tasks configure their test splits (same sizes, frames, noise)."""

    image_size: int = 64
    num_frames: int = 8
    seed: int = 0
    snr_db: float = 10.0

    @cached_property
    def shapes_world(self) -> ShapesWorld:
        return ShapesWorld(WorldConfig(image_size=self.image_size, seed=self.seed))

    @cached_property
    def video_world(self) -> VideoWorld:
        return VideoWorld(VideoConfig(image_size=self.image_size, num_frames=self.num_frames, seed=self.seed))

    @cached_property
    def audio_world(self) -> AudioWorld:
        return AudioWorld(AudioConfig(seed=self.seed, snr_db=self.snr_db))

    def sample(self, modality: str, kind: str, index: int) -> UniMoESample:
        """Train-split item ``index`` of ``modality`` as a ``kind`` ("caption" / "instruction") sample.

        An instruction item is one question of a scene or clip: ``index`` walks ``QUESTIONS_PER_ITEM`` questions
        of item 0, then of item 1, ... (a clip with fewer questions repeats its first ones).
        """
        per_item = 1 if kind == "caption" else QUESTIONS_PER_ITEM[modality]
        if modality not in AV_MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; choose from {list(AV_MODALITIES)}")
        if kind not in ("caption", "instruction"):
            raise ValueError(f"unknown sample kind {kind!r}; choose 'caption' or 'instruction'")
        if modality in ("image", "speech"):
            scene = self.shapes_world.scene(index // per_item, "train")
            sid = f"{modality}_{kind}_{index}"
            if kind == "caption" and modality == "image":
                return UniMoESample(id=sid, conversations=_turns(CAPTION_PROMPTS["image"], scene.caption),
                                    image=scene.image, meta={"task": "image_caption"})
            qa = scene.vqa[index % (len(scene.vqa) if kind == "caption" else per_item) % len(scene.vqa)]
            if kind == "caption":  # speech: the spoken question and its transcript
                return UniMoESample(id=sid, conversations=_turns(CAPTION_PROMPTS["speech"], qa.question),
                                    voice=[speak(qa.question)], meta={"task": "speech_transcript"})
            if modality == "image":
                return UniMoESample(id=sid, conversations=_turns(f"<image>\n{qa.question}\n{SHORT_ANSWER}", qa.answer),
                                    image=scene.image, meta={"task": "image_vqa", "kind": qa.kind})
            return UniMoESample(id=sid, conversations=_turns(f"<image>\n<audio>\n{SPOKEN_ANSWER}", qa.answer),
                                image=scene.image, voice=[speak(qa.question)],
                                meta={"task": "speech_vqa", "kind": qa.kind, "transcript": qa.question})
        world = self.video_world if modality == "video" else self.audio_world
        clip = world.clip(index // per_item, "train")
        placeholder = "<video>" if modality == "video" else "<audio>"
        media = {"video": list(clip.frames)} if modality == "video" else {"voice": [clip.waveform]}
        sid = f"{modality}_{kind}_{index}"
        if kind == "caption":
            return UniMoESample(id=sid, conversations=_turns(CAPTION_PROMPTS[modality], clip.caption),
                                meta={"task": f"{modality}_caption"}, **media)
        qa = clip.qa[index % per_item % len(clip.qa)]
        return UniMoESample(id=sid, conversations=_turns(f"{placeholder}\n{qa.question}\n{SHORT_ANSWER}", qa.answer),
                            meta={"task": f"{modality}_qa", "kind": qa.kind}, **media)


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def av_tokenizer(worlds: AVWorlds, num_items: int, extra_texts: Sequence[str] = ()):
    """The word-level tokenizer over every word of ``num_items`` train scenes, video clips and sound clips
    (captions, questions, answers) and the prompts above: the tiny shapes vocabulary lacks the video and audio
    worlds' words (motion, events, sounds)."""
    from zoo.tokenizers import build_tokenizer

    texts: list[str] = [*CAPTION_PROMPTS.values(), SHORT_ANSWER, SPOKEN_ANSWER, *extra_texts]
    for scene in worlds.shapes_world.iter_scenes("train", num_items):
        texts.append(scene.caption)
        texts += [f"{qa.question} {qa.answer}" for qa in scene.vqa]
    for world in (worlds.video_world, worlds.audio_world):
        for clip in world.iter_clips("train", num_items):
            texts.append(clip.caption)
            texts += [f"{qa.question} {qa.answer}" for qa in clip.qa]
    return build_tokenizer(texts)
