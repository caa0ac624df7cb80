"""Real gloo ranks: robust aggregation through sparsetrain.sync.robust_exchange.

Four ranks train a small classifier; the last rank attacks by sending its gradient sign-flipped
and scaled by 10. Median and SafeguardSGD must still train; the plain mean must not.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsetrain.robust import get_aggregator, get_attack
from sparsetrain.sync.robust_exchange import robust_exchange

WORLD = 4
STEPS = 60
TIMEOUT_S = 90


def _data(seed: int = 0):
    """A linearly separable 3-class problem in 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(3, 8, generator=g)
    y = torch.randint(3, (900,), generator=g)
    x = centers[y] + torch.randn(900, 8, generator=g)
    return x[:600], y[:600], x[600:], y[600:]


CASES = [
    ("mean", {}, None, {}),
    ("mean", {}, "sign_flip", {"scale": 10.0}),
    ("median", {}, "sign_flip", {"scale": 10.0}),
    ("safeguard", {"window0": 5, "window1": 20}, "sign_flip", {"scale": 10.0}),
]


def _probe_alie(rank):
    """Each rank sends rank + 1 everywhere; rank 3 runs ALIE (z=1) over the honest rows 1, 2, 3."""
    rule = get_aggregator("mean", n=WORLD, f=1)
    atk = get_attack("alie", n=WORLD, f=1, z=1.0)
    out, sent = robust_exchange(
        torch.full((5,), rank + 1.0), key="p", aggregator=rule, attack=atk, byzantine=1
    )
    return out.tolist(), sent


def _train(rank, aggregator, agg_opts, attack, attack_opts):
    xtr, ytr, xte, yte = _data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rule = get_aggregator(aggregator, n=WORLD, f=1, **agg_opts)
    atk = get_attack(attack, n=WORLD, f=1, **attack_opts) if attack else None
    gen = torch.Generator().manual_seed(100 + rank)
    shapes = [p.shape for p in model.parameters()]
    for step in range(STEPS):
        idx = torch.randint(len(ytr), (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        split = shapes[0].numel() + shapes[1].numel()
        outs = []
        # two buckets, as DDP would send them, to exercise per-key state
        for key, part in (("b0", flat[:split]), ("b1", flat[split:])):
            out, sent = robust_exchange(
                part, key=key, aggregator=rule, attack=atk, byzantine=1 if atk else 0, step=step
            )
            assert sent > 0
            outs.append(out)
        rule.end_step()
        upd = torch.cat(outs)
        ref = upd.clone()
        dist.broadcast(ref, src=0)
        assert torch.equal(ref, upd), "ranks disagree on the aggregate"
        offset = 0
        for p, s in zip(model.parameters(), shapes):
            p.grad = upd[offset : offset + s.numel()].view(s).clone()
            offset += s.numel()
        opt.step()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
        finite = all(torch.isfinite(p).all() for p in model.parameters())
    return (acc if finite else 0.0), rule.stats()


def _worker(rank, store_path, results):
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, WORLD)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
        out = {"probe": _probe_alie(rank)}
        for i, case in enumerate(CASES):
            out[i] = _train(rank, *case)
        results.put((rank, "ok", out))
        dist.destroy_process_group()
    except Exception:  # report the failure to the parent on every rank, never hang
        results.put((rank, "error", traceback.format_exc()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = str(tmp_path_factory.mktemp("robust") / "store")
    procs = [ctx.Process(target=_worker, args=(r, store, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(WORLD):
            rank, status, value = results.get(timeout=TIMEOUT_S)
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


@pytest.mark.slow
def test_scaled_sign_flip_breaks_mean_but_not_median_or_safeguard(runs):
    clean, mean, median, sg = (runs[0][i] for i in range(len(CASES)))
    assert clean[0] > 0.9
    assert mean[0] < 0.6, f"the plain mean should fail under a -10x flip, got {mean[0]:.3f}"
    assert median[0] > 0.9, f"median under attack: {median[0]:.3f}"
    assert sg[0] > 0.9, f"safeguard under attack: {sg[0]:.3f}"
    assert sg[1]["removed"].keys() == {3}, sg[1]
    # every rank reached the same model and the same good set
    for r in range(WORLD):
        assert runs[r][3][0] == sg[0]
        assert runs[r][3][1]["good"] == [0, 1, 2]


@pytest.mark.slow
def test_omniscient_attack_second_round_delivers_the_forged_row(runs):
    # honest rows 1, 2, 3: mean 2, std 1, so ALIE with z=1 sends 1; the mean is (1+2+3+1)/4
    for r in range(WORLD):
        out, sent = runs[r]["probe"]
        assert out == pytest.approx([1.75] * 5)
        # the check's 6 int64 a rank; round 1: (p-1)/p of 4 rows of 5 float32; round 2: one
        # broadcast of 5 float32
        assert sent == round(3 / 4 * 4 * 6 * 8) + round(3 / 4 * 4 * 5 * 4) + round(3 / 4 * 5 * 4)


def _mismatched(rank: int, world: int) -> dict:
    """Each case: rank 2 calls differently from ranks 0 and 1; every rank records its error."""
    rule = get_aggregator("mean", n=world, f=1)
    base = {"key": "b", "aggregator": rule, "byzantine": 1}
    odd = rank == 2
    cases = {
        # 16 bytes either way: read as the other dtype, the rows were garbage without a word
        "dtype": (torch.zeros(2, dtype=torch.float64) if odd else torch.zeros(4), {}),
        "size": (torch.zeros(3 if odd else 4), {}),
        "key": (torch.zeros(4), {"key": "c" if odd else "b"}),
        # an omniscient attack on one rank only: its broadcast was awaited for ever
        "attack": (
            torch.zeros(4),
            {"attack": get_attack("ipm", n=world, f=1) if odd else None},
        ),
        "rule": (
            torch.zeros(4),
            {"aggregator": get_aggregator("median", n=world, f=1)} if odd else {},
        ),  # fmt: skip
    }
    out = {}
    for name, (grad, changes) in cases.items():
        try:
            robust_exchange(grad, **{**base, **changes})
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    # Rank 2 alone is refused (2 Byzantine ranks for an attack of f=1): it had raised at once
    # while the others waited for it in the comparison, then failed in gloo.
    try:
        robust_exchange(
            torch.zeros(4), **{**base, "byzantine": 2 if odd else 1,
                               "attack": get_attack("sign_flip", n=world, f=1)},
        )  # fmt: skip
        out["count"] = None
    except ValueError as e:
        out["count"] = str(e)
    # What an attacker alone refused had raised on it at once, while the honest ranks waited in
    # the gather until the timeout: a key that is not a str (on every rank, or on rank 2 only),
    # Byzantine ranks that are not integers on one rank, and a delayed attack's key whose size
    # changed (4 entries, then 5).
    sign_flip = get_attack("sign_flip", n=world, f=1)
    delayed = get_attack("delayed", n=world, f=1, delay=1)
    robust_exchange(torch.zeros(4), **{**base, "key": "d", "attack": delayed})
    calls = {
        "int key": (torch.zeros(4), {"key": 0, "attack": sign_flip}),
        "int key on 2": (torch.zeros(4), {"key": 0 if odd else "b", "attack": sign_flip}),
        "float ranks on 2": (torch.zeros(4), {"byzantine_ranks": [2.0] if odd else [2]}),
        "delayed size": (torch.zeros(5), {"key": "d", "attack": delayed}),
    }
    for name, (grad, changes) in calls.items():
        try:
            robust_exchange(grad, **{**base, **changes})
            out[name] = None
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    out["agreed"], _ = robust_exchange(torch.full((4,), float(rank)), **base)
    out["agreed"] = out["agreed"].tolist()
    return out


def test_ranks_that_call_the_exchange_differently_raise_on_every_rank(tmp_path):
    """The exchange compared nothing across ranks: the same bytes in another dtype were summed
    as garbage, other sizes aborted a rank in gloo, and an attack on one rank only left the
    Byzantine rank waiting in its broadcast."""
    from .harness import oks, run_world

    names = {
        "dtype": "gradient dtype",
        "size": "gradient size",
        "key": "key",
        "attack": "attack settings",
        "rule": "aggregator settings",
    }
    results = oks(run_world(_mismatched, 3, tmp_path, timeout=120))
    assert "Byzantine ranks" in results[0]["count"] and "ranks [2] differ" in results[0]["count"]
    assert "Byzantine ranks" in results[1]["count"]
    assert "'sign_flip' was built for n=3 workers of which f=1" in results[2]["count"]
    for res in results:
        for case, words in names.items():
            said = res[case]
            assert said and words in said and "ranks [2] differ" in said, (
                case,
                said,
            )
        assert res["agreed"] == [1.0] * 4  # the mean of 0, 1, 2
        assert res["int key"].startswith("TypeError: key must be a str")
    honest, attacker = results[:2], results[2]
    assert attacker["int key on 2"].startswith("TypeError: key must be a str")
    assert attacker["float ranks on 2"].startswith("TypeError: byzantine_ranks must be integers")
    assert attacker["delayed size"] == (
        "ValueError: delayed attack: the gradient of key 'd' changed shape from (1, 4) to (1, 5)"
    )
    for res in honest:
        assert "different key" in res["int key on 2"] and "ranks [2] differ" in res["int key on 2"]
        assert "different Byzantine ranks" in res["float ranks on 2"]
        assert "the attack of Byzantine rank(s) [2] refused this call" in res["delayed size"]
