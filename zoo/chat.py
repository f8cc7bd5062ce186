"""``zoo chat``: ask a multimodal model about an image, a video, a sound or speech.

    zoo chat --image scene.png "What color is the circle?"          # the shipped demo weights
    zoo chat --model runs/moe_llava_shapes_tiny/moe/final --image scene.png "How many objects are there?"
    zoo chat --scene test:3 "Is there a red star in the image?"    # a synthetic scene (saved with --save-image)
    zoo chat --image scene.png                                      # a conversation: one question per line
    zoo chat --scene test:3 --method none "What shape is red?"      # through a zoo.methods method
    zoo chat --model moe_llava_phi2_4e.official --image photo.jpg --device cuda --dtype bf16
    zoo chat --model uni_moe_tiny.shapes_av --audio clip.wav --short-answer "How many sounds are there?"
    zoo chat --model uni_moe_tiny.shapes_av --video frames/ --image scene.png --audio question.wav

The model is a weights name (`zoo list --pretrained`) or a checkpoint directory; its conversation template and
tokenizer come from its config. Greedy decoding unless --temperature > 0. Without a question on the command line,
questions are read one per line from stdin and form one conversation (each answer sees the earlier turns, as in
LLaVA's CLI); a line /reset starts a new conversation about the same image.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "answer"]

DEFAULT_MODEL = "moe_llava_tiny.shapes"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo chat",
        description="Answer questions about an image with a multimodal model (MoE-LLaVA family).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + __doc__.split("\n\n", 1)[1],
    )
    p.add_argument("question", nargs="*", help="the question (omit to read one question per line from stdin)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"weights name or checkpoint dir (default {DEFAULT_MODEL})")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", type=Path, help="image file (PNG, JPEG, ...)")
    src.add_argument("--scene", metavar="SPLIT:INDEX", help="a synthetic shapes-world scene, e.g. test:3")
    p.add_argument("--image-size", type=int, default=64,
                   help="synthetic scene size in px (with --scene). The world is drawn for its size: test:2 at 64 px "
                        "and test:2 at 128 px are different scenes (the demo model knows the 64 px world)")  # fmt: skip
    p.add_argument("--save-image", type=Path, help="write the synthetic scene to this file (with --scene)")
    p.add_argument("--audio", type=Path, help="16-kHz 16-bit PCM WAV file: speech or sound (models with an "
                                              "'audio' modality, e.g. Uni-MoE's Whisper path)")
    p.add_argument("--video", type=Path, help="folder of extracted frames (sorted by name; the model's number of "
                                              "frames is sampled from it; models with a 'video' modality)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default auto: cuda when there is one)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 / bf16, float16 / fp16 (default: the weights')")
    p.add_argument(
        "--method",
        metavar="NAME[:k=v,...]",
        help="answer through this zoo.methods method, e.g. none or var:p=0.6 (default: the plain model)",
    )
    p.add_argument(
        "--short-answer",
        action="store_true",
        help=f"append LLaVA-1.5's short-answer instruction ({SHORT_ANSWER!r}), as VQA benchmarks prompt; the tiny "
        "demo model was trained on such prompts and answers best with it",
    )
    return p


def _load_image(args: argparse.Namespace) -> Any:
    from PIL import Image, UnidentifiedImageError

    if args.image is None and args.scene is None:
        return None
    if args.image is not None:
        if not args.image.is_file():
            raise SystemExit(f"zoo chat: --image {args.image}: no such file")
        try:
            with Image.open(args.image) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise SystemExit(f"zoo chat: --image {args.image}: not a readable image ({e})") from None
    from data.shapes import SPLITS, ShapesWorld, WorldConfig

    split, _, index = args.scene.partition(":")
    if split not in SPLITS or not index.isdigit():
        raise SystemExit(f"zoo chat: --scene {args.scene!r}: expected SPLIT:INDEX with SPLIT in {SPLITS}, e.g. test:3")
    scene = ShapesWorld(WorldConfig(image_size=args.image_size)).scene(int(index), split=split)
    print(f"scene {scene.id}: {scene.caption}", file=sys.stderr)
    if args.save_image is not None:
        scene.image.save(args.save_image)
    return scene.image


SHORT_ANSWER = "Answer the question using a single word or phrase."


def answer(model: Any, image: Any, question: str, media: dict[str, Any] | None = None, **gen: Any) -> str:
    """One answer from ``model.generate`` for ``question`` about ``image`` and ``media`` (modality name -> one
    item: ``{"audio": waveform, "video": frames}``)."""
    if media:
        gen["media"] = {name: [item] for name, item in media.items()}
    return model.generate([image], [question], **gen)[0]


def _load_media(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """``--audio`` / ``--video`` as the model's modality items; a model without that modality is an error."""
    media: dict[str, Any] = {}
    modalities = getattr(model, "modalities", {})
    for name, path in (("video", args.video), ("audio", args.audio)):
        if path is None:
            continue
        if name not in modalities:
            raise SystemExit(f"zoo chat: --{name}: {args.model!r} ({type(model).__name__}) has no {name!r} "
                             f"modality (it reads {sorted(modalities) or ['image']})")
        if name == "audio":
            from data.speech import read_wav

            if not path.is_file():
                raise SystemExit(f"zoo chat: --audio {path}: no such file")
            try:
                media[name] = read_wav(path)
            except ValueError as e:
                raise SystemExit(f"zoo chat: --audio {path}: {e}") from None
        else:
            from eval.av import load_frames

            try:
                media[name] = load_frames(path, int(model.cfg.video_frames), "zoo chat --video")
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"zoo chat: {e}") from None
    return media


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import zoo
    import zoo.weights_table  # noqa: F401  (the demo weights' name; zoo.models imports it too)
    from zoo.methods import build_method

    gen: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.method is not None:
        try:  # before the model loads: a misspelt method or option costs nothing
            gen["method"] = build_method(args.method).spec()
        except (ValueError, TypeError) as e:
            print(f"zoo chat: --method {args.method}: {e}", file=sys.stderr)
            return 2
    if args.image is None and args.scene is None and args.audio is None and args.video is None:
        print("zoo chat: give at least one of --image, --scene, --audio, --video", file=sys.stderr)
        return 2
    image = _load_image(args)
    from tqdm.auto import tqdm

    load_kwargs: dict[str, Any] = {} if args.dtype is None else {"dtype": args.dtype}
    device = ("cuda" if torch.cuda.is_available() else None) if args.device == "auto" else args.device
    if device is not None:
        load_kwargs["device"] = device
    try:
        with tqdm(total=1, desc=f"loading {args.model}", unit="model", leave=False) as bar:
            model = zoo.load(args.model, **load_kwargs)
            bar.update(1)
    except (KeyError, FileNotFoundError, ValueError) as e:
        print(f"zoo chat: cannot load --model {args.model!r}: {e}", file=sys.stderr)
        return 2
    if not hasattr(model, "generate"):
        print(f"zoo chat: {args.model!r} ({type(model).__name__}) cannot generate text", file=sys.stderr)
        return 2
    if "method" in gen and "method" not in inspect.signature(model.generate).parameters:
        print(f"zoo chat: {args.model!r} ({type(model).__name__}) takes no --method", file=sys.stderr)
        return 2
    media = _load_media(args, model)
    if args.temperature > 0:
        gen.update(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                   generator=torch.Generator().manual_seed(args.seed))
    if args.question:
        q = " ".join(args.question)
        print(answer(model, image, f"{q}\n{SHORT_ANSWER}" if args.short_answer else q, media, **gen), flush=True)
        return 0
    conversation = Conversation(model)
    for line in sys.stdin:
        q = line.strip()
        if q == "/reset":
            conversation.reset()
            print("(new conversation)", file=sys.stderr, flush=True)
        elif q:
            print(conversation.ask(image, f"{q}\n{SHORT_ANSWER}" if args.short_answer else q, media, **gen),
                  flush=True)
    return 0


class Conversation:
    """Multi-turn chat about one image: every question is asked after the earlier turns, rendered with the
    model's conversation template (the image placeholder in the first question, as LLaVA's CLI does). A model
    without a template answers each question on its own."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.turns: list[Any] = []

    def reset(self) -> None:
        self.turns = []

    def ask(self, image: Any, question: str, media: dict[str, Any] | None = None, **gen: Any) -> str:
        template = getattr(self.model, "template", None)
        if template is None:
            return answer(self.model, image, question, media, **gen)
        from zoo.conversation import IMAGE_PLACEHOLDER, Turn

        media = media or {}
        lead = ""
        if not self.turns:  # the media's placeholders go in the first question, in the model's modality order
            given = {"image": image is not None, **{name: True for name in media}}
            for name, spec in getattr(self.model, "modalities", {"image": None}).items():
                if given.get(name):
                    lead += f"{spec.placeholder if spec is not None else IMAGE_PLACEHOLDER}\n"
        text = lead + question
        if media:
            gen["media"] = {name: [item] for name, item in media.items()}
        prompt = template.prompt(text, self.turns)
        reply = self.model.generate([image], [prompt], apply_template=False, **gen)[0]
        self.turns += [Turn("human", text), Turn("gpt", reply)]
        return reply


if __name__ == "__main__":
    raise SystemExit(main())
