"""`zoo show`: write a video as a GIF or a strip PNG, an audio clip as a spectrogram PNG, to look at the data."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  zoo show video --shapes-clip 3 --out clip.gif            # synthetic clip 3 of the test split, animated
  zoo show video --frames path/to/vid12/ --out strip.png   # a folder of extracted frames (sorted by name)
  zoo show audio --shapes-clip 0 --out sounds.png          # synthetic sounds: waveform + Whisper log-Mel
  zoo show audio --wav speech.wav --out speech.png
  zoo show audio --say "What color is the circle?" --out q.png --save-wav q.wav

The output type follows --out: .gif (video only) is animated, .png is a strip of frames or a spectrogram.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo show", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="kind", required=True)
    video = sub.add_parser("video", help="a video as a GIF or a strip of frames")
    src = video.add_mutually_exclusive_group(required=True)
    src.add_argument("--shapes-clip", type=int, metavar="INDEX", help="a clip of the synthetic video world")
    src.add_argument("--frames", type=Path, metavar="DIR", help="a folder of frame images")
    video.add_argument("--split", default="test", choices=("train", "val", "test"))
    video.add_argument("--seed", type=int, default=0, help="the synthetic world's seed")
    video.add_argument("--fps", type=float, default=4.0)
    video.add_argument("--scale", type=int, default=2, help="enlarge each frame this many times")
    video.add_argument("--out", type=Path, required=True, help="output .gif or .png")
    audio = sub.add_parser("audio", help="an audio clip's waveform and log-Mel spectrogram as a PNG")
    src = audio.add_mutually_exclusive_group(required=True)
    src.add_argument("--shapes-clip", type=int, metavar="INDEX", help="a clip of the synthetic sound world")
    src.add_argument("--wav", type=Path, help="a 16-bit PCM WAV file (resampled to 16 kHz)")
    src.add_argument("--say", metavar="TEXT", help="a sentence assembled from the shipped speech clips")
    audio.add_argument("--split", default="test", choices=("train", "val", "test"))
    audio.add_argument("--seed", type=int, default=0)
    audio.add_argument("--save-wav", type=Path, help="also write the audio as a 16 kHz WAV file")
    audio.add_argument("--out", type=Path, required=True, help="output .png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suffix = args.out.suffix.lower()
    if args.kind == "video":
        from data.show import write_gif, write_strip

        if suffix not in (".gif", ".png"):
            raise SystemExit(f"zoo show video: --out must end in .gif or .png, got {args.out}")
        if args.shapes_clip is not None:
            from data.video import VideoConfig, VideoWorld

            clip = VideoWorld(VideoConfig(seed=args.seed)).clip(args.shapes_clip, args.split)
            frames, title = clip.frames, clip.caption
        else:
            from eval.av import load_frames

            count = sum(1 for p in args.frames.iterdir() if p.is_file()) if args.frames.is_dir() else 0
            frames, title = load_frames(args.frames, max(1, count), "zoo show --frames"), str(args.frames)
        if suffix == ".gif":
            write_gif(frames, args.out, fps=args.fps, scale=args.scale)
        else:
            write_strip(frames, args.out, scale=args.scale)
    else:
        from data.show import write_spectrogram
        from data.speech import speak, write_wav

        if suffix != ".png":
            raise SystemExit(f"zoo show audio: --out must end in .png, got {args.out}")
        if args.shapes_clip is not None:
            from data.audio import AudioConfig, AudioWorld

            clip = AudioWorld(AudioConfig(seed=args.seed)).clip(args.shapes_clip, args.split)
            wave, title = clip.waveform, clip.caption
        elif args.wav is not None:
            from eval.av import load_audio_16k

            wave, title = load_audio_16k(args.wav, "zoo show --wav"), str(args.wav)
        else:
            wave, title = speak(args.say), args.say
        write_spectrogram(wave, args.out, title=title)
        if args.save_wav is not None:
            write_wav(args.save_wav, wave)
    print(f"wrote {args.out} ({title})")
    return 0
