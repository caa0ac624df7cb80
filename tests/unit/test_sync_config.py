"""Bad options are refused when the hook or GradientSync is built, with messages that help."""

from __future__ import annotations

from types import MappingProxyType

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.compressors import check_floating


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_refused(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        sparsetrain.GradientSync(_model(), "topk", density=density)


def test_unknown_compressor_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        sparsetrain.GradientSync(_model(), "top-k")
    assert "unknown compressor 'top-k'" in str(e.value)
    for name in sparsetrain.available_compressors():
        assert name in str(e.value)


def test_option_the_compressor_does_not_take_is_named():
    with pytest.raises(ValueError, match="does not take option.*levels"):
        sparsetrain.GradientSync(_model(), "topk", levels=4)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"on_nonfinite": "ignore"},
            ValueError,
            r"on_nonfinite must be one of \('raise', 'skip', 'propagate'\)",
        ),
        ({"dense_warmup_steps": -1}, ValueError, "dense_warmup_steps must be an integer >= 0"),
        (
            {"collective": "ring"},
            ValueError,
            "unknown collective 'ring'; valid names are: allgather",
        ),
        ({"byzantine": 1}, ValueError, r"byzantine > 0 needs an attack name \(attack=...\)"),
        # An attack with no attacker ran a clean run under the attack's name.
        (
            {"attack": "sign_flip", "aggregator": "median"},
            ValueError,
            "attack='sign_flip' needs byzantine >= 1, the number of ranks that attack",
        ),
        # Robust aggregation gathers whole gradients: the collective was silently dropped.
        (
            {"aggregator": "median", "collective": "oktopk"},
            ValueError,
            "collective='oktopk' would not run with aggregator='median'",
        ),
        (
            {"attack": "zero", "byzantine": 1, "collective": "auto"},
            ValueError,
            "collective='auto' would not run with attack='zero'",
        ),
        ({"error_feedback": 0}, TypeError, "error_feedback must be True, False or None, got 0"),
        (
            {"aggregator_options": {"trim": 1}},
            ValueError,
            "aggregator_options given without an aggregator",
        ),
        ({"bucket_cap_mb": float("nan")}, ValueError, "bucket_cap_mb must be a finite number > 0"),
        # A string is the wrong type: a TypeError, as for density="0.1" (it was a ValueError).
        (
            {"bucket_cap_mb": "25"},
            TypeError,
            "bucket_cap_mb must be a finite number > 0, got '25'",
        ),
    ],
)
def test_bad_sync_options(options, error, message):
    with pytest.raises(error, match=message) as exc:
        sparsetrain.GradientSync(_model(), "topk", density=0.1, **options)
    assert type(exc.value) is error


def test_scaled_randomk_with_error_feedback_is_refused():
    # The n/k scaling leaves (1 - n/k) times each sent value in the residual, which then grows
    # without bound; random-k with memory (Stich et al.) sends the values unscaled.
    with pytest.raises(ValueError, match="pass scale=False"):
        sparsetrain.SyncConfig(compressor="randomk", error_feedback=True)
    cfg = sparsetrain.SyncConfig(
        compressor="randomk", error_feedback=True, compressor_options={"scale": False}
    )
    assert cfg.use_error_feedback
    assert not sparsetrain.SyncConfig(compressor="randomk").use_error_feedback


@pytest.mark.parametrize(
    "robust", [{"aggregator": "mean"}, {"attack": "sign_flip", "byzantine": 1}]
)
def test_majority_vote_is_refused_where_the_robust_path_would_skip_it(robust):
    # The robust path averages the ranks' decoded scaled signs: one large rank then set the
    # direction of every entry, which the vote is there to prevent.
    vote = {"compressor": "signsgd", "compressor_options": {"majority_vote": True}}
    with pytest.raises(ValueError, match="majority_vote does not combine with an aggregator"):
        sparsetrain.SyncConfig(**vote, **robust)
    frozen = {**vote, "compressor_options": MappingProxyType({"majority_vote": True})}
    with pytest.raises(ValueError, match="majority_vote does not combine with an aggregator"):
        sparsetrain.SyncConfig(**frozen, **robust)  # any mapping of options
    sparsetrain.SyncConfig(compressor="signsgd", **robust)  # the plain scaled sign can
    sparsetrain.SyncConfig(**vote)


@pytest.mark.parametrize(
    "robust", [{"aggregator": "median"}, {"attack": "sign_flip", "byzantine": 1}]
)
def test_a_first_round_the_rule_never_sees_is_refused_under_it(robust):
    # PowerSGD's P and shared TernGrad's scale were combined by a plain allreduce before the
    # rule saw anything: one Byzantine rank steered every rank's projection, or zeroed the
    # honest codes; and PowerSGD warm-started each rank from its own Q, not the summed one.
    with pytest.raises(ValueError, match="powersgd does not combine with an aggregator"):
        sparsetrain.SyncConfig(compressor="powersgd", **robust)
    shared = {"compressor": "terngrad", "compressor_options": {"scaler_sharing": True}}
    with pytest.raises(ValueError, match="scaler_sharing does not combine with an aggregator"):
        sparsetrain.SyncConfig(**shared, **robust)
    sparsetrain.SyncConfig(compressor="terngrad", **robust)  # one round: the rule sees it all
    sparsetrain.SyncConfig(compressor="powersgd")


def test_unscaled_randomk_gets_error_feedback_by_default():
    # Unscaled random-k sends k/numel of the gradient on average: biased, so error feedback is
    # on unless turned off, as for the other biased compressors.
    unscaled = {"density": 0.1, "scale": False}
    assert sparsetrain.SyncConfig(
        compressor="randomk", compressor_options=unscaled
    ).use_error_feedback
    off = sparsetrain.SyncConfig(
        compressor="randomk", compressor_options=unscaled, error_feedback=False
    )
    assert not off.use_error_feedback
    scaled = {"density": 0.1, "scale": True}
    assert not sparsetrain.SyncConfig(
        compressor="randomk", compressor_options=scaled
    ).use_error_feedback


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"momentum_correction": 1.0}, ValueError, r"momentum_correction must be in \[0, 1\)"),
        ({"momentum_correction": True}, TypeError, "momentum_correction must be a number"),
        (
            {"compressor": "qsgd", "momentum_correction": 0.9},
            ValueError,
            "needs a compressor that sends chosen indices .* with error feedback, got "
            "compressor 'qsgd'",
        ),
        (
            {
                "compressor": "randomk",
                "compressor_options": {"scale": False},
                "momentum_correction": 0.9,
            },
            ValueError,
            r"\(topk or threshold; not randomk, whose values go through a dense allreduce\)",
        ),  # fmt: skip
        (
            {"compressor": "topk", "error_feedback": False, "momentum_correction": 0.9},
            ValueError,
            "with error feedback off",
        ),
        (
            {"compressor": "topk", "aggregator": "median", "momentum_correction": 0.9},
            ValueError,
            "does not combine with robust aggregation",
        ),
        (
            {"compressor": "topk", "dense_warmup_steps": 5, "momentum_correction": 0.9},
            ValueError,
            "does not combine with dense_warmup_steps",
        ),
    ],
)
def test_bad_momentum_correction_is_refused(fields, error, message):
    with pytest.raises(error, match=message):
        sparsetrain.SyncConfig(**fields)
    assert sparsetrain.SyncConfig(compressor="topk", momentum_correction=0.9).momentum_correction


def test_sparse_collective_with_dense_compressor_is_refused():
    with pytest.raises(ValueError, match="reduces sparse payloads"):
        sparsetrain.SyncConfig(compressor="none", collective="auto")
    # Random-k is listed with the density compressors; the error says why it is dense.
    with pytest.raises(ValueError, match="random-k: the same indices on every rank"):
        sparsetrain.SyncConfig(compressor="randomk", collective="oktopk")


def test_non_floating_gradient_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        check_floating(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        sparsetrain.get_compressor("topk", density=0.5).compress(torch.arange(4))


def test_hook_needs_a_ddp_model():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        sparsetrain.register_ddp_hook(_model(), "topk")


def test_single_process_sync_is_the_identity_for_lossless_settings():
    torch.manual_seed(0)
    model = _model()
    sync = sparsetrain.GradientSync(model, "topk", density=1.0, bucket_cap_mb=0.0001)
    model(torch.randn(3, 4)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert sync.synchronize()
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, b)
    stats = sync.stats()
    assert stats["steps"] == 1 and stats["bytes_sent"] == 0  # one rank: nothing crosses a wire
    assert len(sync.buckets) > 1  # the tiny cap split the model


def test_hook_runs_exchanges_inline_when_backward_issues_collectives():
    # From the background thread, the exchanges' collectives would interleave with those that
    # DDP (find_unused_parameters) or SyncBatchNorm issue during backward, differently on each
    # rank. DDP refuses SyncBatchNorm on CPU, so a stand-in with DDP's two attributes is used.
    from types import SimpleNamespace

    from sparsetrain.sync.ddp_hook import runs_inline

    def ddp(module: nn.Module, find_unused: bool) -> SimpleNamespace:
        return SimpleNamespace(module=module, find_unused_parameters=find_unused)

    sync_bn = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.SyncBatchNorm(8)), nn.Linear(8, 2))
    assert not runs_inline(ddp(_model(), False))
    assert runs_inline(ddp(_model(), True))
    assert runs_inline(ddp(sync_bn, False))


@pytest.mark.parametrize(
    ("parts", "words"),
    [
        ([torch.zeros(3)], "one part for each name and shape; got 1 parts, 2 names"),
        ([torch.zeros(3), torch.zeros(5)], "'b' must be 1-D with 4 elements"),
        ([torch.zeros(3), torch.zeros(2, 2)], r"'b' must be 1-D with 4 elements .* \(2, 2\)"),
        ([torch.zeros(3), torch.zeros(4, dtype=torch.float64)], "share one dtype and device"),
    ],
)
def test_exchange_into_refuses_parts_that_do_not_match_the_layout(parts, words):
    from sparsetrain.sync import SyncEngine
    from sparsetrain.sync.config import make_config

    engine = SyncEngine(make_config("threshold", 0.5, {}))
    with pytest.raises(ValueError, match=words):
        engine.exchange_into(parts, ["a", "b"], [torch.Size([3]), torch.Size([4])])


def test_exchange_into_refuses_frozen_flags_that_do_not_match_the_names():
    from sparsetrain.sync import SyncEngine
    from sparsetrain.sync.config import make_config

    engine = SyncEngine(make_config("threshold", 0.5, {}))
    parts = [torch.zeros(3), torch.zeros(4)]
    with pytest.raises(ValueError, match="one flag for each name; got 1 flags for 2 names"):
        engine.exchange_into(parts, ["a", "b"], [torch.Size([3]), torch.Size([4])], frozen=[True])


# ---- the collective's options, and what "auto" chooses from -----------------------------------
def test_collective_options_reach_the_collective_and_its_restored_state():
    sync = sparsetrain.GradientSync(
        _model(), "threshold", density=0.1, collective="oktopk",
        collective_options={"repartition_every": 8, "threshold_every": 4},
    )  # fmt: skip
    coll = sync.engine._collective_for(1000, torch.float32)
    assert (coll.repartition_every, coll.threshold_every, coll.k) == (8, 4, None)
    other = sparsetrain.GradientSync(
        _model(), "threshold", density=0.1, collective="oktopk",
        collective_options={"repartition_every": 8, "threshold_every": 4},
    )  # fmt: skip
    other.engine.load_state_dict(sync.engine.state_dict())  # builds the collective it restores
    assert other.engine._collectives["oktopk"].repartition_every == 8


def test_auto_picks_by_the_given_network_and_candidates(monkeypatch):
    from sparsetrain import perfmodel
    from sparsetrain.sync import engine

    monkeypatch.setattr(engine, "world_of", lambda group: 8)
    numel, density = 100_000, 0.1
    slow = perfmodel.NetworkParams.from_link(bandwidth_bps=1e9, latency_s=50e-6)
    picks = {}
    for label, extra in {
        "default": {},
        "slow links, exact": {"auto_network": slow},
        "slow links, selecting": {
            "auto_network": slow.as_dict(),
            "auto_candidates": ["dense", "allgather", "oktopk", "gtopk"],
            "collective_options": {"oktopk": {"repartition_every": 3}},
        },
    }.items():
        sync = sparsetrain.GradientSync(
            _model(), "threshold", density=density, collective="auto", **extra
        )
        cfg = sync.config
        coll = sync.engine._collective_for(numel, torch.float32)
        want = perfmodel.best_collective(
            numel=numel, nnz=int(density * numel), world=8, params=cfg.auto_network,
            candidates=cfg.auto_candidates or perfmodel.EXACT,
            sorted_input=bool(getattr(sync.engine.compressor, "sorted_indices", False)),
        )  # fmt: skip
        picks[label] = coll if coll == "dense" else coll.name
        assert picks[label] == want, label
        assert sync.engine.stats()["auto_choices"] == {str(numel): want}  # what a user sees
    # The slow links make a sparse exchange win where 10 Gbit/s makes the dense allreduce win,
    # and the selecting candidate wins once allowed, built with its options.
    assert picks["default"] == "dense" != picks["slow links, exact"]
    assert picks["slow links, selecting"] == "oktopk" != picks["slow links, exact"]
    assert sync.engine._collectives["oktopk"].repartition_every == 3


def test_auto_prices_the_values_at_the_gradients_size(monkeypatch):
    # Every gradient was priced as 4-byte values: for float16 (2 bytes on every wire) at 8
    # ranks, 10M elements and density 0.1 it picked DSAR, slower than the dense allreduce.
    from sparsetrain import perfmodel
    from sparsetrain.sync import engine

    monkeypatch.setattr(engine, "world_of", lambda group: 8)
    sync = sparsetrain.GradientSync(_model(), "threshold", density=0.1, collective="auto")
    picks = {}
    for dtype in (torch.float16, torch.float32, torch.float64):
        coll = sync.engine._collective_for(10**7, dtype)
        picks[dtype] = coll if coll == "dense" else coll.name
        assert picks[dtype] == perfmodel.best_collective(
            numel=10**7, nnz=10**6, world=8, value_bytes=dtype.itemsize
        )
    assert picks == {torch.float16: "dense", torch.float32: "dsar", torch.float64: "ssar_split"}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"collective": "oktopk", "collective_options": {"every": 2}}, ValueError,
         r"collective 'oktopk' does not take option\(s\) \['every'\]; it takes: repartition_every"),
        ({"collective": "oktopk", "collective_options": {"repartition_every": 0}}, ValueError,
         "repartition_every must be a positive int"),
        ({"collective": "oktopk", "collective_options": [1]}, TypeError,
         "collective_options must be a dict"),
        ({"collective": "ssar_rd", "auto_network": {"alpha": 1, "beta": 1}}, ValueError,
         "auto_network is for collective='auto'"),
        ({"collective": "allgather", "auto_candidates": ["dense"]}, ValueError,
         "auto_candidates is for collective='auto'"),
        ({"collective": "auto", "auto_candidates": ["dense", "fast"]}, ValueError,
         r"auto_candidates: unknown \['fast'\]; valid names are: dense, allgather"),
        ({"collective": "auto", "auto_candidates": "oktopk"}, TypeError,
         "auto_candidates must be a non-empty list of names"),
        ({"collective": "auto", "collective_options": {"oktopk": {"k": 5}}}, ValueError,
         "'oktopk' is not among the candidates .*: add it to auto_candidates"),
        ({"collective": "auto", "auto_candidates": ["oktopk"],
          "collective_options": {"oktopk": 5}}, TypeError,
         r"collective_options\['oktopk'\] must be a dict"),
        ({"collective": "auto", "auto_network": {"alpha": 1e-5}}, ValueError,
         "auto_network needs alpha .* and beta .*; missing: beta"),
        ({"collective": "auto", "auto_network": {"alpha": 1, "beta": 1, "rate": 2}}, ValueError,
         r"auto_network: unknown \['rate'\]; fields are alpha, beta"),
        ({"collective": "auto", "auto_network": {"alpha": -1, "beta": 1}}, ValueError,
         "auto_network: NetworkParams.alpha must be a finite number >= 0"),
        ({"collective": "auto", "auto_network": "10gbit"}, TypeError,
         "auto_network must be a perfmodel.NetworkParams or a dict of its fields, got str"),
        ({"collective": "oktopk", "repartition_every": 8}, ValueError,
         r"compressor 'threshold' does not take 'repartition_every' \(it takes: band, density, "
         r".*\); it is an option of the collective oktopk; pass it as "
         r"collective_options=\{'repartition_every': ...\}"),
        ({"k": 8}, ValueError,
         r"compressor 'threshold' does not take 'k' \(it takes: .*\); it is an option of the "
         "collective gtopk and oktopk; pass it as collective_options with collective='gtopk'"),
        ({"collective": "auto", "auto_candidates": ["dense", "oktopk"], "threshold_every": 8},
         ValueError, r"pass it as collective_options=\{'oktopk': \{'threshold_every': ...\}\}"),
        ({"collective": "auto", "collective_options": {"dense": {}}}, ValueError,
         r"collective_options\['dense'\]: the dense allreduce takes no options"),
    ],
)  # fmt: skip
def test_bad_collective_options_are_refused(options, error, message):
    with pytest.raises(error, match=message):
        sparsetrain.GradientSync(_model(), "threshold", density=0.1, **options)


def test_sync_objects_say_what_they_run():
    """Their reprs were '<... object at 0x...>'; a user printing one wants its settings."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.comm import get_collective

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sync = sparsetrain.GradientSync(_model(), "topk", density=0.01, on_nonfinite="skip")
        assert repr(sync) == (
            "GradientSync(compressor=TopK(density=0.01), collective='allgather', "
            "on_nonfinite='skip', buckets=1, step=0)"
        )
        assert repr(sync.engine).startswith("SyncEngine(compressor=TopK(density=0.01), ")
        state = sparsetrain.register_ddp_hook(DDP(_model()), "threshold", density=0.1)
        assert repr(state).startswith("SyncState(compressor=Threshold(")
        assert repr(state).endswith(", collective='allgather', step=0)")
    finally:
        dist.destroy_process_group()
    ef = sparsetrain.ErrorFeedback(momentum=0.9)
    assert repr(ef) == "ErrorFeedback(enabled=True, momentum=0.9, residuals=0)"
    assert repr(get_collective("allgather")) == "AllgatherSparse()"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"enabled": "no"}, TypeError, "enabled must be True or False, got 'no'"),
        ({"momentum": 2}, ValueError, r"momentum must be 0 \(off\) or a number in \(0, 1\)"),
        ({"momentum": True}, ValueError, "got True"),
    ],
)
def test_error_feedback_refuses_bad_arguments(kwargs, error, message):
    # bool("no") turned error feedback on; a momentum of 2 was taken.
    with pytest.raises(error, match=message):
        sparsetrain.ErrorFeedback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"compressor_options": {"densty": 0.1}}, ValueError, r"does not take option.*densty"),
        ({"compressor_options": {"density": 5}}, ValueError, r"density must be in \(0, 1\]"),
        ({"compressor_options": None}, TypeError, "compressor_options must be a dict"),
        ({"aggregator": "bogus"}, ValueError, "unknown aggregator 'bogus'"),
        ({"attack": "bogus", "byzantine": 1}, ValueError, "unknown attack 'bogus'"),
        (
            {"aggregator": "krum", "aggregator_options": {"zz": 1}},
            ValueError,
            "aggregator 'krum' does not take option",
        ),
        (
            {"attack": "gaussian", "byzantine": 1, "attack_options": {"zz": 1}},
            ValueError,
            "attack 'gaussian' does not take option",
        ),
        (  # f, the ranks the rule tolerates, is an option of every rule
            {"aggregator": "krum", "aggregator_options": {"f": 1.5}},
            ValueError,
            r"aggregator_options\['f'\], the number of Byzantine ranks the rule tolerates, must "
            "be an integer >= 0, got 1.5",
        ),
    ],
)
def test_sync_config_checks_names_and_options_when_built(kwargs, error, message):
    # These were accepted, and refused only where the engine was built from the config.
    with pytest.raises(error, match=message):
        sparsetrain.SyncConfig(compressor="topk", **kwargs)


def test_a_model_that_is_not_a_module_is_named():
    with pytest.raises(TypeError, match="needs the model as a torch.nn.Module, got NoneType"):
        sparsetrain.GradientSync(None, "topk", density=0.1)


def test_momentum_correction_says_which_form_it_takes():
    """The hook takes the momentum, TrainConfig a switch: each error says so."""
    from sparsetrain.train import TrainConfig

    with pytest.raises(TypeError, match=r"the momentum itself \(the optimizer's, such as 0.9"):
        sparsetrain.SyncConfig(compressor="topk", momentum_correction=True)
    with pytest.raises(TypeError, match="True applies TrainConfig.momentum"):
        TrainConfig(compressor="topk", momentum_correction=0.9)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_a_global_selection_lands_in_the_same_places_through_the_flat_bucket(dtype):
    # The hook's path writes the selection into DDP's flat bucket in one call; GradientSync's
    # writes it into each parameter's gradient. Parameters in another order than canonical,
    # some of them empty or without a selected entry.
    from sparsetrain.sync.engine import _put_bucket, _put_canonical

    g = torch.Generator().manual_seed(0)
    numels = [5, 0, 7, 1, 12, 3]
    order = [4, 2, 0, 5, 1, 3]  # canonical part j is the bucket's part order[j]
    cnumels = [numels[i] for i in order]
    total = sum(numels)
    indices = torch.randperm(total, generator=g)[:9].to(dtype)
    values = torch.randn(9, generator=g)
    flat = torch.zeros(total)
    _put_bucket(flat, order, cnumels, indices, values)
    parts = list(torch.zeros(total).split(numels))
    _put_canonical([parts[i] for i in order], indices, values)
    assert torch.equal(flat, torch.cat(parts))
    assert int((flat != 0).sum()) == 9


def test_numpy_options_leave_a_state_that_a_plain_torch_load_reads():
    # np.float64 passes the float checks (a subclass), and was kept as is in the state's
    # config: torch.load's default (weights_only=True, torch >= 2.6) refused the checkpoint.
    import io

    import numpy as np

    model = _model()
    for options in (
        {"density": np.linspace(0.01, 0.1, 3)[0]},
        {"density": 0.1, "momentum_correction": np.float64(0.9)},
        {"density": 0.1, "band": np.float64(1.5)},
    ):
        compressor = "topk" if "band" not in options else "threshold"
        sync = sparsetrain.GradientSync(model, compressor, **options)
        model(torch.randn(3, 4)).sum().backward()
        sync.synchronize()
        buf = io.BytesIO()
        torch.save(sync.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf)  # weights_only=True
        again = sparsetrain.GradientSync(model, compressor, **options)
        again.load_state_dict(state)  # the same settings, compared as numbers
        model.zero_grad()


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "geometric_median"])
def test_a_robust_rule_can_be_tried_in_one_process_without_a_process_group(rule):
    # A world of one, as every collective takes it: the rule sees one worker's gradient, and
    # these rules give it back. It failed inside torch ("Default process group has not been
    # initialized") although the sync had been built.
    model = _model()
    sync = sparsetrain.GradientSync(model, "none", aggregator=rule)
    model(torch.randn(3, 4)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    sync.synchronize()
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g)


def test_the_rules_f_is_taken_as_numpy_gives_it():
    import numpy as np

    config = sparsetrain.SyncConfig(
        compressor="none", aggregator="trimmed_mean", aggregator_options={"f": np.int64(1)}
    )
    assert config.aggregator_options["f"] == 1
