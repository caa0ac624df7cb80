"""Benchmark the compressors: threshold against exact top-k, and throughput of every compressor.

Two measurements, each side by side in one run so that the ratios hold on a shared machine:

1. Selection on a large gradient: ``threshold`` in steady state (mean time per step over a
   sequence of drifting gradients, the periodic re-estimation included; the re-estimation steps
   and the hot-path steps also reported alone) against ``topk`` (``torch.topk`` of ``|g|``) on
   the same tensors; the kept count relative to k.
2. Compression throughput (GB/s of input) of every registered compressor next to ``clone()`` of
   the same tensor (a memory-bandwidth reference), and the payload size relative to the input.

With ``--device cuda`` the gradients live on the GPU and every timed call ends with
``torch.cuda.synchronize()``, so the times are the kernels' and not their launches'
(``benchmarks/device_check.sh`` runs it so on a GPU machine).

Usage:
    python benchmarks/bench_compressors.py                       # 25M floats, 1 thread
    python benchmarks/bench_compressors.py --numel 1000000 --steps 10 --out /tmp/c.json
    python benchmarks/bench_compressors.py --device cuda --out /tmp/c_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsetrain import _native
from sparsetrain.compressors import available_compressors, get_compressor

RESULTS = Path(__file__).resolve().parent / "results"


def gradient(numel: int, seed: int) -> torch.Tensor:
    """A heavy-tailed gradient-like vector: normal entries with log-normal per-entry scales."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(numel, generator=gen)
    return g.mul_(torch.randn(numel, generator=gen).mul_(0.75).exp_())


# Waits for the device's queued work; set by main for --device cuda (CPU work is synchronous).
_sync = lambda: None  # noqa: E731


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def clocked(fn) -> tuple[float, float, object]:
    """Run ``fn`` once; return (wall seconds, CPU seconds of this process, result)."""
    _sync()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync()
    return time.perf_counter() - w0, time.process_time() - c0, out


def bench_selection(
    numel: int, density: float, steps: int, topk_repeat: int, seed: int, device: torch.device
) -> dict:
    """Time threshold and topk on the same drifting gradients, interleaved step by step.

    Interleaving (a topk call every few threshold steps) exposes both to the same machine load;
    CPU time (``process_time``) is reported next to wall time because on a shared machine it
    does not count the time spent waiting for a core.
    """
    a, b = gradient(numel, seed).to(device), gradient(numel, seed + 1).to(device)
    g = torch.empty_like(a)
    k = max(1, round(density * numel))
    topk = get_compressor("topk", density=density)
    thresh = get_compressor("threshold", density=density)

    def step_input(i: int) -> torch.Tensor:
        # Drift: alternate two gradients, the scale decaying by a third over the run.
        return torch.mul(a if i % 2 == 0 else b, 1 - i / (3 * steps), out=g)

    step_input(0)
    topk.compress(g)  # warm-up (allocator, first-call costs)
    thresh.compress(g, key="warmup")  # sizes the workspace; not timed
    topk_every = max(1, steps // max(topk_repeat, 1))
    topk_wall, topk_cpu, wall, cpu, counts, estimated = [], [], [], [], [], []
    for i in range(steps):
        step_input(i)
        w, c, ((idx, _), _) = clocked(lambda: thresh.compress(g, key="grad"))
        wall.append(w)
        cpu.append(c)
        counts.append(idx.numel() / k)
        estimated.append(thresh.state_dict()["grad"]["last_estimate"] == i)
        if i % topk_every == 0:
            w, c, _ = clocked(lambda: topk.compress(g))
            topk_wall.append(w)
            topk_cpu.append(c)
    # The floor of any selection: one streaming read of the gradient (a sum over it).
    read_s = statistics.median(timed(lambda: torch.sum(g), 5))
    hot = [t for t, e in zip(wall, estimated) if not e]
    est = [t for t, e in zip(wall, estimated) if e]
    topk_s = statistics.median(topk_wall)
    amortised = statistics.fmean(wall)
    return {
        "numel": numel,
        "density": density,
        "k": k,
        "topk_s": topk_s,
        "topk_cpu_s": statistics.median(topk_cpu),
        "read_once_s": read_s,
        "threshold_amortised_s": amortised,
        "threshold_amortised_cpu_s": statistics.fmean(cpu),
        "threshold_hot_median_s": statistics.median(hot) if hot else None,
        "threshold_estimate_median_s": statistics.median(est) if est else None,
        "estimate_steps": sum(estimated),
        "steps": steps,
        "speedup_amortised": topk_s / amortised,
        "speedup_amortised_cpu": statistics.median(topk_cpu) / statistics.fmean(cpu),
        "speedup_hot": topk_s / statistics.median(hot) if hot else None,
        "kept_over_k_min": min(counts),
        "kept_over_k_max": max(counts),
        "kept_over_k_mean": statistics.fmean(counts),
    }


def bench_throughput(numel: int, repeat: int, seed: int, device: torch.device) -> list[dict]:
    g = gradient(numel, seed).to(device)
    # PowerSGD needs a layout: square-ish matrices as in a transformer, plus 1-D biases.
    side = 1024
    mats = numel // (side * side)
    layout = [torch.Size([side, side])] * mats
    if numel - mats * side * side:
        layout.append(torch.Size([numel - mats * side * side]))
    gb = numel * g.element_size() / 1e9
    rows = []
    clone_s = min(timed(lambda: g.clone(), repeat + 1)[1:])
    rows.append({"name": "clone()", "compress_s": clone_s, "gb_per_s": gb / clone_s})
    for name in available_compressors():
        c = get_compressor(name)

        def compress(c=c):
            payload, ctx = c.compress(g, key="g", layout=layout)
            for _ in range(c.rounds - 1):  # one rank: the sum over ranks is the payload itself
                payload, ctx = c.next_round(payload, ctx)
            return payload, ctx

        payload, ctx = compress()  # warm-up, and sizes the workspaces
        comp_s = min(timed(compress, repeat))
        dec_s = min(timed(lambda c=c, p=payload, x=ctx: c.decompress(p, x), repeat))
        sent = sum(p.numel() * p.element_size() for p in payload)
        rows.append(
            {
                "name": name,
                "compress_s": comp_s,
                "decompress_s": dec_s,
                "gb_per_s": gb / comp_s,
                "vs_clone": clone_s / comp_s,
                "payload_over_input": sent / (numel * g.element_size()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=25_000_000, help="gradient size (float32)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.001])
    p.add_argument("--steps", type=int, default=30, help="threshold steps per density")
    p.add_argument("--topk-repeat", type=int, default=5, help="timed torch.topk calls")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per compressor")
    p.add_argument("--throughput-numel", type=int, default=None, help="default: --numel")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the gradients live: cpu or cuda[:N]")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "compressors.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: this torch build sees no CUDA device")
        global _sync
        _sync = torch.cuda.synchronize
    elif device.type != "cpu":
        p.error(f"--device must be cpu or cuda (optionally cuda:N), got {args.device!r}")

    selection = [
        bench_selection(args.numel, d, args.steps, args.topk_repeat, args.seed, device)
        for d in args.densities
    ]
    print(
        f"\nSelection on {args.numel:,} float32 on {device}, {args.threads} thread(s), "
        f"{args.steps} steps"
    )
    print(
        f"{'density':>8} {'topk ms':>9} {'thr amort ms':>13} {'thr hot ms':>11} "
        f"{'thr est ms':>11} {'read ms':>8} {'speedup':>8} {'(cpu)':>7} {'kept/k min..max':>17}"
    )
    for r in selection:
        print(
            f"{r['density']:>8g} {1e3 * r['topk_s']:>9.1f} {1e3 * r['threshold_amortised_s']:>13.1f} "
            f"{1e3 * (r['threshold_hot_median_s'] or math.nan):>11.1f} "
            f"{1e3 * (r['threshold_estimate_median_s'] or math.nan):>11.1f} "
            f"{1e3 * r['read_once_s']:>8.1f} "
            f"{r['speedup_amortised']:>7.1f}x {r['speedup_amortised_cpu']:>6.1f}x "
            f"{r['kept_over_k_min']:>8.3f}..{r['kept_over_k_max']:.3f}"
        )

    throughput = []
    if not args.skip_throughput:
        n = args.throughput_numel or args.numel
        throughput = bench_throughput(n, args.repeat, args.seed, device)
        print(
            f"\nCompression throughput on {n:,} float32 (GB/s of input), {args.threads} thread(s)"
        )
        print(
            f"{'compressor':>11} {'compress ms':>12} {'decompress ms':>14} {'GB/s':>7} "
            f"{'vs clone':>9} {'payload/input':>14}"
        )
        for r in throughput:
            dec = r.get("decompress_s")
            print(
                f"{r['name']:>11} {1e3 * r['compress_s']:>12.1f} "
                f"{(1e3 * dec if dec is not None else math.nan):>14.1f} {r['gb_per_s']:>7.2f} "
                f"{r.get('vs_clone', 1.0):>9.3f} {r.get('payload_over_input', 1.0):>14.4f}"
            )

    report = {
        "benchmark": "compressors",
        "command": " ".join(
            ["python", "benchmarks/bench_compressors.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "native_kernel": _native.vector_level(),  # None: the PyTorch ops
        "selection": selection,
        "throughput": throughput,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
