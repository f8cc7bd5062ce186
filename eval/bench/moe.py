"""MoE layer benchmark: forward and forward+backward time as ratios against baselines measured in the same run.

Baselines: (a) a dense SwiGLU FFN of width k * expert_width (the compute floor: same FLOPs as the k active experts),
(b) transformers' ``MixtralSparseMoeBlock`` with each experts implementation that runs here, built with the same
weights and routing as our layer. Also the LoRA-expert layer against its frozen dense FFN. Variants are timed
interleaved (one call of each per round) and the median over rounds is reported, so that background load hits all
of them alike. CPU default: T=4096, d=512, width 1024, E=8, k=2, fp32, 2 threads. ``--gpu``: bf16 on CUDA, T=32768.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from zoo.moe import MoE, from_dense, from_hf

__all__ = ["run"]


class DenseSwiGLU(nn.Module):
    """The floor: one fused gate/up projection and a down projection, width ``hidden``."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(g) * u)


class StreamedDense(nn.Module):
    """The same dense FFN run over row chunks (no-grad forward only): the strictest forward floor, because its
    intermediates stay cache-sized like those of our streamed no-grad MoE forward."""

    def __init__(self, dense: DenseSwiGLU, chunks: int) -> None:
        super().__init__()
        self.dense, self.chunks = dense, chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.dense(x)
        return torch.cat([self.dense(c) for c in x.chunk(self.chunks)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_round(fns: dict[str, Callable[[], None]], device: torch.device) -> dict[str, tuple[float, float]]:
    out = {}
    for name, fn in fns.items():
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        out[name] = (time.perf_counter() - w0, time.process_time() - c0)
    return out


def _measure(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int,
             warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and median process CPU time per variant, variants interleaved within each round."""
    for _ in range(warmup):
        _time_round(fns, device)
    wall: dict[str, list[float]] = {n: [] for n in fns}
    cpu: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, (w, c) in _time_round(fns, device).items():
            wall[n].append(w)
            cpu[n].append(c)
    return ({n: statistics.median(v) for n, v in wall.items()}, {n: statistics.median(v) for n, v in cpu.items()})


def _mixtral_blocks(d: int, h: int, E: int, k: int, T: int, dtype: torch.dtype, device: torch.device,
                    mem_limit: float) -> dict[str, nn.Module]:
    """One transformers Mixtral block per experts implementation that runs here, all with the same weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    blocks: dict[str, nn.Module] = {}
    ref = None
    for impl in ("eager", "batched_mm", "grouped_mm"):
        if impl == "batched_mm":
            # batched_mm gathers a copy of the chosen experts' weights for every (token, choice) pair
            need = T * k * 3 * d * h * torch.finfo(dtype).bits / 8
            if need > mem_limit:
                print(f"  transformers Mixtral experts_implementation='batched_mm' skipped: it would gather "
                      f"{need / 2**30:.0f} GiB of expert weights at T={T}")
                continue
        cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=k,
                            num_attention_heads=8, num_key_value_heads=8)
        cfg._experts_implementation = impl
        torch.manual_seed(0)
        block = MixtralSparseMoeBlock(cfg)
        for p in block.parameters():
            nn.init.normal_(p, std=d**-0.5)
        block = block.to(device=device, dtype=dtype)
        if ref is None:
            ref = block
        else:
            block.load_state_dict(ref.state_dict())
        x = torch.randn(64, d, device=device, dtype=dtype)
        try:
            with torch.no_grad():
                block(x.view(1, 64, d))
        except Exception as exc:  # an implementation this device cannot run is reported, not fatal
            print(f"  transformers Mixtral experts_implementation={impl!r} does not run here: {exc}")
            continue
        blocks[impl] = block
    return blocks


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.bench moe", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 on CUDA with larger T")
    parser.add_argument("--tokens", type=int, default=None, help="T (default 4096 CPU, 32768 GPU)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024, help="expert width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    args, _ = parser.parse_known_args(argv)

    if args.gpu and not torch.cuda.is_available():
        print("--gpu given but no CUDA device is available; nothing to run")
        return
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    T = args.tokens or (32768 if args.gpu else 4096)
    d, h, E, k = args.hidden, args.width, args.experts, args.top_k
    torch.set_num_threads(args.threads)
    print(f"MoE bench: T={T} d={d} width={h} E={E} k={k} {dtype} on {device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats}")

    hf = {} if args.no_hf else _mixtral_blocks(d, h, E, k, T, dtype, device, 4 * 2**30)
    if hf:
        src = next(iter(hf.values()))
        dropless = from_hf(src, name="dropless")
        capacity = from_hf(src, name="capacity", capacity_factor=1.5)
    else:
        from zoo.moe import MoEConfig

        cfg = MoEConfig(hidden_size=d, expert_hidden_size=h, num_experts=E, top_k=k, balance_loss=None)
        torch.manual_seed(0)
        dropless = MoE(cfg, name="dropless").to(device=device, dtype=dtype)
        capacity = MoE(MoEConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "capacity_factor": 1.5}),
                       name="capacity").to(device=device, dtype=dtype)
        capacity.load_state_dict(dropless.state_dict())
    dense = DenseSwiGLU(d, k * h).to(device=device, dtype=dtype)
    base = DenseSwiGLU(d, h).to(device=device, dtype=dtype).requires_grad_(False)
    lora = from_dense(_as_hf_mlp(base), num_experts=E, top_k=k, name="lora", lora_rank=args.lora_rank,
                          balance_loss=None)
    for m in (dropless, capacity, dense, base, lora, *hf.values()):
        m.train()

    torch.manual_seed(1)
    x = torch.randn(T, d, device=device, dtype=dtype)
    x3 = x.view(1, T, d)  # transformers blocks want [B, L, d]
    g = torch.randn(T, d, device=device, dtype=dtype)
    modules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "dense floor": dense, "dense floor streamed": StreamedDense(dense, E),
        "ours dropless": dropless, "ours capacity 1.5": capacity,
    }
    for impl, block in hf.items():
        modules[f"hf mixtral {impl}"] = lambda t, b=block: b(t.view(1, T, d)).view(T, d)
    modules["lora base (frozen)"] = base
    modules[f"ours lora r={args.lora_rank}"] = lora
    del x3

    def fwd(mod):
        def f():
            with torch.no_grad():
                mod(x)
        return f

    def fwdbwd(mod):
        def f():
            xi = x.detach().requires_grad_(True)
            mod(xi).backward(g)
        return f

    t_f, c_f = _measure({n: fwd(m) for n, m in modules.items()}, device, args.repeats, args.warmup)
    t_fb, c_fb = _measure({n: fwdbwd(m) for n, m in modules.items() if n != "dense floor streamed"}, device,
                          args.repeats, args.warmup)

    hf_names = [n for n in modules if n.startswith("hf ")]
    ln, bn = f"ours lora r={args.lora_rank}", "lora base (frozen)"
    for label, tf, tfb in (("wall-clock", t_f, t_fb), ("process CPU time", c_f, c_fb)):
        best_f = min((tf[n] for n in hf_names), default=float("nan"))
        best_fb = min((tfb[n] for n in hf_names), default=float("nan"))
        print(f"\n[{label}] forward (no grad) and forward+backward; ratios vs the dense floor and vs transformers' best")
        print(f"{'variant':<26}{'fwd ms':>10}{'x floor':>9}{'x hf best':>11}{'fwd+bwd ms':>12}{'x floor':>9}"
              f"{'x hf best':>11}")
        for n in modules:
            if n in (ln, bn):
                continue
            row = f"{n:<26}{tf[n] * 1e3:>10.1f}{tf[n] / tf['dense floor']:>9.3f}{tf[n] / best_f:>11.3f}"
            if n in tfb:
                row += f"{tfb[n] * 1e3:>12.1f}{tfb[n] / tfb['dense floor']:>9.3f}{tfb[n] / best_fb:>11.3f}"
            print(row)
        print(f"{ln:<26}{tf[ln] * 1e3:>10.1f}  x frozen base FFN {tf[ln] / tf[bn]:.3f} (fwd); "
              f"{tfb[ln] * 1e3:.1f} ms x {tfb[ln] / tfb[bn]:.3f} (fwd+bwd); base {tf[bn] * 1e3:.1f} / "
              f"{tfb[bn] * 1e3:.1f} ms")
    stats = capacity.last_stats
    if stats is not None:
        print(f"\ncapacity 1.5: capacity={stats.capacity}, drop rate {stats.drop_rate:.3%} (training mode)")


def _as_hf_mlp(dense: DenseSwiGLU) -> nn.Module:
    """The floor FFN re-expressed with gate_proj/up_proj/down_proj so that from_dense can read it."""
    d, two_h = dense.gate_up.in_features, dense.gate_up.out_features
    m = nn.Module()
    m.gate_proj = nn.Linear(d, two_h // 2, bias=False)
    m.up_proj = nn.Linear(d, two_h // 2, bias=False)
    m.down_proj = nn.Linear(two_h // 2, d, bias=False)
    m.act_fn = nn.SiLU()
    with torch.no_grad():
        g, u = dense.gate_up.weight.chunk(2, dim=0)
        m.gate_proj.weight.copy_(g)
        m.up_proj.weight.copy_(u)
        m.down_proj.weight.copy_(dense.down.weight)
    return m.to(dense.gate_up.weight.device, dense.gate_up.weight.dtype)
