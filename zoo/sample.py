"""``zoo sample --model NAME --classes 0-9 --out grid.png``: draw class-conditional samples as a PNG grid.

NAME is a weights name (``dit_moe_tiny.digits``) or a directory written by ``save_pretrained`` / ``zoo train``.
Pixel-space models (the digits models) are saved directly; latent models (4 channels, e.g. converted DiT-XL/2)
need ``--vae DIR``, a local diffusers ``AutoencoderKL`` directory (sd-vae-ft-ema / -mse): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "parse_classes"]

LATENT_SCALE = 0.18215  # SD VAE latent scaling used by DiT


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """"0-9" / "1,3,5" / "0-3,7" -> class ids, each checked against ``num_classes``."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            low, _, high = part.partition("-")
            ids = list(range(int(low), int(high) + 1)) if high else [int(part)]
        except ValueError:
            raise ValueError(f"--classes {spec!r}: {part!r} is not a class id or a range like 0-9") from None
        if not ids:
            raise ValueError(f"--classes {spec!r}: the range {part!r} is empty (write it low-high, e.g. 0-9)")
        out += ids
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {spec!r}: unknown class id(s) {bad}; this model knows 0..{num_classes - 1}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zoo sample", description=__doc__.replace("``", "`"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="weights name (see `zoo list --pretrained`) or a model directory")
    p.add_argument("--classes", default="0-9", help="class ids: '0-9', '1,3,5' (default 0-9)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (one grid column each; default 8)")
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 50 Euler for rectified flow, 250 DDPM)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default 1.5 or the "
                   "weights' recorded eval setting)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler"], help="default: from the model's objective")
    p.add_argument("--three-channel-guidance", action="store_true",
                   help="guide only channels 0..2, as the original DiT sampler (for reproducing its FIDs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory, to decode latent models")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default auto: cuda when there is one)")
    args = p.parse_args(argv)  # torch is imported after parsing, so --help and a bad flag answer at once
    for flag, value in (("--per-class", args.per_class), ("--steps", args.steps)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")  # checked before the model loads

    import torch
    from tqdm.auto import tqdm

    import zoo

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with tqdm(total=1, desc=f"loading {args.model}", unit="model", leave=False) as bar:
            model = zoo.load(args.model).to(args.device).eval()
            bar.update(1)
    except (KeyError, FileNotFoundError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"zoo sample: {msg}", file=sys.stderr)
        return 2
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "sample"):
        print(f"zoo sample: {args.model} is not a diffusion model (no sample())", file=sys.stderr)
        return 2
    try:
        classes = parse_classes(args.classes, cfg.num_classes)
    except ValueError as e:
        print(f"zoo sample: {e}", file=sys.stderr)
        return 2
    if cfg.in_channels == 4 and not args.vae:
        print("zoo sample: this is a latent-space model; pass --vae DIR (a local diffusers AutoencoderKL)", file=sys.stderr)
        return 2
    if cfg.in_channels == 4:
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            print("zoo sample: --vae decodes with diffusers' AutoencoderKL, which is not installed "
                  "(pip install 'mmzoo[diffusers]')", file=sys.stderr)  # fmt: skip
            return 2
    steps = args.steps or (50 if cfg.objective == "rectified_flow" else 250)
    cfg_scale = 1.5 if args.cfg_scale is None else args.cfg_scale
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    from zoo.diffusion import sample as diffusion_sample

    with tqdm(total=steps, desc="sampling", unit="step") as bar:  # the sampler reports each step it finishes
        x = diffusion_sample(model, labels.to(args.device), num_steps=steps, cfg_scale=cfg_scale, generator=gen,
                             sampler=args.sampler, guidance_channels=3 if args.three_channel_guidance else None,
                             callback=lambda step, t: bar.update(step + 1 - bar.n))
    if cfg.in_channels == 4:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(args.device).eval()
        with torch.no_grad():
            x = vae.decode(x / LATENT_SCALE).sample
    # Column-major layout: one row per class would be wide; instead each row holds per_class samples of one class.
    from eval.generation.grid import save_sample_grid

    out = save_sample_grid(x.cpu().clamp(-1, 1), labels, Path(args.out), nrow=args.per_class)
    print(f"wrote {out}: {len(classes)} classes x {args.per_class} samples, {steps} steps, cfg {cfg_scale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
