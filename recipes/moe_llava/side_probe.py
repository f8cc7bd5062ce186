"""Does a MoE-LLaVA's image token of an object say where the object is? A linear probe per layer.

For every 1-object scene among the first ``--scenes`` train / test scenes of the shapes world, the image tokens are
pooled over the object (weighted by how much of each 8 px patch it covers) at the projector output (layer 0) and
after each LM layer; a logistic regression trained on the train scenes then tells left from right (the object's
centre against the image's middle) on the test scenes. Chance is about 50%.

    python recipes/moe_llava/side_probe.py                    # the shipped moe_llava_tiny.shapes
    python recipes/moe_llava/side_probe.py --model runs/moe_llava_shapes_tiny/sft/final

Measured numbers are in README.md ("Where the object is").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def _pooled_object_tokens(model, scenes, layers) -> dict[int, np.ndarray]:
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, layer in enumerate(layers)]
    n_img = model.num_image_tokens
    side = int(round(n_img**0.5))
    patch = model.data_cfg["image_size"] // side
    feats: dict[int, list[np.ndarray]] = {}
    try:
        for start in range(0, len(scenes), 100):
            batch = scenes[start : start + 100]
            pixels = torch.stack([model.preprocess(s.image) for s in batch])
            # The image alone, then one word: the probe reads the image tokens, which causal attention keeps
            # independent of any text that follows them.
            ids = torch.tensor([[model.image_token_id] * n_img + [model.tokenizer.eos_token_id or 0]] * len(batch))
            with torch.no_grad():
                embeds = model.embed_multimodal(ids, pixels)
                model(ids, torch.ones_like(ids), pixels)
            for j, scene in enumerate(batch):
                mask = torch.tensor(scene.objects[0].mask, dtype=torch.float32)[None, None]
                cover = torch.nn.functional.avg_pool2d(mask, patch).flatten()
                weight = (cover / cover.sum())[:, None]
                per_layer = [embeds[j, :n_img]] + [captured[k][j, :n_img] for k in range(len(layers))]
                for k, h in enumerate(per_layer):
                    feats.setdefault(k, []).append((weight * h).sum(0).numpy())
    finally:
        for h in hooks:
            h.remove()
    return {k: np.stack(v) for k, v in feats.items()}


def main(argv: list[str] | None = None) -> None:
    from sklearn.linear_model import LogisticRegression

    import zoo
    from data.shapes import ShapesWorld

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="moe_llava_tiny.shapes", help="a zoo model name or an exported stage folder")
    ap.add_argument("--scenes", type=int, default=3000, help="train scenes scanned (test: a quarter as many)")
    a = ap.parse_args(argv)
    model = zoo.load(a.model).float().eval()
    world = ShapesWorld(image_size=model.data_cfg["image_size"], seed=0)
    layers = model.llm.lm.model.layers
    data = {}
    for split, n in (("train", a.scenes), ("test", max(a.scenes // 4, 50))):
        scenes = [s for s in world.iter_scenes(split, n) if len(s.objects) == 1]
        right = np.array([s.objects[0].center[0] + 0.5 >= world.config.image_size / 2 for s in scenes])
        data[split] = (_pooled_object_tokens(model, scenes, layers), right)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    print(f"{a.model}: 1-object scenes {len(y_train)} train / {len(y_test)} test; left / right probe of the "
          "object-pooled image tokens")
    print("| layer | train | test |\n|---|---:|---:|")
    for k in sorted(x_train):
        probe = LogisticRegression(max_iter=5000).fit(x_train[k], y_train)
        name = "projector output" if k == 0 else f"after LM layer {k}"
        print(f"| {name} | {100 * probe.score(x_train[k], y_train):.1f} | {100 * probe.score(x_test[k], y_test):.1f} |")


if __name__ == "__main__":
    main()
