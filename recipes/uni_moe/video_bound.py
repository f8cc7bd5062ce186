"""The best ShapesVideoQA accuracy any model can expect when its video input ignores frame order.

    python recipes/uni_moe/video_bound.py              # the eval task's 200 test clips (759 questions)
    python recipes/uni_moe/video_bound.py --limit 200  # the first 200 questions (the recipe's eval.limit)

Uni-MoE pools a video's frame features with a mean over time, so a clip and its time reversal reach the LM as the
same tokens. The reversed clip is as likely under the world's generator (directions uniform, roles drawn as a
permutation, event frames uniform), and where both ask the same question with different answers a model that
cannot tell them apart is right on at most one of the two: expected accuracy 1/2 on such questions. Ambiguous:

* direction: every clip (left <-> right, up <-> down);
* order ("does X appear before or after Y leaves"): every such question (appears <-> leaves swaps the order);
* color_change: every such question (the colour before and after swap);
* count in the first / last frame: when the two counts differ;
* appear / leave: when the clip has both an appearing and a leaving object (they swap roles); with only one of them,
  the question itself says which role the partly visible object has.
"""

from __future__ import annotations

import argparse
from collections import Counter

from data.video import VideoConfig, VideoWorld


def order_free_bound(config: VideoConfig, n: int, split: str = "test", limit: int | None = None
                     ) -> tuple[float, Counter, Counter]:
    """(bound in %, questions per kind, ambiguous questions per kind) over ``n`` clips, or over the first ``limit``
    questions (the eval's ``limit`` documents)."""
    world = VideoWorld(config)
    total: Counter = Counter()
    ambiguous: Counter = Counter()
    for index in range(n):
        clip = world.clip(index, split)
        roles = {t.role for t in clip.tracks[1:]}
        first = sum(t.colors[0] is not None for t in clip.tracks)
        last = sum(t.colors[-1] is not None for t in clip.tracks)
        for qa in clip.qa:
            if limit is not None and sum(total.values()) >= limit:
                break
            total[qa.kind] += 1
            if (qa.kind in ("direction", "order", "color_change") or (qa.kind == "count" and first != last)
                    or (qa.kind in ("appear", "leave") and {"appears", "leaves"} <= roles)):
                ambiguous[qa.kind] += 1
    bound = 100.0 * (sum(total.values()) - sum(ambiguous.values()) / 2) / sum(total.values())
    return bound, total, ambiguous


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=200, help="test clips (shapes_video_qa reads 200)")
    p.add_argument("--limit", type=int, help="only the first LIMIT questions (a recipe's eval.limit)")
    args = p.parse_args(argv)
    bound, total, ambiguous = order_free_bound(VideoConfig(image_size=64, num_frames=8, seed=0), args.clips,
                                               limit=args.limit)
    for kind in total:
        print(f"{kind:13s} {total[kind]:4d} questions, {ambiguous[kind]:4d} ambiguous under time reversal")
    print(f"bound: {bound:.1f}% of {sum(total.values())} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
