"""``sparsetrain simulate``: project every collective to large clusters with the cost model.

For each number of ranks and each link bandwidth, prints the modelled time of one gradient
exchange by every algorithm, the winner (the dense ring where none beats it), and its speedup
over dense ring allreduce; with
``--compute`` (e.g. ``--compute 200ms``) also the speedup of a whole training iteration (compute
plus exchange, not overlapped). Coefficients come from the command line or from a ``sparsetrain
bench cluster`` JSON (``--fitted``), whose fitted per-entry compute costs describe the machine
that ran it (its latency and link rates stay those of ``--latency`` and ``--bandwidth``).

Example::

    sparsetrain simulate --ranks 64,256,1024 --bandwidth 10gbit,100gbit --model bert-base
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path

from sparsetrain import perfmodel
from sparsetrain.cluster.units import parse_count, parse_duration, parse_rate
from sparsetrain.plotting import (
    file_path_problem,
    fitted_title,
    legend_outside,
    plot_path_problem,
    save_figure,
)


def _list(text: str, parse, what: str) -> list:
    parts = [x.strip() for x in text.split(",")]
    if parts and not parts[-1]:
        parts.pop()  # one trailing comma, as the other commands' lists take it
    if any(not x for x in parts) and any(parts):  # "8,,16": a value left out?
        raise ValueError(f"--{what} {text!r} has an empty item; separate the values by one comma")
    parts = [x for x in parts if x]
    try:
        items = [parse(x) for x in parts]
    except (ValueError, TypeError) as e:
        raise ValueError(f"--{what}: {e}") from None
    if not items:
        raise ValueError(f"--{what} lists nothing")
    for i, x in enumerate(items):  # a repeated row or column of the table, named as typed
        if x in items[:i]:
            first = parts[items.index(x)]
            same = "more than once" if first == parts[i] else f"twice ({first} and {parts[i]})"
            raise ValueError(f"--{what} lists {parts[i]} {same}")
    return items


def _whole(text: str) -> int:
    """Return a number of ranks written as ``--numel`` is (``1024``, ``1e3``, ``2k``); the
    error says it is not a whole number."""
    try:
        return int(text)  # 0 and negatives too, which the caller names
    except ValueError:
        pass
    try:
        return parse_count(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number (write e.g. 64, 1024 or 1k)") from None


def _option(option: str, parse, text: str):
    """Return ``parse(text)``; an error names ``option``."""
    try:
        return parse(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{option}: {e}") from None


def _ceil3(x: float) -> float:
    """Round ``x`` > 0 up to three significant digits (a bound that can be typed back)."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 2)
    steps = x / unit
    # (1e-9 / 1e-11 is 100.00000000000001 in floats: not a step past 1e-9)
    return math.ceil(steps - 1e-9 * steps) * unit


# Each local-cost option: the NetworkParams.from_link argument it sets, in seconds, and its
# unit in seconds. Left out, the option takes from_link's default (a GPU-class device).
_COEFFICIENTS = {
    "--gamma-ns": ("gamma", 1e-9),
    "--gamma-dense-ns": ("gamma_dense", 1e-9),
    "--gamma-sort-ns": ("gamma_sort", 1e-9),
    "--overhead-us": ("overhead", 1e-6),
}


def _ms(seconds: float, width: int) -> str:
    """Milliseconds in a column of ``width``: fixed point, three significant digits below 1 ms
    (two decimals had printed 0.04 for times a winner's speedup told apart), or exponent form
    when too long."""
    ms = seconds * 1e3
    if abs(ms) < 1:
        return f"{ms:>#{width}.3g}"
    return f"{ms:>{width}.2f}" if abs(ms) < 10 ** (width - 4) else f"{ms:>{width}.3e}"


def _rate(bps: float) -> str:
    """A link rate in the unit that keeps it short: 10Gb/s, 100Mb/s (1e-09Gb/s had pushed the
    columns apart)."""
    for unit, size in (("Tb/s", 1e12), ("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if bps >= size:
            return f"{bps / size:.4g}{unit}"
    return f"{bps:.4g}b/s"


def _times(ratio: float) -> str:
    """A speedup in a column of 9: two decimals, or exponent form when too long."""
    return f"{ratio:>8.2f}x" if ratio < 1e4 else f"{ratio:>8.1e}x"


def _read_fitted(path: str) -> tuple[float, float, float, float]:
    """Return (gamma, gamma_dense, gamma_sort, overhead) of a ``bench cluster`` JSON's fit."""
    expected = ("expected a `sparsetrain bench cluster` JSON whose model_fit.params holds gamma "
                "and gamma_dense (and optionally gamma_sort and overhead)")  # fmt: skip
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--fitted {path}: cannot read it ({e}); {expected}") from None
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ValueError(f"--fitted {path}: not JSON ({e}); {expected}") from None
    fit = result.get("model_fit") if isinstance(result, dict) else None
    params = fit.get("params") if isinstance(fit, dict) else None
    if not isinstance(params, dict):
        raise ValueError(f"--fitted {path}: no model_fit.params; {expected}")
    missing = [name for name in ("gamma", "gamma_dense") if name not in params]
    if missing:
        raise ValueError(
            f"--fitted {path}: model_fit.params lacks {', '.join(missing)}; {expected}"
        )
    values = []
    # Fits written before the sort and overhead terms existed have neither.
    for name in ("gamma", "gamma_dense", "gamma_sort", "overhead"):
        v = params.get(name, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(
                f"--fitted {path}: model_fit.params.{name} must be a finite number >= 0, got {v!r}"
            )
        values.append(float(v))
    return values[0], values[1], values[2], values[3]


def simulate(
    ranks: list[int],
    bandwidths: list[float],
    numel: int,
    density: float,
    latency_s: float,
    gamma: float,
    gamma_dense: float,
    algorithms: list[str],
    compute_s: float = 0.0,
    gamma_sort: float = 1e-10,
    overhead: float = 0.0,
    value_bytes: int = 4,
    index_bytes: int | None = None,
) -> list[dict]:
    """Return one row a (ranks, bandwidth) cell: every algorithm's seconds, winner, speedups.
    ``value_bytes``: of a value on the wire, dense or sparse (2 for float16 or bfloat16
    gradients); ``index_bytes``: of an index, by default the library's (4 below 2**31
    elements, else 8)."""
    if index_bytes is None:
        from ..compressors.base import index_dtype

        index_bytes = index_dtype(numel).itemsize
    sizes = {"value_bytes": value_bytes, "index_bytes": index_bytes}
    rows = []
    for bw in bandwidths:
        params = perfmodel.NetworkParams.from_link(bw, latency_s, gamma, gamma_dense, gamma_sort,
                                                   overhead)  # fmt: skip
        for p in ranks:
            times = {
                a: perfmodel.predict(
                    a, world=p, numel=numel, density=density, params=params, **sizes
                )  # fmt: skip
                for a in algorithms
            }
            dense = perfmodel.predict("dense", world=p, numel=numel, density=1.0, params=params,
                                      **sizes)  # fmt: skip
            # The dense ring competes too: a sparse algorithm slower than it wins nothing.
            best = min(times, key=times.__getitem__)
            best, best_s = (best, times[best]) if times[best] < dense else ("dense", dense)
            rows.append({
                "ranks": p, "bandwidth_bps": bw, "times_s": times, "winner": best,
                "dense_s": dense, "speedup_exchange": dense / best_s,
                "speedup_iteration": (compute_s + dense) / (compute_s + best_s),
            })  # fmt: skip
    return rows


# Each algorithm its own marker and line style: lines that coincide (DSAR and the
# split-allgather below DSAR's switch) stay visible.
# The dense ring alone is dashed.
_STYLES = [("o", "-"), ("s", "-."), ("^", ":"), ("D", "-"), ("v", "-."), ("P", ":"), ("X", "-")]


def plot_projection(rows: list[dict], algorithms: list[str], path: str, title: str) -> Path:
    """Draw the modelled exchange time against the number of ranks, one panel a link rate and
    one line an algorithm (dense ring allreduce dashed black), both axes logarithmic, and save
    it (PNG, SVG or PDF, by the suffix). Where a line lies under the dashed one, that algorithm
    beats dense at that size."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    bandwidths = sorted({r["bandwidth_bps"] for r in rows})
    fig, axes = plt.subplots(
        1, len(bandwidths), figsize=(5 * len(bandwidths) + 1.6, 4.4), squeeze=False,
        sharey=True, layout="constrained",
    )  # fmt: skip
    for ax, bw in zip(axes[0], bandwidths):
        cell = sorted((r for r in rows if r["bandwidth_bps"] == bw), key=lambda r: r["ranks"])
        ranks = [r["ranks"] for r in cell]
        for i, a in enumerate(x for x in algorithms if x != "dense"):
            marker, style = _STYLES[i % len(_STYLES)]
            ax.plot(ranks, [r["times_s"][a] * 1e3 for r in cell], marker=marker, ls=style,
                    label=a, alpha=0.85)  # fmt: skip
        # (A marker too: with one number of ranks the line is a single point.)
        ax.plot(ranks, [r["dense_s"] * 1e3 for r in cell], "k--", lw=2, marker="D", ms=4,
                label="dense ring")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set(xlabel="ranks", title=f"{bw / 1e9:g} Gbit/s links")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("modelled time of one exchange (ms)")
    legend_outside(fig, axes[0])
    fig.suptitle(fitted_title(fig, title))  # one panel's width cut a long title off
    return save_figure(fig, path)


def _run(args: argparse.Namespace) -> int:
    try:
        ranks = _list(args.ranks, _whole, "ranks")
        if any(r < 2 for r in ranks):
            raise ValueError("--ranks: every value must be >= 2 (one rank exchanges nothing)")
        bandwidths = _list(args.bandwidth, parse_rate, "bandwidth")
        for bw in bandwidths:
            if not math.isfinite(8 / bw):  # (a rate parse_rate takes, and beta, 8 / rate)
                raise ValueError(f"--bandwidth {bw:g} bit/s is too small to price a byte")
        if args.numel is not None:
            numel, what = _option("--numel", parse_count, args.numel), f"{args.numel} elements"
        else:
            numel = perfmodel.model_numel(args.model)
            what = f"{args.model} ({numel / 1e6:g}M parameters)"
        if not 0 < args.density <= 1:
            raise ValueError(f"--density must be in (0, 1], got {args.density}")
        if args.density * numel < 1 - 1e-9:  # each rank keeps at least one entry
            raise ValueError(
                f"--density {args.density:g} keeps k = {args.density * numel:.3g} entries of "
                f"{numel:,}; it must keep at least 1: the smallest allowed density for this size "
                f"is {_ceil3(1 / numel):.3g}"
            )
        if max(ranks) > numel:  # the collectives split the vector into a range a rank
            raise ValueError(
                f"--ranks {max(ranks):,} exceeds the vector's {numel:,} elements; the model "
                "prices a range of them a rank: give at most that many ranks"
            )
        algorithms = _list(args.algorithms, str, "algorithms")
        unknown = sorted(set(algorithms) - set(perfmodel.available_models()))
        if unknown:
            raise ValueError(
                f"--algorithms: unknown {unknown}; modelled: {', '.join(perfmodel.available_models())}"
            )
        latency = _option("--latency", parse_duration, args.latency)
        coefficients = {
            "--gamma-ns": args.gamma_ns,
            "--gamma-dense-ns": args.gamma_dense_ns,
            "--gamma-sort-ns": args.gamma_sort_ns,
            "--overhead-us": args.overhead_us,
        }
        given = [option for option, value in coefficients.items() if value is not None]
        if args.fitted and given:
            raise ValueError(
                f"--fitted takes the local costs and the overhead from {args.fitted}; pass "
                f"either it or {', '.join(given)}"
            )
        for option, value in coefficients.items():
            if value is not None and not 0 <= value < math.inf:
                raise ValueError(f"{option} must be a finite number >= 0, got {value}")
        defaults = inspect.signature(perfmodel.NetworkParams.from_link).parameters
        gamma, gamma_dense, gamma_sort, overhead = (
            defaults[name].default if coefficients[o] is None else coefficients[o] * unit
            for o, (name, unit) in _COEFFICIENTS.items()
        )
        if args.fitted:
            gamma, gamma_dense, gamma_sort, overhead = _read_fitted(args.fitted)
        compute_s = _option("--compute", parse_duration, args.compute) if args.compute else 0.0
        problem = plot_path_problem(args.plot) if args.plot else None
        if problem:
            raise ValueError(f"--plot {problem}")
        from .train import replaces_input, same_file, say

        if args.json is not None and not args.json.strip():
            raise ValueError("--json needs a file path, got an empty one")
        problem = file_path_problem(args.json) if args.json else None
        if problem:  # (before the table, as --plot's)
            raise ValueError(f"--json {problem}")
        problem = same_file(json=args.json, plot=args.plot) or replaces_input(
            {"--fitted": args.fitted}, {"json": args.json, "plot": args.plot}
        )
        if problem:
            raise ValueError(problem)
        from ..compressors.base import index_dtype

        index_bytes = index_dtype(numel).itemsize  # the library's: 4, or 8 from 2**31 elements
        rows = simulate(ranks, bandwidths, numel, args.density, latency, gamma, gamma_dense,
                        algorithms, compute_s, gamma_sort, overhead,
                        value_bytes=args.value_bytes, index_bytes=index_bytes)  # fmt: skip
    except (ValueError, TypeError) as e:
        args._parser.error(str(e))
    # (in the milliseconds printed and saved: seconds near float's limit pass it times 1e3)
    times = (t * 1e3 for r in rows for t in (r["dense_s"], *r["times_s"].values()))
    if not all(math.isfinite(t) for t in times):
        args._parser.error(
            "the modelled times overflow: --latency, --bandwidth or a coefficient is far out of "
            "range"
        )
    # (through say(): a closed stdout, `| head`, must not keep --json and --plot from being
    # written)
    say(
        f"sparsetrain simulate: {what}, density {args.density:g} (k = {args.density * numel:,.0f} "
        f"a rank), latency {latency * 1e6:g} us, gamma {gamma * 1e9:.3g} ns/entry, "
        f"gamma_dense {gamma_dense * 1e9:.3g} ns/element, gamma_sort {gamma_sort * 1e9:.3g} "
        f"ns/(entry*log2), overhead {overhead * 1e6:.3g} us/operation"
        + (f", compute {compute_s * 1e3:g} ms/iteration" if compute_s else "")
        + f"; {args.value_bytes}-byte values, {index_bytes}-byte indices"
    )
    head = f"{'ranks':>6} {'link':>9}  " + "".join(f"{a:>11}" for a in algorithms)
    head += f"  {'winner':<10}{'dense ring':>11}{'speedup':>9}" + (
        f"{'iter.':>7}" if compute_s else ""
    )
    say("modelled time of one exchange (ms):")
    say(head)
    for r in rows:
        line = f"{r['ranks']:>6} {_rate(r['bandwidth_bps']):>9}  "
        line += "".join(" " + _ms(r["times_s"][a], 10) for a in algorithms)
        line += f"  {r['winner']:<10} {_ms(r['dense_s'], 10)}{_times(r['speedup_exchange'])}"
        if compute_s:
            line += f"{r['speedup_iteration']:>6.2f}x"
        say(line)
    if args.json:
        local = {"gamma": gamma, "gamma_dense": gamma_dense, "gamma_sort": gamma_sort,
                 "overhead": overhead, "compute_s": compute_s, "value_bytes": args.value_bytes,
                 "index_bytes": index_bytes}  # fmt: skip
        text = json.dumps({"numel": numel, "density": args.density, "latency_s": latency,
                           **local, "rows": rows}, indent=1)  # fmt: skip
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
        except OSError as e:
            args._parser.error(f"--json {args.json}: cannot write it ({e})")
        say(f"json: {args.json}")
    if args.plot:
        title = (f"{what}, density {args.density:g}, latency {latency * 1e6:g} us a message, "
                 f"local work {gamma * 1e9:.3g} ns an entry")  # fmt: skip
        try:
            written = plot_projection(rows, algorithms, args.plot, title)
        except OSError as e:
            args._parser.error(f"--plot {args.plot}: cannot write it ({e})")
        say(f"plot: {written}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate",
        help="project sparse collectives to large clusters with the alpha-beta cost model",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
    )
    p.add_argument("--ranks", default="64,256,1024",
                   help="comma-separated rank counts, 1k = 1000 (default 64,256,1024)")  # fmt: skip
    p.add_argument("--bandwidth", default="10gbit,100gbit",
                   help="link rates, tc notation (default 10gbit,100gbit)")  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default="bert-base",
        choices=sorted(perfmodel.MODEL_PARAMETERS),
        help="preset parameter count (default bert-base; sources in "
        "sparsetrain.perfmodel.MODEL_PARAMETERS)",
    )
    src.add_argument("--numel", help="vector length instead of a preset (e.g. 25M)")
    p.add_argument("--density", type=float, default=0.01, help="k/n of each rank (default 0.01)")
    p.add_argument("--latency", default="5us", help="per-message latency alpha (default 5us)")
    p.add_argument("--gamma-ns", type=float, default=None,
                   help="ns per sparse entry touched: scatter, compare, copy (default 2)")  # fmt: skip
    p.add_argument("--gamma-dense-ns", type=float, default=None,
                   help="ns per dense element streamed (default 0.05)")  # fmt: skip
    p.add_argument(
        "--gamma-sort-ns",
        type=float,
        default=None,
        help="ns per entry and log2 step of a sort (default 0.1: ~2 ns/entry at 1M)",
    )
    p.add_argument(
        "--overhead-us",
        type=float,
        default=None,
        help="software cost per operation issued, us (default 0: part of latency)",
    )
    p.add_argument(
        "--fitted",
        metavar="JSON",
        help="take the local costs (gamma's) and the overhead from a bench cluster JSON; "
        "latency and link rates stay --latency and --bandwidth, and the emulated cluster's "
        "fitted alpha and shared cores are not used: this prices other links with that "
        "machine's local costs (bench refit predicts the emulated cluster itself)",
    )
    p.add_argument("--compute", help="compute time of one iteration (e.g. 200ms) for end-to-end")
    p.add_argument(
        "--value-bytes",
        type=int,
        choices=(2, 4, 8),
        default=4,
        help="bytes of a gradient value on the wire, dense and sparse (default 4: float32; 2: "
        "float16 or bfloat16). Indices take the library's 4 bytes, or 8 from 2**31 elements",
    )
    p.add_argument("--algorithms", default=",".join(perfmodel.available_models()),
                   help="which algorithms to compare (default: all modelled)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.add_argument(
        "--plot",
        metavar="PATH",
        help="also draw the modelled times against the number of ranks, one panel a link rate "
        "(a .png, .svg or .pdf file; give more --ranks for a smoother line)",
    )
    p.set_defaults(func=_run, _parser=p)
    return p


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="sparsetrain")
    register(_p.add_subparsers(required=True))
    _a = _p.parse_args()
    sys.exit(_a.func(_a))
