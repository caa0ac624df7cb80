"""Try variants of the cost model's shared-core terms on stored cluster runs, held out.

The model (``sparsetrain.perfmodel``) multiplies a call's messages and its local work by the
ranks a core (``shared_slowdown``), and nothing else. At 32 emulated ranks on 2 cores it still
makes most calls 15-30% too fast when fitted at 8 ranks (docs/collectives.md, "Other numbers of
ranks"). This script fits each variant below to an 8-rank run and predicts the 16- and 32-rank
runs, side by side, without changing the library:

- ``model``: the model as it is;
- ``ops``: the per-operation cost (a call or a posted message's Python work) multiplied by the
  ranks a core too;
- ``wait``: plus a new coefficient, a wake-up a blocking round of point-to-point messages costs
  for each other rank on its core (a rank whose messages have arrived waits for a core);
- ``ops+wait``: both.

Each variant is fitted as ``perfmodel.fit`` fits (relative errors, non-negative least squares
over every subset of the free coefficients, beta held at the run's measured link rate, the
latency known), with the overlapped reduction taken on the side the run's stored fit puts it.
Prints, for each 8-rank run, each variant's share of points within 25% fitted to itself and
held out on each other run, with the median error.

    .venv/bin/python benchmarks/model_variants.py \\
        --fit cluster_8r_1gbit_1M_cpu cluster_8r_1gbit_passes3 cluster_8r_1gbit_dec04 \\
              cluster_8r_1gbit \\
        --predict cluster_16r_1gbit_1M_cpu cluster_32r_1gbit_1M_cpu cluster_16r_1gbit_1M \\
                  cluster_32r_1gbit_1M
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sparsetrain import perfmodel as pm

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("model", "ops", "wait", "ops+wait")


class _Counter:
    """Counts the blocking point-to-point rounds (``perfmodel._p2p`` calls) of one cost."""

    def __init__(self) -> None:
        self.waits = 0
        self._p2p = pm._p2p

    def __enter__(self) -> _Counter:
        def counted(*args, **kwargs):
            self.waits += 1
            return self._p2p(*args, **kwargs)

        pm._p2p = counted
        return self

    def __exit__(self, *exc) -> None:
        pm._p2p = self._p2p


def _load(name: str) -> tuple[dict, list[tuple]]:
    data = json.loads((RESULTS / f"{name}.json").read_text())
    ranks = data["config"]["ranks"]
    points = [
        (r["algorithm"], ranks, r["numel"], r["density"], r["median_s"]) for r in data["records"]
    ]
    return data, points


def _rows(points, cores: int, variant: str, side: pm.NetworkParams):
    """Each point's counts for ``variant`` (the model's six, and the wake-up count where the
    variant has it), its time and the seconds its known latency explains."""
    rows, ts, known = [], [], []
    for alg, world, numel, density, seconds in points:
        with _Counter() as count:
            c = pm.cost(alg, world=world, numel=numel, density=density, cores=cores)
        share = pm.shared_slowdown(world, cores)
        terms = list(c.bound_terms(side))
        if variant in ("ops", "ops+wait"):
            terms[pm.COEFFICIENTS.index("overhead")] *= share
        if variant in ("wait", "ops+wait"):
            terms.append(count.waits * (share - 1.0))
        rows.append(terms)
        ts.append(seconds)
        known.append(side.latency * c.rounds)
    return np.asarray(rows, float), np.asarray(ts, float), np.asarray(known, float)


def _fit(a: np.ndarray, t: np.ndarray, known: np.ndarray, beta: float) -> np.ndarray:
    """``perfmodel.fit``'s solver on these columns, beta held at the measured link's."""
    return pm.nnls_relative(a, t, known, {pm.COEFFICIENTS.index("beta"): beta})


def _within(a, t, known, coef) -> tuple[float, float]:
    """(share of points within 25%, median relative error)."""
    err = np.abs(a @ coef + known - t) / t
    return float(np.mean(err <= 0.25)), float(np.median(err))


def _cell(score: tuple[float, float]) -> str:
    return f"{score[0]:4.0%} ({score[1]:3.0%})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fit", nargs="+", required=True, help="8-rank runs (names in results/)")
    p.add_argument("--predict", nargs="+", required=True, help="runs to predict, held out")
    args = p.parse_args()
    print("share of points within 25% (median error); fitted to itself, then held out")
    header = ["fit", "variant", "itself", *args.predict, "wake us", "o us"]
    print(" | ".join(header))
    held: dict[str, list[list[float]]] = {v: [[] for _ in args.predict] for v in VARIANTS}
    for name in args.fit:
        data, points = _load(name)
        side = pm.NetworkParams(**data["model_fit"]["params"])
        cores = int(data["model_fit"].get("cores") or data["config"]["cores"])
        for variant in VARIANTS:
            a, t, known = _rows(points, cores, variant, side)
            coef = _fit(a, t, known, side.beta)
            cells = [name, variant, _cell(_within(a, t, known, coef))]
            for i, other in enumerate(args.predict):
                odata, opoints = _load(other)
                ocores = int(odata["model_fit"].get("cores") or odata["config"]["cores"])
                score = _within(*_rows(opoints, ocores, variant, side), coef)
                held[variant][i].append(score[0])
                cells.append(_cell(score))
            wake = f"{coef[6] * 1e6:.0f}" if len(coef) > 6 else "-"
            cells += [wake, f"{coef[pm.COEFFICIENTS.index('overhead')] * 1e6:.0f}"]
            print(" | ".join(cells))
    print("mean share within 25% over the fits, held out:")
    for variant in VARIANTS:
        means = [f"{other} {np.mean(s):.0%}" for other, s in zip(args.predict, held[variant])]
        print(f"  {variant:9s} " + ", ".join(means))


if __name__ == "__main__":
    main()
