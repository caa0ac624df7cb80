"""``sparsetrain bench cluster``: time every sparse collective and dense allreduce on an emulated
bandwidth-limited cluster (one network namespace a rank, tc-shaped links; needs root).

Steps: build the cluster, measure what a link achieves (bulk TCP rate, round-trip time), start
one worker a rank (``python -m sparsetrain.commands.bench --worker CONFIG``) that times each
collective over random sparse inputs for every size and density, fit the alpha-beta-gamma cost
model (:mod:`sparsetrain.perfmodel`) to the medians, then write JSON, one PNG per size (time
against density per algorithm) and a table. Everything the cluster made is removed at the end,
also on Ctrl-C or a failure. ``sparsetrain bench cleanup`` removes leftovers of crashed runs.

Example::

    sudo sparsetrain bench cluster --ranks 8 --bandwidth 1gbit --latency 100us
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sparsetrain._procs import too_many_processes
from sparsetrain._provenance import environment, machine_cores
from sparsetrain.commands.train import seed_value
from sparsetrain.plotting import plot_model_errors, plot_path_problem

DEFAULT_SIZES = "1M,25M"
DEFAULT_DENSITIES = "0.001,0.01,0.1"
FULL_SIZES = "1M,5M,25M"
FULL_DENSITIES = "0.001,0.003,0.01,0.03,0.1"
DENSE = "dense"  # dense allreduce of the whole vector, the reference every ratio is taken to
# The worker's indices are int32 (_sparse_input): with at most 2**31 - 1 elements every index,
# and numel itself (a region bound in some collectives), fits in an int32.
MAX_NUMEL = 2**31 - 1


def load_collectives() -> list[str]:
    """Import every module of ``sparsetrain.comm`` (each registers its collectives) and return
    the registered names."""
    import importlib
    import pkgutil

    import sparsetrain.comm as comm

    for mod in pkgutil.iter_modules(comm.__path__):
        importlib.import_module(f"{comm.__name__}.{mod.name}")
    return comm.available_collectives()


# ---- worker: runs inside a rank's namespace -------------------------------------------------
def _sparse_input(numel: int, k: int, rank: int, seed: int):
    """This rank's (sorted int32 indices, float32 values): k distinct uniform random indices."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + rank) % 2**64)  # what it takes
    idx = torch.randperm(numel, generator=g)[:k].sort().values.to(torch.int32)
    return idx, torch.randn(k, generator=g)


def _time_point(fn, reps: int, warmup: int, min_time: float = 0.0, max_reps: int = 0) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then timed in lock step; each time is the slowest
    rank's.

    Timing stops after ``reps`` runs once they add up to ``min_time`` seconds, or at ``max_reps``
    runs: a short call is timed more often, so its median is as steady as a long call's. Every
    rank decides on the same all-reduced times, so all stop together.

    Each run's CPU time, summed over the ranks (``cpu_s``; each process's, its communication
    threads' included), says how busy the call kept the host's cores (:func:`host_busy`).
    """
    import torch
    import torch.distributed as dist

    max_reps = max(reps, max_reps)
    times, cpus, sent, recv, untimed = [], [], [], [], []
    done = -warmup
    while done < reps or (sum(times) < min_time and done < max_reps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        s, r = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats = torch.tensor([wall, float(s), float(r)], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        cpu_sum = torch.tensor([cpu], dtype=torch.float64)
        dist.all_reduce(cpu_sum)
        if done >= 0:
            times.append(stats[0].item())
            cpus.append(cpu_sum.item())
            sent.append(int(stats[1].item()))
            recv.append(int(stats[2].item()))
        else:
            untimed.append(stats[0].item())
        done += 1
    return {
        "warmup_s": untimed,  # a stateful collective's first call sets its state up
        "times_s": times,
        "median_s": statistics.median(times),
        "cpu_s": cpus,
        "bytes_sent_max": max(sent),
        "bytes_recv_max": max(recv),
    }


# From this share of the host's cores kept busy on, a point measures the host more than the
# network: its ranks' CPU work, not the links, sets its time.
HOST_BOUND = 0.8


def host_busy(record: dict[str, Any], cores: int | None) -> float | None:
    """The share of the host's ``cores`` a point kept busy: its ranks' summed CPU seconds over
    ``cores`` times its wall seconds (medians of the timed runs; 1.0 is every core busy for the
    whole call). None for a run that recorded no CPU time (before 2026-12-04) or no cores."""
    cpus = record.get("cpu_s")
    if not cpus or not cores or record["median_s"] <= 0:
        return None
    return statistics.median(cpus) / (cores * record["median_s"])


def _add_pass(merged: dict[tuple, dict[str, Any]], key: tuple, base: dict, rec: dict) -> None:
    """Add one pass's timing of a point to ``merged`` (kept in insertion order): the times of
    every pass pooled, the median taken over them all, each pass's median kept apart
    (``pass_medians``), the byte counts the largest seen."""
    if key not in merged:
        merged[key] = {**base, **rec, "pass_medians": [rec["median_s"]]}
        return
    m = merged[key]
    m["times_s"] = m["times_s"] + rec["times_s"]
    m["cpu_s"] = (m.get("cpu_s") or []) + (rec.get("cpu_s") or [])
    m["warmup_s"] = m["warmup_s"] + rec["warmup_s"]
    m["pass_medians"] = m["pass_medians"] + [rec["median_s"]]
    m["median_s"] = statistics.median(m["times_s"])
    m["bytes_sent_max"] = max(m["bytes_sent_max"], rec["bytes_sent_max"])
    m["bytes_recv_max"] = max(m["bytes_recv_max"], rec["bytes_recv_max"])


def _passes_done(records: list[dict[str, Any]]) -> int:
    """The passes every record finished (0 for a run without ``pass_medians``)."""
    return min((len(r.get("pass_medians") or []) for r in records), default=0)


def _pass_agreement(records: list[dict[str, Any]], within: float = 0.2) -> dict[str, Any] | None:
    """How closely the passes of a ``--passes`` run repeat: over the measurements (dense once
    a size), the points whose largest pass median is within ``within`` of their smallest, and
    the largest spread (largest / smallest); None for a run of one pass. Only the passes that
    every point finished count (a partial file's last pass is unfinished)."""
    points = _points(records)
    passes = _passes_done(points)
    if passes < 2:
        return None
    spreads = []
    for r in points:
        medians = r["pass_medians"][:passes]
        spreads.append((max(medians) / min(medians), r))
    worst, r = max(spreads, key=lambda x: x[0])
    return {
        "passes": passes,
        "within": within,
        "points_within": sum(x <= 1 + within for x, _ in spreads),
        "n_points": len(spreads),
        "largest_spread": worst,
        "largest_at": [r["algorithm"], r["numel"], r["density"]],
    }


def _print_pass_agreement(agreement: dict[str, Any]) -> None:
    a = agreement
    alg, n, d = a["largest_at"]
    print(
        f"the {a['passes']} passes' medians agree within {a['within']:.0%} on "
        f"{a['points_within']} of {a['n_points']} points (largest spread "
        f"{a['largest_spread']:.2f}x: {alg} at {n:,} and {d:g})"
    )


def worker_main(config_path: str) -> int:
    """Time the configured collectives on this rank (joined from RANK/WORLD_SIZE/MASTER_*)."""
    import torch
    import torch.distributed as dist

    from sparsetrain.comm import get_collective, p2p, ring_allreduce_bytes

    load_collectives()
    torch.set_num_threads(1)
    cfg = json.loads(Path(config_path).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    records: list[dict[str, Any]] = []
    colls = {name: get_collective(name) for name in cfg["algorithms"] if name != DENSE}
    points = [(n, d) for n in cfg["sizes"] for d in cfg["densities"]]
    timing = (cfg["reps"], cfg["warmup"], cfg.get("min_time", 0.0), cfg.get("max_reps", 0))
    passes = cfg.get("passes", 1)
    merged: dict[tuple, dict[str, Any]] = {}

    def finished() -> list[dict[str, Any]]:
        if passes > 1:
            return list(merged.values())
        return [{k: v for k, v in r.items() if k != "pass_medians"} for r in merged.values()]

    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=passes * len(points) * len(cfg["algorithms"]), desc="collectives",
                   unit="pt")  # fmt: skip
    # With --passes, the whole sweep runs again and again: a slow spell of the machine then
    # lands in one pass of each point, not in all the runs of the points it meets.
    p2p.TREE_FROM = cfg.get("tree_from", p2p.TREE_FROM)  # for this worker process
    for _ in range(passes):
        for numel in cfg["sizes"]:
            if DENSE in cfg["algorithms"]:
                x = torch.randn(numel)

                def dense(x=x, numel=numel):
                    dist.all_reduce(x)
                    b = ring_allreduce_bytes(numel, 4, world)
                    return b, b

                rec = _time_point(dense, *timing)
                for density in cfg["densities"]:
                    base = {"algorithm": DENSE, "numel": numel, "density": density}
                    _add_pass(merged, (DENSE, numel, density), base, rec)
                    if bar:
                        bar.update()
                if rank == 0:  # kept too (a dense-only run had never written a partial file)
                    _write_json(Path(cfg["records_path"]), finished())
                del x
            for density in cfg["densities"]:
                k = max(1, min(numel, int(round(density * numel))))
                idx, val = _sparse_input(numel, k, rank, cfg["seed"])
                for name, coll in colls.items():
                    key = f"{numel}/{density}"

                    def sparse(coll=coll, idx=idx, val=val, numel=numel, key=key):
                        res = coll(idx, val, numel, key=key)
                        return res.bytes_sent, res.bytes_recv

                    rec = _time_point(sparse, *timing)
                    base = {"algorithm": name, "numel": numel, "density": density, "k": k}
                    _add_pass(merged, (name, numel, density), base, rec)
                    if bar:
                        bar.set_postfix_str(f"{name} n={numel} d={density}")
                        bar.update()
                    if rank == 0:  # keep partial results if a later point fails
                        _write_json(Path(cfg["records_path"]), finished())
    records.extend(finished())
    if rank == 0:
        _write_json(Path(cfg["records_path"]), records)
    if bar:
        bar.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


PROBE_MIN = 1_000_000
MAX_REPS = 25  # --max-reps' default (or --reps, where that is more)
# Ranks a core up to which the cost model was checked: fitted at 8 ranks on 2 cores, it
# predicted 16 ranks 21-95% of points within 25% (8-rank runs predict each other 42-95%), and
# 32 ranks (16 a core) 53-89% (docs/collectives.md, 'Other numbers of ranks').
RANKS_PER_CORE_MODELLED = 8
BENCH_TMP_PREFIX = "sparsetrain-bench-"


def _size_label(numel: int) -> str:
    """A file-name label for a vector size: 25M, 100k, or the count (distinct sizes differ)."""
    if numel % 10**6 == 0:
        return f"{numel // 10**6}M"
    if numel % 1000 == 0:
        return f"{numel // 1000}k"
    return str(numel)


def _out_folder_problem(out: Path) -> str | None:
    """Return why the folder ``out`` could not be made or written to, or None; creates nothing
    (the folder is made when there is something to write)."""
    existing = out
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as e:  # a folder above it that this user may not look into
        return f"cannot read {e.filename or existing} ({e.strerror})"
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into {existing}"
    try:  # root passes os.access everywhere, also on /proc and read-only mounts: write there
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot write into {existing} ({e.strerror})"
    return None


def _write_out(path: Path, text: str) -> bool:
    """Write ``text`` to ``path``, making its folder first; say so and return False if that
    fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        print(f"sparsetrain bench cluster: cannot write {path} ({e})", file=sys.stderr)
        return False
    return True


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file of its own, renamed over it,
    so that ``path`` holds the old text or the new, never part of it (through a link, the file
    it names, whose permissions stay); the temporary file is removed if the write fails."""
    target = path.resolve()
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        if target.exists():
            shutil.copymode(target, tmp)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- parent: builds the cluster, runs the workers, reports ---------------------------------
def _csv(text: str, parse, what: str) -> list:
    try:
        items = [parse(x.strip()) for x in text.split(",") if x.strip()]
    except (ValueError, TypeError) as e:
        raise ValueError(f"--{what}: {e}") from None
    if not items:
        raise ValueError(f"--{what} lists nothing")
    return items


def _density(text: str) -> float:
    d = float(text)
    if not 0 < d <= 1:
        raise ValueError(f"density must be in (0, 1], got {text}")
    return d


def plot_times(
    records: list[dict[str, Any]], out_dir: Path, title: str, stem: str = "cluster"
) -> list[Path]:
    """Draw time against density, one line per algorithm, one PNG per vector size."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    paths = []
    for numel in sorted({r["numel"] for r in records}):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        rows = [r for r in records if r["numel"] == numel]
        for algo in dict.fromkeys(r["algorithm"] for r in rows):
            pts = sorted((r["density"], r["median_s"]) for r in rows if r["algorithm"] == algo)
            # (dense with a marker too: a single density drew its one-point line as nothing)
            style = (
                {"color": "black", "linestyle": "--", "marker": "s"}
                if algo == DENSE
                else {"marker": "o"}
            )
            ax.plot(*zip(*pts), label=algo, **style)
        ax.set(xscale="log", yscale="log", xlabel="density (k / n)", ylabel="time (s), median")
        ax.set_title(f"{title}\n{numel / 1e6:g}M float32 elements")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}_{_size_label(numel)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _table(records: list[dict[str, Any]], predicted: dict | None, cores: int | None = None) -> str:
    """The run's points, one a line, with the model's times where ``predicted``, each pass's
    spread where the run had several, and each point's share of the ``cores`` kept busy where
    the run recorded CPU times, followed then by a line on the busiest points."""
    dense = {(r["numel"], r["density"]): r["median_s"] for r in records if r["algorithm"] == DENSE}
    gather = {
        (r["numel"], r["density"]): r["median_s"] for r in records if r["algorithm"] == "allgather"
    }
    passes = any(len(r.get("pass_medians") or []) > 1 for r in records)
    head = f"{'algorithm':<11}{'numel':>10}{'density':>9}{'median s':>10}{'MB sent':>9}"
    head += f"{'vs dense':>10}{'vs allgather':>13}" + (
        f"{'model s':>9}{'err':>7}" if predicted else ""
    )
    head += f"{'passes':>9}" if passes else ""  # largest / smallest pass median
    busy = {id(r): host_busy(r, cores) for r in records}
    show_busy = any(b is not None for b in busy.values())
    head += f"{'host':>6}" if show_busy else ""  # share of the cores the call kept busy
    lines = [head]
    for r in records:
        key = (r["numel"], r["density"])
        row = f"{r['algorithm']:<11}{r['numel']:>10}{r['density']:>9g}{r['median_s']:>10.4f}"
        row += f"{r['bytes_sent_max'] / 1e6:>9.2f}"
        row += f"{dense[key] / r['median_s']:>9.2f}x" if key in dense else f"{'':>10}"
        row += f"{gather[key] / r['median_s']:>12.2f}x" if key in gather else f"{'':>13}"
        if predicted:
            p = predicted.get((r["algorithm"], r["numel"], r["density"]))
            if p is not None:
                row += f"{p:>9.4f}{(p - r['median_s']) / r['median_s']:>+7.0%}"
            else:
                row += f"{'':>16}"
        medians = r.get("pass_medians") or []
        if passes:
            row += f"{max(medians) / min(medians):>8.2f}x" if len(medians) > 1 else f"{'':>9}"
        if show_busy:
            row += f"{busy[id(r)]:>6.0%}" if busy[id(r)] is not None else f"{'':>6}"
        lines.append(row)
    note = _host_note(records, cores)
    return "\n".join(lines + ([note] if note else []))


def _host_note(records: list[dict[str, Any]], cores: int | None) -> str | None:
    """A line on the points that kept the host's cores busy (:data:`HOST_BOUND`), or None for a
    run without CPU times."""
    busy = [(b, r) for r in _points(records) if (b := host_busy(r, cores)) is not None]
    if not busy:
        return None
    bound = [(b, r) for b, r in busy if b >= HOST_BOUND]
    top, r = max(busy, key=lambda x: x[0])
    where = f"{r['algorithm']} at {r['numel']:,} and {r['density']:g}"
    if not bound:
        return (
            f"host: no point kept the {cores} cores {HOST_BOUND:.0%} busy (the busiest "
            f"{top:.0%}: {where})"
        )
    return (
        f"host: {len(bound)} of {len(busy)} points kept the {cores} cores at least "
        f"{HOST_BOUND:.0%} busy (the busiest {top:.0%}: {where}); there the ranks' CPU work, "
        "not the links, sets the time"
    )


def _predict_records(
    records: list[dict[str, Any]],
    world: int,
    params,
    cores: int | None,
    tree_from: int | None = None,
):
    """Return the model's seconds for each modelled record, keyed (algorithm, numel, density),
    with the few-int exchanges in the form the run used (see :func:`_tree_from_of`)."""
    from sparsetrain.comm import p2p

    with p2p.tree_threshold(tree_from):
        return _predicted(records, world, params, cores)


def _predicted(records: list[dict[str, Any]], world: int, params, cores: int | None):
    from sparsetrain import perfmodel

    return {
        (r["algorithm"], r["numel"], r["density"]): perfmodel.predict(
            r["algorithm"],
            world=world,
            numel=r["numel"],
            density=r["density"],
            params=params,
            cores=cores,
        )  # fmt: skip
        for r in records
        if r["algorithm"] in perfmodel.available_models()
    }


def _points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The modelled records, one per measurement. Dense allreduce is timed once a size and
    listed at every density (for the tables and plots); counting each copy would weigh it in
    the fit, and in the share within 25%, as many times as there are densities."""
    from sparsetrain import perfmodel

    seen, out = set(), []
    for r in records:
        if r["algorithm"] not in perfmodel.available_models():
            continue
        dense = r["algorithm"] == DENSE
        key = (DENSE, r["numel"], r["median_s"]) if dense else (r["algorithm"], r["numel"],
                                                                r["density"])  # fmt: skip
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _errors(points: list[dict[str, Any]], predicted: dict) -> dict[str, float]:
    """Relative errors of ``predicted`` against the points' medians: max, median, share <= 25%
    (``points`` as :func:`_points` gives them)."""
    errs = [
        abs(predicted[(r["algorithm"], r["numel"], r["density"])] - r["median_s"]) / r["median_s"]
        for r in points
    ]
    return {
        "max_relative_error": max(errs),
        "median_relative_error": statistics.median(errs),
        "within_25_percent": sum(e <= 0.25 for e in errs) / len(errs),
        "n_points": len(errs),
    }


def _fit_model(
    records: list[dict[str, Any]],
    world: int,
    link_bps: float | None = None,
    cores: int | None = None,
    latency: float = 0.0,
    tree_from: int | None = None,
) -> dict[str, Any] | None:
    from sparsetrain.comm import p2p

    with p2p.tree_threshold(tree_from):
        return _fitted(records, world, link_bps, cores, latency)


def _fitted(
    records: list[dict[str, Any]],
    world: int,
    link_bps: float | None,
    cores: int | None,
    latency: float,
) -> dict[str, Any] | None:
    from sparsetrain import perfmodel

    usable = [r for r in records if r["algorithm"] in perfmodel.available_models()]
    points = _points(usable)
    if len(points) < 3:
        return None
    meas = [
        perfmodel.Measurement(
            r["algorithm"], world, r["numel"], r["density"], r["median_s"], cores=cores
        )  # fmt: skip
        for r in points
    ]
    # The link's rate is measured, so beta is held at it, and its emulated latency is known;
    # the rest is fitted.
    params = perfmodel.fit(
        meas, fixed={"beta": 8.0 / link_bps} if link_bps else None, latency=latency
    )
    predicted = _predicted(usable, world, params, cores)
    return {
        "params": params.as_dict(),
        "predicted": predicted,
        **_errors(points, predicted),
        "beta_from_measured_link": link_bps is not None,
        "cores": cores,
    }


def run_cluster(args: argparse.Namespace) -> int:
    from sparsetrain.cluster import (
        ClusterError,
        ClusterPermissionError,
        ClusterTimeoutError,
        EmulatedCluster,
        check_privileges,
        parse_count,
        parse_duration,
        parse_rate,
    )
    from sparsetrain.comm import p2p

    # Every argument, and root, is checked before anything is built or created: a refused run
    # leaves nothing behind.
    try:
        sizes = _csv(
            args.sizes or (FULL_SIZES if args.full else DEFAULT_SIZES), parse_count, "sizes"
        )
        too_big = [n for n in sizes if n > MAX_NUMEL]
        if too_big:
            raise ValueError(
                f"--sizes: at most {MAX_NUMEL:,} (2**31 - 1) elements, got {too_big}: the "
                "worker's indices are int32"
            )
        densities = _csv(
            args.densities or (FULL_DENSITIES if args.full else DEFAULT_DENSITIES), _density,
            "densities",
        )  # fmt: skip
        # k = density * n entries a rank must be at least one, or the point would run (and be
        # recorded and fitted) at another density than the one asked for.
        empty = [(d, n) for n in sizes for d in densities if round(d * n) < 1]
        if empty:
            d, n = empty[0]
            raise ValueError(
                f"--densities: {d:g} keeps no entry of a {n:,}-element vector; the smallest "
                f"density for it is {1 / n:.3g}"
            )
        known = [DENSE, *load_collectives()]
        algorithms = _csv(args.algorithms, str, "algorithms") if args.algorithms else known
        unknown = sorted(set(algorithms) - set(known))
        if unknown:
            raise ValueError(f"--algorithms: unknown {unknown}; valid names: {', '.join(known)}")
        if args.reps < 1 or args.warmup < 0:
            raise ValueError("--reps must be >= 1 and --warmup >= 0")
        if not args.min_time >= 0:
            raise ValueError(f"--min-time must be >= 0 seconds, got {args.min_time}")
        if args.max_reps is None:
            args.max_reps = max(args.reps, MAX_REPS)
        elif args.max_reps < args.reps:
            raise ValueError(
                f"--max-reps must be at least --reps ({args.reps}), got {args.max_reps}"
            )
        if args.passes < 1:
            raise ValueError(f"--passes must be >= 1, got {args.passes}")
        if not args.timeout > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
        if args.probe_bytes < PROBE_MIN:
            raise ValueError(
                f"--probe-bytes must be at least {PROBE_MIN:,} (a smaller transfer times its "
                f"start-up, not the link), got {args.probe_bytes}"
            )
        if args.name is not None and (
            not args.name.strip() or any(sep and sep in args.name for sep in (os.sep, os.altsep))
        ):
            raise ValueError(
                f"--name must be a non-empty file stem without a path separator, got "
                f"{args.name!r} (use --out for the folder)"
            )
        for option, parse, text in (("--bandwidth", parse_rate, args.bandwidth),
                                    ("--latency", parse_duration, args.latency)):  # fmt: skip
            try:
                parse(text)
            except ValueError as e:
                raise ValueError(f"{option}: {e}") from None
        # Every rank holds at least the dense float32 vector of the largest size.
        problem = too_many_processes(
            args.ranks, f"--ranks {args.ranks}", 4 * max(sizes), remedy="or smaller --sizes"
        )
        if problem:
            raise ValueError(problem)
        out = Path(args.out)
        problem = _out_folder_problem(out)
        if problem:
            raise ValueError(f"--out {out}: {problem}")
        stem = args.name or f"cluster_{args.ranks}r_{args.bandwidth}"
        taken = [out / f"{stem}{end}" for end in (".json", ".partial.json")]
        for path in taken:  # (written after the whole sweep: the run had been lost)
            if path.is_dir():
                raise ValueError(f"--out {out}: {path} is a folder, where the results go")
        cluster = EmulatedCluster(
            args.ranks, args.bandwidth, args.latency, latency_via=args.latency_via
        )
    except (ValueError, TypeError) as e:
        args._parser.error(str(e))
    try:
        check_privileges()
    except ClusterPermissionError as e:
        print(f"sparsetrain bench cluster: {e}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix=f"{BENCH_TMP_PREFIX}{os.getpid()}-"))
    try:
        cfg = {"sizes": sizes, "densities": densities, "algorithms": algorithms,
               "reps": args.reps, "warmup": args.warmup, "min_time": args.min_time,
               "max_reps": args.max_reps, "passes": args.passes, "seed": args.seed,
               "few_ints": args.few_ints, "tree_from": p2p.tree_from(args.few_ints),
               "records_path": str(tmp / "records.json")}  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(cfg))
        os.chmod(tmp, 0o755)
        print(
            f"sparsetrain bench cluster: {args.ranks} ranks, {args.bandwidth} links, "
            f"{args.latency} latency; sizes {sizes}, densities {densities}; "
            f"{', '.join(algorithms)}"
            + ("" if args.few_ints == "auto" else f"; few-int exchanges: {args.few_ints}")
        )
        started = time.time()
        env = environment()
        link = None
        cores = machine_cores()
        if args.ranks > RANKS_PER_CORE_MODELLED * cores:
            print(
                f"sparsetrain bench cluster: warning: {args.ranks} ranks share "
                f"{cores} core{'s' if cores != 1 else ''} ({args.ranks / cores:g} a core); "
                f"the cost model was checked up to {RANKS_PER_CORE_MODELLED} ranks a core "
                "(at 16 a core it predicted 53-89% of points within 25%), and such times "
                "measure this machine's CPU and scheduling more than the links (the table's "
                "'host' column; docs/collectives.md, 'Other numbers of ranks')",
                file=sys.stderr,
            )
        config = {
            **{k: v for k, v in cfg.items() if k != "records_path"},
            "ranks": args.ranks,
            "bandwidth": args.bandwidth,
            "latency": args.latency,
            "latency_via": args.latency_via,
            "cores": cores,
        }  # fmt: skip
        try:
            with cluster:
                # --timeout bounds the link probes and the timed collectives together.
                deadline = time.monotonic() + args.timeout

                def left() -> float:
                    return max(0.0, deadline - time.monotonic())

                link = {
                    "bandwidth_configured_bps": cluster.bandwidth_bps,
                    "bandwidth_measured_bps": cluster.measure_bandwidth(
                        0, 1, args.probe_bytes, timeout=left()
                    ),
                    "latency_configured_s": cluster.latency_s,
                    "latency_emulated": cluster.latency_emulated,
                    "latency_method": cluster.latency_method,
                    "rtt_measured_s": cluster.measure_rtt(0, 1, timeout=left()),
                    "burst_bytes": cluster.burst_bytes,
                    "gso_max_size": cluster.gso_max_size,
                }
                print(
                    f"link: {link['bandwidth_measured_bps'] / 1e9:.3f} Gbit/s measured (TCP "
                    f"bulk), RTT {link['rtt_measured_s'] * 1e6:.0f} us; latency emulated: "
                    f"{link['latency_method'] or 'no'}; token-bucket burst {link['burst_bytes']} B"
                )
                cluster.run(
                    [sys.executable, "-m", "sparsetrain.commands.bench", "--worker", str(tmp / "config.json")],
                    timeout=left(),
                )  # fmt: skip
        except ClusterPermissionError as e:
            print(f"sparsetrain bench cluster: {e}", file=sys.stderr)
            return 2
        except (ClusterError, subprocess.TimeoutExpired) as e:
            # (on a line of its own: rank 0's progress bar ends without one)
            print(f"\nsparsetrain bench cluster: {e}", file=sys.stderr)
            if isinstance(e, ClusterTimeoutError):
                print(
                    f"(--timeout {args.timeout:g} s bounds the link probes and the collectives "
                    "together)",
                    file=sys.stderr,
                )
            _keep_partial(tmp / "records.json", out / f"{stem}.partial.json", config, env, link)
            return 1
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM, SIGHUP: the links are gone
            print(file=sys.stderr)  # (after rank 0's progress bar)
            _keep_partial(tmp / "records.json", out / f"{stem}.partial.json", config, env, link)
            raise
        if not (tmp / "records.json").exists():
            print("sparsetrain bench cluster: the workers wrote no records", file=sys.stderr)
            return 1
        records = json.loads((tmp / "records.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fit = _fit_model(
        records,
        args.ranks,
        link["bandwidth_measured_bps"],
        cores,
        _link_latency(link),
        cfg["tree_from"],
    )
    print(_table(records, fit["predicted"] if fit else None, cores))
    result = {
        "config": config,
        "environment": env,
        "link": link,
        "seconds": time.time() - started,
        "records": records,
    }
    if fit:
        result["model_fit"] = _model_fit_entry(fit)
        _print_fit(fit)
    agreement = _pass_agreement(records)
    if agreement:
        result["pass_agreement"] = agreement
        _print_pass_agreement(agreement)
    if not _write_out(out / f"{stem}.json", json.dumps(result, indent=1)):
        return 1
    pngs = plot_times(records, out, f"{args.ranks} ranks, {args.bandwidth} links", stem)
    print(f"wrote {out / (stem + '.json')} and {', '.join(str(p) for p in pngs)}")
    return 0


def _keep_partial(
    records_path: Path, partial: Path, config: dict, env: dict, link: dict | None
) -> None:
    """Write the points a failed or stopped run finished (rank 0 writes ``records_path``
    after each) to ``partial``, in a results file like a finished run's, so `bench refit`
    reads it too; say where on stderr."""
    try:
        records = json.loads(records_path.read_text())
    except (OSError, ValueError):  # no point finished yet
        return
    text = json.dumps({"config": config, "environment": env, "link": link, "partial": True,
                       "records": records}, indent=1)  # fmt: skip
    if _write_out(partial, text):
        print(f"partial records (the points finished): {partial}", file=sys.stderr)


def _model_fit_entry(fit: dict[str, Any]) -> dict[str, Any]:
    """The ``model_fit`` entry of a results JSON: coefficients, errors and every prediction."""
    return {
        **{k: v for k, v in fit.items() if k != "predicted"},
        "points": [
            {"algorithm": a, "numel": n, "density": d, "predicted_s": p}
            for (a, n, d), p in fit["predicted"].items()
        ],
    }


def _print_fit(fit: dict[str, Any]) -> None:
    prm = fit["params"]
    rate = f"{8 / prm['beta'] / 1e9:.3f} Gbit/s" if prm["beta"] > 0 else "unbounded"
    latency = prm.get("latency", 0.0)
    known = f"; latency {latency * 1e6:g} us a round, known" if latency else ""
    print(
        f"cost model fit ({fit['cores']} shared cores{known}): "
        f"alpha={prm['alpha'] * 1e6:.1f} us/message"
        f"{' (on a core of its own; times the ranks a core)' if fit['cores'] else ''}, "
        f"overhead={prm['overhead'] * 1e6:.1f} us/operation, 1/beta={rate}"
        f"{' (measured link)' if fit['beta_from_measured_link'] else ''}, "
        f"gamma={prm['gamma'] * 1e9:.2f} ns/entry, gamma_dense={prm['gamma_dense'] * 1e9:.3f} "
        f"ns/element, gamma_sort={prm['gamma_sort'] * 1e9:.3f} ns/(entry*log2); median error "
        f"{fit['median_relative_error']:.0%}, max {fit['max_relative_error']:.0%}, "
        f"{fit['within_25_percent']:.0%} of {fit['n_points']} points within 25%"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _record_problem(r: Any) -> str | None:
    """Return what is wrong with one record of a results JSON, or None."""
    if not isinstance(r, dict):
        return f"must be an object, got {r!r:.60}"
    missing = [k for k in ("algorithm", "numel", "density", "median_s", "bytes_sent_max")
               if k not in r]  # fmt: skip
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(r["algorithm"], str):
        return f"algorithm must be a name, got {r['algorithm']!r}"
    if not _is_int(r["numel"]) or r["numel"] < 1:
        return f"numel must be an int >= 1, got {r['numel']!r}"
    if not _is_number(r["density"]) or not 0 < r["density"] <= 1:
        return f"density must be a number in (0, 1], got {r['density']!r}"
    if round(r["density"] * r["numel"]) < 1:  # (as bench cluster refuses such a point)
        return (
            f"density {r['density']:g} keeps no entry of its {r['numel']:,}-element vector "
            f"(bench cluster writes none such: the smallest density for it is "
            f"{1 / r['numel']:.3g})"
        )
    if not _is_number(r["median_s"]) or not 1e-9 <= r["median_s"] < math.inf:
        return f"median_s must be a finite number of seconds >= 1e-9, got {r['median_s']!r}"
    if not _is_number(r["bytes_sent_max"]) or not 0 <= r["bytes_sent_max"] < math.inf:
        return f"bytes_sent_max must be a finite number >= 0, got {r['bytes_sent_max']!r}"
    medians = r.get("pass_medians")
    if medians is not None and not (
        isinstance(medians, list)
        and medians
        and all(_is_number(m) and 1e-9 <= m < math.inf for m in medians)
    ):
        return (
            f"pass_medians must be a list of finite numbers of seconds >= 1e-9, got {medians!r:.60}"
        )
    cpus = r.get("cpu_s")
    if cpus is not None and not (
        isinstance(cpus, list) and all(_is_number(c) and 0 <= c < math.inf for c in cpus)
    ):
        return f"cpu_s must be a list of finite numbers of CPU seconds >= 0, got {cpus!r:.60}"
    return None


def _check_results(result: Any) -> tuple[list, int, float | None, int | None]:
    """Return (records, ranks, measured link rate or None, recorded cores or None) of a parsed
    ``bench cluster`` JSON; raise ValueError naming what is wrong."""
    if not isinstance(result, dict):
        raise ValueError(f"expected a JSON object, got {type(result).__name__}")
    records = result.get("records")
    if not isinstance(records, list):
        raise ValueError(
            f"records must be a list of objects, got {records!r:.60} (is it a JSON written by "
            "`sparsetrain bench cluster`?)"
        )
    for i, r in enumerate(records):
        problem = _record_problem(r)
        if problem:
            raise ValueError(f"records[{i}] {problem}")
    config = result.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"config must be an object holding ranks, got {config!r:.60}")
    world, cores = config.get("ranks"), config.get("cores")
    if not _is_int(world) or world < 2:
        raise ValueError(f"config.ranks must be an int >= 2, got {world!r}")
    if cores is not None and (not _is_int(cores) or cores < 1):
        raise ValueError(f"config.cores must be an int >= 1 (or absent), got {cores!r}")
    form, tree_from = config.get("few_ints"), config.get("tree_from")
    if form is not None and form not in ("auto", "direct", "tree"):
        raise ValueError(f"config.few_ints must be auto, direct or tree (or absent), got {form!r}")
    if tree_from is not None and (not _is_int(tree_from) or tree_from < 2):
        raise ValueError(f"config.tree_from must be an int >= 2 (or absent), got {tree_from!r}")
    link = {} if result.get("link") is None else result["link"]
    if not isinstance(link, dict):
        raise ValueError(f"link must be an object, got {link!r:.60}")
    rate = link.get("bandwidth_measured_bps")
    if rate is not None and (
        not _is_number(rate) or not 0 < rate < math.inf or not math.isfinite(8 / rate)
    ):
        raise ValueError(
            f"link.bandwidth_measured_bps must be a positive number of bits per second (or "
            f"null), got {rate!r}"
        )
    latency = link.get("latency_configured_s")
    if latency is not None and (not _is_number(latency) or not 0 <= latency < math.inf):
        raise ValueError(
            f"link.latency_configured_s must be a finite number of seconds >= 0 (or null), got "
            f"{latency!r}"
        )
    return records, world, rate, cores


def _load_results(
    path: Path, args: argparse.Namespace, fitted: bool = True
) -> tuple[list, int, float | None, int]:
    """Return (records, ranks, measured link rate or None, shared cores) of a ``bench cluster``
    JSON; a file that is not one is an argparse error naming what is wrong. ``--cores`` sets
    the cores of the ``fitted`` run only (the run ``--predict`` names keeps its own)."""
    try:
        records, world, link, cores = _check_results(json.loads(path.read_text()))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        args._parser.error(f"cannot read {path}: {e}")
    if fitted and args.cores is not None:
        cores = args.cores
    if cores is None:
        cores = machine_cores()
        print(f"{path} does not record the cores its ranks shared; assuming this machine's {cores}")
    return records, world, link, cores


def _machines_note(path: Path, other: Path) -> str | None:
    """A warning where two runs' recorded processors differ or are not both recorded: the
    fitted local-work coefficients hold for the processor they were fitted on."""
    cpus = []
    for p in (path, other):
        env = json.loads(p.read_text()).get("environment")
        cpu = env.get("cpu") if isinstance(env, dict) else None
        cpus.append(cpu if isinstance(cpu, str) else None)
    if cpus[0] is not None and cpus[0] == cpus[1]:
        return None
    if None in cpus:
        missing = [str(p) for p, c in zip((path, other), cpus) if c is None]
        verb = "do not record the processor they" if len(missing) == 2 else (
            "does not record the processor it")  # fmt: skip
        return (
            f"note: {' and '.join(missing)} {verb} ran on (runs before the environment entry); "
            "the fitted local-work coefficients hold only on the processor they were fitted on"
        )
    return (
        f"note: the runs ran on different processors ({cpus[0]} in {path}, {cpus[1]} in "
        f"{other}); the fitted local-work coefficients hold only on the one they were fitted on"
    )


def _tree_from_of(path: Path) -> int | None:
    """The ``p2p.TREE_FROM`` a ``bench cluster`` run (checked by :func:`_check_results`) used:
    as recorded; from its forced form where only that is; None (as the code is now) for runs
    from before ``--few-ints``, all of which ran with fewer ranks than today's ``TREE_FROM``."""
    from sparsetrain.comm import p2p

    config = json.loads(path.read_text())["config"]
    if config.get("tree_from") is not None:
        return config["tree_from"]
    form = config.get("few_ints")
    return None if form in (None, "auto") else p2p.tree_from(form)


def _emulated_latency(path: Path) -> float:
    """The one-way latency a ``bench cluster`` run's links added (0 where none was emulated)."""
    return _link_latency(json.loads(path.read_text()).get("link") or {})


def _link_latency(link: dict[str, Any]) -> float:
    """The one-way latency of a results file's ``link`` entry, where it was emulated; else 0."""
    if not link.get("latency_emulated"):
        return 0.0
    latency = link.get("latency_configured_s")
    return float(latency) if isinstance(latency, (int, float)) and latency > 0 else 0.0


def run_refit(args: argparse.Namespace) -> int:
    """Fit the cost model again to the records of an earlier ``bench cluster`` JSON; with
    ``--predict``, check the fitted model on the points of another run it was not fitted to."""
    from sparsetrain import perfmodel
    from sparsetrain.comm import p2p

    if args.predict_as and not args.predict:
        args._parser.error("--predict-as prices --predict's run: give --predict JSON too")
    if args.cores is not None and args.cores < 1:
        args._parser.error(f"--cores must be >= 1, got {args.cores}")
    problem = plot_path_problem(args.plot) if args.plot else None
    if problem:
        args._parser.error(f"--plot {problem}")
    path = Path(args.results)
    records, world, link, cores = _load_results(path, args)
    # The run to predict is read now: a file that cannot be read fails before the fit is printed.
    held_out = _load_results(Path(args.predict), args, fitted=False) if args.predict else None
    if args.only_pass is not None:
        if args.write:
            args._parser.error(
                "--write stores the fit of the file's pooled medians; it cannot be given with "
                "--pass, whose fit is of one pass only"
            )
        records = _one_pass(records, args.only_pass, path, args._parser)
    if link is None and not args.free_beta:
        print(f"{path} records no measured link rate; beta is fitted too (as with --free-beta)")
    fit = _fit_model(
        records,
        world,
        None if args.free_beta else link,
        cores,
        _emulated_latency(path),
        _tree_from_of(path),
    )
    if fit is None:
        from sparsetrain import perfmodel

        unknown = sorted({str(r["algorithm"]) for r in records} - set(perfmodel.available_models()))
        args._parser.error(
            f"{path} has fewer than 3 modelled points"
            + (
                f" (left out: the records of {', '.join(unknown)}, which have no cost model; "
                f"modelled: {', '.join(perfmodel.available_models())})"
                if unknown
                else ""
            )
        )
    print(_table(records, fit["predicted"], cores))
    _print_fit(fit)
    agreement = _pass_agreement(records)
    if agreement:
        _print_pass_agreement(agreement)
    panels = [(f"{path.name}, fitted to it", _error_points(records, fit["predicted"]))]
    if args.write:
        result = json.loads(path.read_text())
        result["model_fit"] = _model_fit_entry(fit)
        try:  # whole or not at all: a full disk must not cut the run's measurements short
            _write_json(path, result)
        except OSError as e:
            args._parser.error(f"--write: cannot write {path} ({e}); it is unchanged")
        print(f"wrote this fit into {path} (its model_fit entry; the measurements are unchanged)")
    if args.predict:
        other = Path(args.predict)
        o_records, o_world, _, o_cores = held_out
        params = perfmodel.NetworkParams(**fit["params"])
        usable = [r for r in o_records if r["algorithm"] in perfmodel.available_models()]
        if not usable:
            args._parser.error(f"{other} has no modelled points")
        # The fitted coefficients hold on links of another latency: each round of the call
        # waits for the other run's latency instead, and nothing else changes.
        note = _machines_note(path, other)
        if note:
            print(f"\n{note}")
        mine, theirs = _emulated_latency(path), _emulated_latency(other)
        if theirs != mine:
            params = replace(params, latency=theirs)
            print(
                f"\nemulated one-way latency: {theirs * 1e6:.0f} us in {other}, "
                f"{mine * 1e6:.0f} us in {path}; predicted with {theirs * 1e6:.0f} us a round"
            )
        shares = [perfmodel.shared_slowdown(w, c) for w, c in ((world, cores), (o_world, o_cores))]
        if shares[0] != shares[1]:
            ratio = shares[1] / shares[0]
            how = f"{ratio:g} times as long" if ratio > 1 else f"{1 / ratio:g} times shorter"
            print(
                f"\nranks a core: {shares[1]:g} in {other} ({o_world} ranks on {o_cores} cores), "
                f"{shares[0]:g} in {path}; each message, and local work that all ranks do at once, "
                f"is priced {how}"
            )
        forms = [
            json.loads(x.read_text())["config"].get("few_ints") or "auto" for x in (path, other)
        ]
        tree_from = _tree_from_of(other)
        if args.predict_as:
            tree_from = p2p.tree_from(args.predict_as)
            print(
                f"\nfew-int exchanges: {forms[1]} in {other}, priced as {args.predict_as} "
                f"(--predict-as); {forms[0]} in {path}, priced in its own"
            )
        elif forms != ["auto", "auto"]:
            print(
                f"\nfew-int exchanges: {forms[1]} in {other}, {forms[0]} in {path}; each run is "
                "priced in its own"
            )
        predicted = _predict_records(usable, o_world, params, o_cores, tree_from)
        fitted_on = {(r["numel"], r["density"]) for r in records}
        print(f"\n{other}, predicted by the model fitted to {path}:")
        print(_table(usable, predicted, o_cores))
        panels.append((f"{other.name}, held out", _error_points(usable, predicted)))
        unseen = [r for r in usable if (r["numel"], r["density"]) not in fitted_on]
        for label, rows in (("all points", usable), ("sizes or densities not fitted on", unseen)):
            if rows:
                e = _errors(_points(rows), predicted)
                print(
                    f"held out, {label}: {e['within_25_percent']:.0%} of {e['n_points']} within 25%, "
                    f"median error {e['median_relative_error']:.0%}, max "
                    f"{e['max_relative_error']:.0%}"
                )
    if args.plot:
        title = (
            f"cost model fitted to {path.name}"
            + (f" (pass {args.only_pass})" if args.only_pass else "")
            + (f", {cores} shared cores" if cores else "")
        )
        try:
            written = plot_model_errors(panels, args.plot, title)
        except OSError as e:
            args._parser.error(f"--plot {args.plot}: cannot write it ({e})")
        print(f"plot: {written}")
    return 0


def _one_pass(records: list[dict[str, Any]], k: int, path: Path, parser) -> list[dict[str, Any]]:
    """The records with each point's median replaced by pass ``k``'s (1-based) of a ``--passes``
    run; an argparse error where the file has no such pass."""
    have = _passes_done(records)
    if not 1 <= k <= have:
        if not any(r.get("pass_medians") for r in records):
            parser.error(f"--pass {k}: {path} was not run with --passes")
        done = "1 pass" if have == 1 else f"{have} passes"
        parser.error(f"--pass {k}: every point of {path} finished {done}; choose 1 to {have}")
    # The CPU times are pooled over the passes: no share of the cores for one pass alone.
    return [{**r, "median_s": r["pass_medians"][k - 1], "cpu_s": None} for r in records]


def _error_points(records: list[dict[str, Any]], predicted: dict) -> list[tuple[str, float, float]]:
    """(algorithm, measured s, modelled s) of each measurement (see :func:`_points`)."""
    usable = [r for r in records if (r["algorithm"], r["numel"], r["density"]) in predicted]
    return [
        (r["algorithm"], r["median_s"], predicted[(r["algorithm"], r["numel"], r["density"])])
        for r in _points(usable)
    ]


def run_cleanup(args: argparse.Namespace) -> int:
    from sparsetrain.cluster import ClusterPermissionError, cleanup

    try:
        removed = cleanup(include_live=args.all)
    except ClusterPermissionError as e:
        print(f"sparsetrain bench cleanup: {e}", file=sys.stderr)
        return 2
    print(f"removed {len(removed)} namespace(s)" + (": " + ", ".join(removed) if removed else ""))
    folders = _stale_folders(include_live=args.all)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    if folders:
        print(f"removed {len(folders)} temporary folder(s): " + ", ".join(map(str, folders)))
    return 0


def _stale_folders(include_live: bool) -> list[Path]:
    """Temporary folders of bench runs and their clusters' logs whose process has exited (all
    of them with ``include_live``): named ``sparsetrain-bench-<pid>-*`` and
    ``st-<pid>-<tag>-logs-*``."""
    from sparsetrain.cluster.netns import _alive

    found = []
    for path in Path(tempfile.gettempdir()).iterdir():
        m = re.fullmatch(rf"(?:{BENCH_TMP_PREFIX}|st-)(\d+)-.*", path.name)
        if not m or not path.is_dir():
            continue
        if path.name.startswith("st-") and "-logs-" not in path.name:
            continue
        if include_live or not _alive(int(m.group(1))):
            found.append(path)
    return sorted(found)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..cluster.netns import LATENCY_VIA

    p = subparsers.add_parser(
        "bench",
        help="benchmarks on an emulated bandwidth-limited cluster (cluster and cleanup need "
        "root), and the cost model refitted to their results",
        description=__doc__.split("\n\n")[0]
        + " `bench refit` fits the cost model to a run's JSON again (no root); `bench cleanup` "
        "removes what crashed runs left behind.",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    c = sub.add_parser(
        "cluster",
        help="time sparse collectives and dense allreduce on emulated shaped links",
        description="Time every sparse collective and dense allreduce on RANKS network "
        "namespaces joined by a bridge, each link shaped by tc (on kernels without netem, "
        "by the cluster's delay switch, which also adds the latency). Needs root.",
    )
    c.add_argument("--ranks", type=int, default=8, help="number of emulated ranks (default 8)")
    c.add_argument(
        "--bandwidth", default="1gbit", help="link rate each way, tc notation (default 1gbit)"
    )
    c.add_argument("--latency", default="100us", help="one-way latency (default 100us)")
    c.add_argument(
        "--latency-via",
        choices=LATENCY_VIA,
        default="auto",
        help="how the latency is made: netem where the kernel has it, else a userspace delay "
        "switch (auto, the default), or one of them (an error where it cannot be used)",
    )
    c.add_argument("--sizes", help=f"vector sizes in elements (default {DEFAULT_SIZES})")
    c.add_argument("--densities", help=f"k/n values (default {DEFAULT_DENSITIES})")
    c.add_argument("--full", action="store_true",
                   help=f"full sweep: sizes {FULL_SIZES}, densities {FULL_DENSITIES}")  # fmt: skip
    c.add_argument(
        "--algorithms",
        help="comma-separated, of dense and the collectives (allgather, dsar, gtopk, oktopk, "
        "ssar_rd, ssar_split); default: all of them",
    )
    c.add_argument(
        "--reps", type=int, default=3, help="timed repetitions a point (median kept; default 3)"
    )
    c.add_argument(
        "--min-time",
        type=float,
        default=0.0,
        help="time a short point more often: repeat it until its timed runs add up to this "
        "many seconds, up to --max-reps (default 0: --reps runs a point)",
    )
    c.add_argument(
        "--max-reps",
        type=int,
        help=f"most timed repetitions a point with --min-time (default {MAX_REPS}, or --reps; "
        "without --min-time a point runs --reps times)",
    )
    c.add_argument(
        "--passes",
        type=int,
        default=1,
        help="run the whole sweep this many times, each point's runs pooled, each pass's median "
        "kept, and report how closely the passes agree (default 1; --timeout covers them all; "
        "a stateful collective such as Ok-Topk keeps its state from pass to pass, as in "
        "training)",
    )
    c.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed repetitions before each point's timed ones, in every pass (default 1)",
    )
    c.add_argument(
        "--few-ints",
        choices=("auto", "direct", "tree"),
        default="auto",
        help="how the collectives exchange their few ints (input agreement, gathers of counts, "
        "and Ok-Topk's small allreduces): auto, as in use (direct sends to every peer below "
        "32 ranks, sparsetrain.comm.p2p.TREE_FROM, log2 p rounds from there on; the default), "
        "or either form at any number of ranks; recorded, and bench refit prices the run's "
        "form",
    )
    c.add_argument(
        "--seed", type=seed_value, default=0, help="seed of the random inputs (default 0)"
    )
    c.add_argument(
        "--probe-bytes",
        type=int,
        default=50_000_000,
        help="bytes of the link's bulk-TCP rate test (default 50000000)",
    )
    c.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds the link probes and the collectives may take together (default 3600)",
    )
    c.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for JSON and PNGs (default benchmarks/results)",
    )
    c.add_argument(
        "--name",
        help="stem of the JSON and PNG files (default cluster_<ranks>r_<bandwidth>; the PNGs "
        "add _<size>)",
    )
    c.set_defaults(func=run_cluster, _parser=c)
    f = sub.add_parser("refit", help="fit the cost model again to a bench cluster JSON")
    f.add_argument("results", help="a JSON written by `bench cluster`")
    f.add_argument("--free-beta", action="store_true", help="fit beta too (default: measured)")
    f.add_argument(
        "--cores",
        type=int,
        help="cores the ranks of RESULTS shared (default: as recorded; the --predict run keeps "
        "its own)",
    )
    f.add_argument(
        "--predict",
        metavar="JSON",
        help="also predict another run's points with this fit (a held-out check)",
    )
    f.add_argument(
        "--predict-as",
        choices=("direct", "tree"),
        help="price --predict's run with its few-int exchanges in this form instead of the one "
        "it ran (to see what the model expects of the other form)",
    )
    f.add_argument(
        "--pass",
        dest="only_pass",
        type=int,
        metavar="K",
        help="fit pass K alone (1 = the first) of a run made with --passes",
    )
    f.add_argument(
        "--plot",
        metavar="PATH",
        help="also draw the model's error against the measured time, with the 25%% band (a "
        ".png, .svg or .pdf file; one panel for RESULTS, one for --predict's run)",
    )
    f.add_argument(
        "--write",
        action="store_true",
        help="store this fit in RESULTS (replaces its model_fit entry, which `simulate --fitted` "
        "reads), for example after the model changed",
    )
    f.set_defaults(func=run_refit, _parser=f)
    k = sub.add_parser(
        "cleanup",
        help="remove namespaces left by crashed cluster runs",
        description="Remove what `bench cluster` runs whose process has exited left behind (a "
        "run killed with SIGKILL cannot tear down): their network namespaces, with the links "
        "and processes in them (the delay switch), and their temporary folders. Needs root, as "
        "the cluster does; runs still in progress are left alone unless --all.",
    )
    k.add_argument(
        "--all",
        action="store_true",
        help="also those of runs still in progress (which then fail)",
    )
    k.set_defaults(func=run_cleanup, _parser=k)
    return p


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: python -m sparsetrain.commands.bench --worker CONFIG (started by the CLI)")
