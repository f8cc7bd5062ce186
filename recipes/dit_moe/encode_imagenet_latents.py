"""Encode ImageNet into SD-VAE latents in webdataset shards for recipes/dit_moe/s2_8e2a_in256.yaml.

    python recipes/dit_moe/encode_imagenet_latents.py --imagenet /data/imagenet/train --vae /models/sd-vae-ft-ema \
        --out /data/imagenet256_latents --image-size 256

Per image, as DiT/fast-DiT prepare data (shared/reference/dit_moe.md Sec. 4): ADM center crop (box-downsample by 2
while the short side is >= 2x the target, bicubic resize, center crop), one random horizontal flip (frozen at
extraction, like fast-DiT), scale to [-1, 1], encode with a local diffusers AutoencoderKL, **sample** the latent
distribution and multiply by 0.18215. Each record is ``<key>.latent.npy`` (float16, 4 x S/8 x S/8) and ``<key>.cls``
(the class index: sorted synset folder order, as torchvision's ImageFolder). Nothing is downloaded: ``--vae`` must be
a local directory (sd-vae-ft-ema or sd-vae-ft-mse; the encoder is the same).
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import torch
from PIL import Image

LATENT_SCALE = 0.18215


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """ADM's crop: halve with BOX while the short side >= 2 * size, BICUBIC to size, center crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", required=True, help="ImageNet train folder with one sub-folder per synset")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import webdataset as wds
    from diffusers import AutoencoderKL
    from torchvision.datasets import ImageFolder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(device).eval()
    folder = ImageFolder(args.imagenet)
    os.makedirs(args.out, exist_ok=True)
    skipped = 0
    with wds.ShardWriter(os.path.join(args.out, "train-%06d.tar"), maxcount=args.shard_size) as sink:
        for start in range(0, len(folder.samples), args.batch_size):
            batch, meta = [], []
            for i, (path, cls) in enumerate(folder.samples[start : start + args.batch_size], start):
                try:
                    img = center_crop_arr(Image.open(path).convert("RGB"), args.image_size)
                except OSError as e:  # unreadable file: count and report, never stop the run
                    skipped += 1
                    print(f"skip {path}: {e}")
                    continue
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                batch.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 127.5 - 1)
                meta.append((f"{i:08d}", cls))
            if not batch:
                continue
            with torch.no_grad():
                z = vae.encode(torch.stack(batch).to(device)).latent_dist.sample() * LATENT_SCALE
            for (key, cls), lat in zip(meta, z.cpu().half().numpy()):
                buf = io.BytesIO()
                np.save(buf, lat)
                sink.write({"__key__": key, "latent.npy": buf.getvalue(), "cls": str(cls).encode()})
    print(f"done: {len(folder.samples) - skipped} images encoded, {skipped} skipped")


if __name__ == "__main__":
    main()
