"""What the DDP hook costs per training step, side by side on one machine, no network shaping.

Runs RANKS gloo ranks on this machine (FileStore rendezvous, one thread each) training
digits-wide-mlp on a fixed batch, and for each variant times STEPS steps after a warm-up:

* ``local``: forward, backward and SGD step with no DDP and no communication (the floor);
  every variant uses the trainer's optimizer (fused SGD) and, with DDP, its gradients as views
  into DDP's buckets;
* ``ddp``: plain DDP, no hook (PyTorch's own allreduce);
* ``dense``: DDP with the hook and the ``none`` compressor (what sparsetrain runs as "dense"),
  on the engine's in-place dense path, and ``dense/general`` on its general path;
* ``<compressor>+<collective>``: the hook with that sparse compressor and collective, once on
  the engine's in-place sparse path (``fast``) and once forced onto its general path
  (``general``: dense temporaries, the residual as ``compensated - decompress(payload)``), which
  computes the same values bit for bit; ``threshold+oktopk/scaled`` is the fast path with a
  ``torch.amp.GradScaler`` given to the hook and driving the step (``scaler.scale(loss)``,
  ``scaler.step``, ``scaler.update``, with a plain SGD as the trainer uses with a scaler): what
  the hook's loss-scale bookkeeping costs (its result check, the held futures, the scale read
  once a step), without autocast, whose cost is the model's.

For each it reports wall seconds per step (slowest rank), and on rank 0 the CPU seconds per step
of the main thread and of the hook's thread: with more ranks than cores the step is bound by
the total CPU the ranks need, so the hook's CPU time is what a faster hook has to cut. It also
reports rank 0's page faults and user and system CPU per step (the whole process).

``--host-memory both`` runs every variant twice, with glibc's malloc as it is and with the
workers keeping freed memory for reuse as the trainer's do (:mod:`sparsetrain.hostmem`).
Writes JSON.

Usage::

    python benchmarks/bench_sync_overhead.py --host-memory both \
        --out benchmarks/results/sync_overhead.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

VARIANTS = [
    "local",
    "ddp",
    "dense",
    "dense/general",
    "threshold+oktopk/fast",
    "threshold+oktopk/general",
    "topk+allgather/fast",
    "topk+allgather/general",
    "threshold+oktopk/scaled",
]


def _measure(variant: str, task, x: torch.Tensor, y: torch.Tensor, cfg: dict) -> dict:
    """Time one variant on this rank (all ranks call it together)."""
    import sparsetrain
    from sparsetrain.train import sgd

    torch.manual_seed(0)
    net = task.build_model()
    # As the trainer builds them: gradients as views into DDP's buckets, fused SGD.
    model = net if variant == "local" else DDP(net, gradient_as_bucket_view=True)
    state, scaler = None, None
    if variant.endswith("/scaled"):
        scaler = torch.amp.GradScaler("cpu")
    if variant.startswith("dense"):
        state = sparsetrain.register_ddp_hook(model, "none")
        if variant == "dense/general":
            state.engine._dense_fast_path = lambda: False
    elif variant not in ("local", "ddp"):
        method, path = variant.split("/")
        compressor, collective = method.split("+")
        state = sparsetrain.register_ddp_hook(
            model, compressor, density=cfg["density"], collective=collective, grad_scaler=scaler
        )
        if path == "general":
            state.engine._sparse_fast_path = lambda: False
    hook_cpu = [0.0]
    if state is not None:
        exchange = state.engine.exchange

        def timed(*a, **k):
            c0 = time.thread_time()
            try:
                return exchange(*a, **k)
            finally:
                hook_cpu[0] += time.thread_time() - c0

        state.engine.exchange = timed
    opt = sgd(net.parameters(), fused=scaler is None, lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        loss = task.loss_fn(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    for _ in range(cfg["warmup"]):
        step()
    hook_cpu[0] = 0.0
    dist.barrier()
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    wall = torch.tensor([(time.perf_counter() - t0) / cfg["steps"]], dtype=torch.float64)
    main_cpu = (time.thread_time() - c0) / cfg["steps"]
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    dist.barrier()
    return {
        "seconds_per_step": float(wall),
        "main_cpu_seconds_per_step": main_cpu,
        "hook_cpu_seconds_per_step": hook_cpu[0] / cfg["steps"],
        # the whole process (all its threads): faults in fresh pages, and the kernel's time
        "page_faults_per_step": (u1.ru_minflt - u0.ru_minflt) / cfg["steps"],
        "process_system_cpu_seconds_per_step": (u1.ru_stime - u0.ru_stime) / cfg["steps"],
        "process_user_cpu_seconds_per_step": (u1.ru_utime - u0.ru_utime) / cfg["steps"],
    }


def _worker(rank: int, world: int, root: str, cfg: dict, reuse: bool) -> None:
    torch.set_num_threads(1)
    if reuse:
        from sparsetrain.hostmem import reuse_freed_memory

        reuse_freed_memory()
    store = dist.FileStore(os.path.join(root, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    from sparsetrain.tasks import get_task

    task = get_task("digits-wide-mlp", hidden=cfg["hidden"])
    x = task.train.tensors[0][rank * cfg["batch"] : (rank + 1) * cfg["batch"]]
    y = task.train.tensors[1][rank * cfg["batch"] : (rank + 1) * cfg["batch"]]
    results = {v: _measure(v, task, x, y, cfg) for v in cfg["variants"]}
    if rank == 0:
        Path(root, "result.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _print_table(results: dict) -> None:
    print(f"{'variant':<26}{'s/step':>9}{'main CPU ms':>13}{'hook CPU ms':>13}"
          f"{'page faults':>13}")  # fmt: skip
    for v, r in results.items():
        print(f"{v:<26}{r['seconds_per_step']:>9.3f}{1e3 * r['main_cpu_seconds_per_step']:>13.1f}"
              f"{1e3 * r['hook_cpu_seconds_per_step']:>13.1f}"
              f"{r['page_faults_per_step']:>13.0f}")  # fmt: skip
    fast, scaled = results.get("threshold+oktopk/fast"), results.get("threshold+oktopk/scaled")
    if fast and scaled:
        print(f"threshold+oktopk: with a GradScaler / without = "
              f"{scaled['seconds_per_step'] / fast['seconds_per_step']:.2f}x step time, "
              f"{scaled['hook_cpu_seconds_per_step'] / fast['hook_cpu_seconds_per_step']:.2f}x"
              " hook CPU")  # fmt: skip
    for method in ("dense", "threshold+oktopk", "topk+allgather"):
        fast = results.get(method if method == "dense" else f"{method}/fast")
        general = results.get(f"{method}/general")
        if fast and general:
            print(f"{method}: general / fast = "
                  f"{general['seconds_per_step'] / fast['seconds_per_step']:.2f}x step time, "
                  f"{general['hook_cpu_seconds_per_step'] / fast['hook_cpu_seconds_per_step']:.2f}x"
                  " hook CPU")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=3072, help="MLP width (3072: 9.7M parameters)")
    p.add_argument("--batch", type=int, default=16, help="per rank")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {VARIANTS}")
    p.add_argument(
        "--host-memory",
        choices=("reuse", "default", "both"),
        default="reuse",
        help="reuse: workers keep freed memory for reuse, as the trainer's do "
        "(sparsetrain.hostmem); default: glibc's malloc as it is; both: one run of each",
    )
    p.add_argument("--out", default="benchmarks/results/sync_overhead.json")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        p.error(f"--variants: unknown {bad}; valid: {', '.join(VARIANTS)}")
    if args.ranks < 2 or args.steps < 1 or args.warmup < 1:
        p.error("need --ranks >= 2, --steps >= 1 and --warmup >= 1")
    cfg = {**vars(args), "variants": variants}
    settings = ["default", "reuse"] if args.host_memory == "both" else [args.host_memory]
    results = {}
    for setting in settings:
        with tempfile.TemporaryDirectory(prefix="sparsetrain-overhead-") as root:
            mp.start_processes(
                _worker,
                args=(args.ranks, root, cfg, setting == "reuse"),
                nprocs=args.ranks,
                start_method="spawn",
            )
            results[setting] = json.loads(Path(root, "result.json").read_text())
    print(f"{args.ranks} ranks on {os.cpu_count()} cores, digits-wide-mlp hidden {args.hidden}, "
          f"batch {args.batch} per rank, density {args.density}")  # fmt: skip
    for setting, res in results.items():
        print(f"\nhost memory: {setting}")
        _print_table(res)
    if len(results) == 2:
        print("\ndefault / reuse, seconds per step:")
        for v in variants:
            d, r = results["default"][v], results["reuse"][v]
            print(f"  {v:<26}{d['seconds_per_step'] / r['seconds_per_step']:>6.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from sparsetrain import _native  # which version of the native kernel the ranks ran

    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                               "cores": os.cpu_count(), "native_kernel": _native.vector_level(),
                               "results": results}, indent=1))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
