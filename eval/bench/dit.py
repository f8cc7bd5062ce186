"""DiT-MoE sampling throughput against a dense DiT with equal activated parameters, measured in the same run.

Pairs: the digits recipes' models (D=64, depth 4, 16 tokens) and an S-width pair (D=384, depth 2 on CPU, 256 tokens,
as DiT-S/2 at 256 px). The dense DiT has the GELU MLP (4D wide, 8D^2 + 5D parameters per block); the MoE twin has 8
SwiGLU experts of width D (top-2, no renormalisation) plus a shared SwiGLU sized so that the activated parameters
per block match (to within 0.3 %). One "step" is one guided sampler step (a forward pass over the [cond; null]
batch). Variants are timed interleaved, median over rounds, so background load hits both alike. ``--gpu`` runs on
CUDA in bf16 with DiT-S/2-sized depth 12 and a larger batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

__all__ = ["run", "equal_active_pair"]


def equal_active_pair(d: int, depth: int, heads: int, input_size: int, patch: int, in_channels: int,
                      experts: int = 8, top_k: int = 2):
    """(dense DiT, DiT-MoE) with equal activated parameters."""
    from zoo.models.dit import DiT, DiTConfig

    base = dict(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=d, depth=depth,
                num_heads=heads, num_classes=10)
    expert_hidden = d * 2 // top_k  # k active experts of width 2D/k: 6D^2 in total
    # shared SwiGLU: 3*D*h parameters; fill what is left of the dense 8D^2 + 5D after the router (E*D).
    shared_hidden = max(1, round((8 * d * d + 5 * d - 3 * d * expert_hidden * top_k - experts * d) / (3 * d)))
    dense = DiT(DiTConfig(**base))
    moe = DiT(DiTConfig(**base, num_experts=experts, top_k=top_k, expert_hidden=expert_hidden, shared_hidden=shared_hidden))
    return dense, moe


def _active(model) -> int:
    from zoo.models.dit import count_params

    return count_params(model)[1]


def _time(fns: dict, device: torch.device, rounds: int, warmup: int) -> dict[str, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.bench dit", description=__doc__)
    p.add_argument("--gpu", action="store_true", help="CUDA, bf16, depth-12 S-width pair, batch 128")
    p.add_argument("--rounds", type=int, default=5)
    # One thread by default: these models are small enough that intra-op threading on a shared 2-core machine
    # costs more than it gains (measured 30x slower with 2 threads under load) and would swamp the ratio.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args, _ = p.parse_known_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("bench dit --gpu: no CUDA device")
    if not args.gpu:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    pairs = [("digits (D64, depth 4, 16 tok)", dict(d=64, depth=4, heads=4, input_size=16, patch=4, in_channels=1), 100)]
    if args.gpu:
        pairs.append(("S/2 width (D384, depth 12, 256 tok)",
                      dict(d=384, depth=12, heads=6, input_size=32, patch=2, in_channels=4), 128))
    else:
        pairs.append(("S width (D384, depth 2, 256 tok)", dict(d=384, depth=2, heads=6, input_size=32, patch=2, in_channels=4), 4))
    torch.manual_seed(0)
    print(f"device {device}, dtype {dtype}, rounds {args.rounds} (median), one guided sampler step per call")
    print(f"{'pair':<40} {'active dense':>13} {'active moe':>11} {'total moe':>11} {'dense img/s':>12} {'moe img/s':>10} {'moe/dense':>9}")
    for name, kw, batch in pairs:
        dense, moe = equal_active_pair(**kw)
        dense, moe = dense.to(device, dtype).eval(), moe.to(device, dtype).eval()
        cfg = dense.cfg
        x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device, dtype=dtype)
        t = torch.full((batch,), 500, device=device)
        y = torch.arange(batch, device=device) % 10

        def step(m, x=x, t=t, y=y):
            return lambda: m.forward_with_cfg(x, t, y, 2.0)

        with torch.no_grad():
            sec = _time({"dense": step(dense), "moe": step(moe)}, device, args.rounds, warmup=2)
        total_moe = sum(p.numel() for p in moe.parameters())
        print(f"{name:<40} {_active(dense):>13,} {_active(moe):>11,} {total_moe:>11,} {batch / sec['dense']:>12.1f} "
              f"{batch / sec['moe']:>10.1f} {sec['dense'] / sec['moe']:>9.2f}")
