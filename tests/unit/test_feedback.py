"""Error feedback: nothing is lost, only delayed; state round-trips exactly."""

from __future__ import annotations

import pytest
import torch

from sparsetrain import ErrorFeedback, get_compressor


def test_sent_plus_new_residual_equals_gradient_plus_old_residual():
    torch.manual_seed(0)
    ef = ErrorFeedback()
    comp = get_compressor("topk", density=0.1)
    names, numels = ["a", "b"], [30, 70]
    for _ in range(20):
        grad = torch.randn(100)
        old = torch.cat([ef.residuals.get(n, torch.zeros(k)) for n, k in zip(names, numels)])
        compensated = ef.compensate(names, numels, grad)
        payload, ctx = comp.compress(compensated)
        sent = comp.decompress(payload, ctx)
        ef.update(names, numels, compensated, sent)
        new = torch.cat([ef.residuals[n] for n in names])
        torch.testing.assert_close(sent + new, grad + old, rtol=0, atol=1e-6)
        assert int((sent != 0).sum()) == 10


def test_residuals_are_kept_by_name_whatever_the_packing():
    ef = ErrorFeedback()
    ef.update(["a", "b"], [2, 3], torch.arange(5.0), torch.zeros(5))
    # the same parameters packed in the other order (a DDP bucket rebuild)
    out = ef.compensate(["b", "a"], [3, 2], torch.zeros(5))
    assert out.tolist() == [2.0, 3.0, 4.0, 0.0, 1.0]


def test_disabled_feedback_keeps_nothing():
    ef = ErrorFeedback(enabled=False)
    g = torch.ones(4)
    assert ef.compensate(["w"], [4], g) is g
    ef.update(["w"], [4], g, torch.zeros(4))
    assert ef.residuals == {}


def test_state_dict_round_trip_is_exact():
    ef = ErrorFeedback()
    ef.update(
        ["w", "b"], [3, 2], torch.randn(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    )
    other = ErrorFeedback()
    other.load_state_dict(ef.state_dict())
    assert other.residuals.keys() == ef.residuals.keys()
    for n in ef.residuals:
        assert torch.equal(other.residuals[n], ef.residuals[n])


def test_a_saved_state_does_not_change_with_later_steps():
    """The in-place path reuses two buffers for the residuals, so a state_dict that shared
    their memory (a checkpoint held in memory, an EMA of states) would change under later
    steps; the saved residuals are copies (from a review of the tests)."""
    torch.manual_seed(2)
    ef, comp = ErrorFeedback(), get_compressor("topk", density=0.1)
    names, numels = ["a", "b"], [30, 70]

    def step():
        grad = torch.randn(100)
        into = ef.compensate_into("a|b", names, numels, list(torch.split(grad, numels)))
        (idx, values), _ = comp.compress(into)
        ef.commit_sparse("a|b", names, numels, into, idx.long(), values)

    for _ in range(3):
        step()
    saved = ef.state_dict()
    snapshot = {n: r.clone() for n, r in saved["residuals"].items()}
    for _ in range(2):
        step()
    for n in names:
        assert torch.equal(saved["residuals"][n], snapshot[n]), n
        assert not torch.equal(ef.residuals[n], snapshot[n]), n  # (the live ones moved on)


def test_loading_keeps_the_configured_switch_and_checks_sizes_by_name():
    import pytest

    on = ErrorFeedback()
    on.update(["w"], [4], torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="saved with error feedback on, but this sync has it off"):
        ErrorFeedback(enabled=False).load_state_dict(on.state_dict())
    with pytest.raises(ValueError, match="saved with error feedback off, but this sync has it on"):
        ErrorFeedback().load_state_dict(ErrorFeedback(enabled=False).state_dict())
    # A (1,)-residual was broadcast into a (4,)-parameter: four times the saved mass.
    small = ErrorFeedback()
    small.update(["w"], [1], torch.full((1,), 5.0), torch.zeros(1))
    ef = ErrorFeedback()
    ef.load_state_dict(small.state_dict())
    for call in (
        lambda: ef.compensate(["w"], [4], torch.zeros(4)),
        lambda: ef.compensate_into("w", ["w"], [4], [torch.zeros(4)]),
    ):
        with pytest.raises(ValueError, match="residual of 'w' has 1 elements, but the parameter"):
            call()


def test_in_place_path_matches_the_general_path_and_keeps_residuals_intact():
    # compensate_into/commit_sparse (the sync engine's path for sparse payloads) must give the
    # residuals that compensate/update give, bit for bit, while reusing two buffers: the next
    # step's compensation is written into the buffer that does not hold the residuals.
    torch.manual_seed(0)
    general, fast = ErrorFeedback(), ErrorFeedback()
    comp = get_compressor("topk", density=0.1)
    names, numels = ["a", "b"], [30, 70]
    buffers = set()
    for _ in range(6):
        grad = torch.randn(100)
        compensated = general.compensate(names, numels, grad)
        payload, ctx = comp.compress(compensated)
        general.update(names, numels, compensated, comp.decompress(payload, ctx))

        before = {n: r.clone() for n, r in fast.residuals.items()}
        into = fast.compensate_into("a|b", names, numels, list(torch.split(grad, numels)))
        buffers.add(into.data_ptr())
        for n, r in fast.residuals.items():  # writing the compensation did not touch them
            assert torch.equal(r, before[n])
        torch.testing.assert_close(into, compensated, rtol=0, atol=0)
        idx, values = payload
        fast.commit_sparse("a|b", names, numels, into, idx.long(), values)
        for n in names:
            assert torch.equal(fast.residuals[n], general.residuals[n])
    assert len(buffers) == 2  # two buffers, used in turn


def test_compensating_in_pieces_writes_the_same_values_and_shows_every_piece_once():
    # each_chunk: the engine marks, sums and clears each piece while it is in cache. The pieces must
    # cover the whole result once, in order, never across two parameters, and the values must
    # be what one pass writes.
    torch.manual_seed(1)
    names, numels = ["a", "b", "c"], [17, 0, 40]
    whole, pieces = ErrorFeedback(), ErrorFeedback()
    seen, sources = [], []

    def each_chunk(j, offset, piece, source):
        seen.append((offset, piece.numel(), piece.clone()))
        sources.append((j, source.data_ptr(), source.numel()))

    for _ in range(3):
        grad = torch.randn(57)
        expected = whole.compensate_into("k", names, numels, list(torch.split(grad, numels)))
        seen.clear()
        sources.clear()
        got = pieces.compensate_into(
            "k", names, numels, list(torch.split(grad, numels)), each_chunk=each_chunk, chunk=7
        )
        # each piece comes with its parameter's position and the gradient it was computed from
        size = grad.element_size()
        assert sources == [(0 if o < 17 else 2, grad.data_ptr() + o * size, n) for o, n, _ in seen]
        assert torch.equal(got, expected)
        assert [(o, n) for o, n, _ in seen] == [
            (0, 7), (7, 7), (14, 3), (17, 7), (24, 7), (31, 7), (38, 7), (45, 7), (52, 5)
        ]  # fmt: skip
        for offset, n, piece in seen:
            assert torch.equal(piece, expected[offset : offset + n])
        idx = torch.tensor([1, 20, 50])
        for ef, c in ((whole, expected), (pieces, got)):
            ef.commit_sparse("k", names, numels, c, idx, c[idx].clone())
        assert all(torch.equal(whole.residuals[n], pieces.residuals[n]) for n in names)


def test_compensating_in_pieces_is_refused_with_momentum():
    ef = ErrorFeedback(momentum=0.9)
    with pytest.raises(ValueError, match="each_chunk is not supported with momentum"):
        ef.compensate_into("w", ["w"], [4], [torch.ones(4)], each_chunk=lambda j, o, p, s: None)


def test_in_place_path_without_error_feedback_keeps_nothing():
    ef = ErrorFeedback(enabled=False)
    out = ef.compensate_into("w", ["w"], [4], [torch.ones(4)])
    ef.commit_sparse("w", ["w"], [4], out, torch.tensor([0]), torch.tensor([1.0]))
    assert torch.equal(out, torch.ones(4)) and ef.residuals == {}


def test_residuals_loaded_on_another_device_move_to_the_gradients_device():
    # A state loaded with map_location="cpu" (or a cuda:0 checkpoint on rank 1) holds residuals
    # on another device than the gradients; "meta" stands in for the gradients' GPU here.
    meta = torch.device("meta")
    state = {"enabled": True, "residuals": {"a": torch.ones(2), "b": torch.ones(3)}}
    uses = {
        "compensate": lambda ef: ef.compensate(["a", "b"], [2, 3], torch.zeros(5, device=meta)),
        "compensate_into": lambda ef: ef.compensate_into(
            "a|b", ["a", "b"], [2, 3], [torch.zeros(2, device=meta), torch.zeros(3, device=meta)]
        ),
        "add_back": lambda ef: ef.add_back(["a", "b"], [2, 3], torch.zeros(5, device=meta)),
    }
    for name, use in uses.items():
        ef = ErrorFeedback()
        ef.load_state_dict(state)
        out = use(ef)
        assert out is None or out.device == meta, name
        # moved once and kept there: the next step uses them without another copy
        assert all(r.device == meta for r in ef.residuals.values()), name
    assert all(r.device == torch.device("cpu") for r in state["residuals"].values())


def test_momentum_correction_keeps_velocity_that_the_applied_entries_leave():
    # u = m u + g is what is compensated; the applied entries are cleared from u afterwards.
    ef = ErrorFeedback(momentum=0.5)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    c = ef.compensate(["w"], [4], g)
    assert torch.equal(c, g)  # no residual, no velocity yet: u = g
    ef.update(["w"], [4], c, torch.tensor([0.0, 0.0, 0.0, 4.0]))
    ef.mask_velocity(torch.tensor([3]))
    assert torch.equal(ef.velocity["w"], torch.tensor([1.0, 2.0, 3.0, 0.0]))
    c = ef.compensate(["w"], [4], g)
    # u = 0.5 * (1, 2, 3, 0) + g = (1.5, 3, 4.5, 4); plus the residual (1, 2, 3, 0)
    assert torch.equal(ef.velocity["w"], torch.tensor([1.5, 3.0, 4.5, 4.0]))
    assert torch.equal(c, torch.tensor([2.5, 5.0, 7.5, 4.0]))


def test_momentum_correction_state_round_trips_and_must_match():
    import pytest

    ef = ErrorFeedback(momentum=0.9)
    ef.compensate(["w"], [3], torch.tensor([1.0, -2.0, 0.5]))
    state = ef.state_dict()
    other = ErrorFeedback(momentum=0.9)
    other.load_state_dict(state)
    assert torch.equal(other.velocity["w"], ef.velocity["w"])
    state["velocity"]["w"].zero_()  # a copy: the saved state does not alias the live one
    assert float(ef.velocity["w"].abs().sum()) > 0
    with pytest.raises(ValueError, match="momentum_correction=0.9, but this sync has"):
        ErrorFeedback().load_state_dict(ef.state_dict())
    with pytest.raises(ValueError, match="momentum_correction=0.0, but this sync has"):
        ErrorFeedback(momentum=0.9).load_state_dict(ErrorFeedback().state_dict())
    with pytest.raises(ValueError, match="needs error feedback"):
        ErrorFeedback(enabled=False, momentum=0.9)


def test_momentum_correction_in_place_path_matches_and_rolls_back():
    torch.manual_seed(0)
    general, fast = ErrorFeedback(momentum=0.9), ErrorFeedback(momentum=0.9)
    comp = get_compressor("topk", density=0.1)
    names, numels = ["a", "b"], [30, 70]
    for step in range(5):
        grad = torch.randn(100)
        compensated = general.compensate(names, numels, grad)
        payload, ctx = comp.compress(compensated)
        general.update(names, numels, compensated, comp.decompress(payload, ctx))
        general.mask_velocity(payload[0].long())
        fast.mark()
        before = {n: u.clone() for n, u in fast.velocity.items()}
        into = fast.compensate_into("a|b", names, numels, list(torch.split(grad, numels)))
        assert torch.equal(into, compensated)
        idx, values = payload
        fast.commit_sparse("a|b", names, numels, into, idx.long(), values)
        fast.mask_velocity(idx.long())
        if step == 3:  # a dropped step: velocities and residuals as they were
            fast.rollback()
            assert all(torch.equal(fast.velocity[n], before[n]) for n in before)
            general.load_state_dict(fast.state_dict())
            continue
        for n in names:
            assert torch.equal(fast.velocity[n], general.velocity[n])
            assert torch.equal(fast.residuals[n], general.residuals[n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients_are_compensated_and_kept_in_float32(dtype):
    """A residual of 256 plus a gradient of 0.5: in bfloat16 (8 significant bits) 256.5 rounds
    to 256, and the gradient was lost at every step; float16 loses it a little higher up."""
    for in_place in (False, True):
        ef = ErrorFeedback()
        ef.load_state_dict({"enabled": True, "residuals": {"w": torch.full((4,), 2048.0)}})
        grad = torch.full((4,), 0.5, dtype=dtype)
        if in_place:
            out = ef.compensate_into("k", ["w"], [4], [grad])
        else:
            out = ef.compensate(["w"], [4], grad)
        assert out.dtype == torch.float32 and out.tolist() == [2048.5] * 4
        sent = torch.tensor([2048.0, 0, 0, 0], dtype=dtype)
        if in_place:
            ef.commit_sparse("k", ["w"], [4], out, torch.tensor([0]), sent[:1])
        else:
            ef.update(["w"], [4], out, sent)
        assert ef.residuals["w"].dtype == torch.float32
        assert ef.residuals["w"].tolist() == [0.5, 2048.5, 2048.5, 2048.5]


def test_float32_gradients_keep_their_dtype():
    ef = ErrorFeedback()
    assert ef.compensate(["w"], [2], torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    assert ErrorFeedback(enabled=False).compensate(["w"], [2], torch.ones(2).half()).dtype == (
        torch.float16
    )


@pytest.mark.parametrize("fast", [True, False])
def test_bfloat16_training_loses_no_gradient_to_rounding(one_thread, fast):
    """topk at density 0.2 on a bfloat16 parameter whose 80 small gradients (1e-3) wait in
    the residual behind 20 large ones (1.0): over 1500 steps each small entry must receive
    1.5 in all, sent or still waiting. With bfloat16 residuals each stalled at 0.5 (adding
    1e-3 to 0.5 rounds away) and none was ever sent; float32 residuals deliver it."""
    import torch.distributed as dist
    from torch import nn

    import sparsetrain

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Linear(100, 1, bias=False).to(torch.bfloat16)
        sync = sparsetrain.GradientSync(model, "topk", density=0.2)
        if not fast:
            sync.engine._sparse_fast_path = lambda: False
        grad = torch.full((1, 100), 1e-3)
        grad[0, :20] = 1.0
        delivered = torch.zeros(100, dtype=torch.float64)
        for _ in range(1500):
            model.weight.grad = grad.to(torch.bfloat16)
            assert sync.synchronize()
            delivered += model.weight.grad.reshape(-1).double()
        residual = sync.engine.feedback.residuals["weight"].double()
        owed = 1500 * grad.reshape(-1).to(torch.bfloat16).double()
        assert torch.allclose(delivered + residual, owed, rtol=1e-5)
        assert (delivered[20:] > 0.9).all()  # sent, not only kept
    finally:
        dist.destroy_process_group()


def test_a_state_with_half_residuals_loads_them_as_float32():
    """States saved before the float32 residuals: a loss-scale growth applied to a float16
    residual before its first step (rescale) made 40000 infinite."""
    ef = ErrorFeedback(momentum=0.9)
    half = torch.full((2,), 40000.0, dtype=torch.float16)
    ef.load_state_dict(
        {"enabled": True, "momentum": 0.9, "residuals": {"w": half}, "velocity": {"w": half}}
    )
    ef.rescale(2.0)
    for store in (ef.residuals, ef.velocity):
        assert store["w"].dtype == torch.float32 and store["w"].tolist() == [80000.0] * 2


def test_a_half_gradient_sent_by_a_dense_allreduce_stays_half(one_thread, monkeypatch):
    """collective="auto" may pick the dense allreduce on the sparse fast path: the payload,
    selected from the float32 compensation, went out as float32 (twice the bytes)."""
    import torch.distributed as dist
    from torch import nn

    import sparsetrain
    from sparsetrain.sync import engine

    sent = []

    def allreduce_sum(tensors, group=None):
        sent.extend(t.dtype for t in tensors)
        return [t.clone() for t in tensors], 0

    monkeypatch.setattr(engine, "allreduce_sum", allreduce_sum)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Linear(64, 4, bias=False).half()
        sync = sparsetrain.GradientSync(
            model, "topk", 0.1, collective="auto", auto_candidates=["dense"]
        )
        model.weight.grad = torch.randn(4, 64).half()
        assert sync.synchronize()
    finally:
        dist.destroy_process_group()
    assert sent == [torch.float16]


def test_a_packing_that_does_not_match_its_names_is_refused_naming_the_problem():
    ef = ErrorFeedback()
    # A repeated name kept one residual of two: the other's mass was lost.
    with pytest.raises(ValueError, match="names must be distinct.*repeated: 'a'"):
        ef.compensate(["a", "a"], [2, 2], torch.ones(4))
    with pytest.raises(ValueError, match="numels add up to 5, but the flat tensor has 4"):
        ef.compensate(["a", "b"], [2, 3], torch.ones(4))
    g = ef.compensate(["a", "b"], [2, 2], torch.ones(4))
    with pytest.raises(ValueError, match="update: 2 names but 1 numels"):
        ef.update(["a", "b"], [4], g, torch.zeros(4))
    with pytest.raises(ValueError, match=r"update: sent must be .* \(4, .*got \(5,\)"):
        ef.update(["a", "b"], [2, 2], g, torch.zeros(5))  # had failed inside torch's reshape
    with pytest.raises(ValueError, match="add_back: numels add up to 3"):
        ef.add_back(["a"], [3], torch.ones(4))


def test_a_state_with_a_residual_that_is_not_flat_is_refused():
    ef = ErrorFeedback()
    with pytest.raises(ValueError, match="name -> 1-D tensor"):
        ef.load_state_dict({"enabled": True, "residuals": {"w": torch.zeros(2, 3)}})


def test_gradients_that_require_grad_leave_no_graph_in_the_residuals():
    """Gradients from backward(create_graph=True) require grad: the residuals kept their graph,
    which grew with every step, and the saved state carried it."""
    ef = ErrorFeedback()
    w = torch.ones(3, requires_grad=True)
    for _ in range(3):
        g = ef.compensate(["a"], [3], w * 2)
        ef.update(["a"], [3], g, torch.zeros(3))
        ef.add_back(["a"], [3], w * 0)
    assert not ef.residuals["a"].requires_grad
    assert not ef.state_dict()["residuals"]["a"].requires_grad
    torch.testing.assert_close(ef.residuals["a"], torch.full((3,), 6.0))


@pytest.mark.parametrize(
    ("names", "numels", "flat", "error", "message"),
    [
        ("ab", [1, 1], torch.zeros(2), TypeError, "names must be a list of parameter names"),
        (["a", 1], [1, 1], torch.zeros(2), TypeError, "names must be a list of parameter names"),
        (["a", "b"], [5, -2], torch.zeros(3), ValueError, "numels must be integers >= 0.*-2"),
        (["a"], [4], torch.zeros(2, 2), ValueError, r"must be a 1-D torch.Tensor.*\(2, 2\)"),
    ],
)
def test_a_packing_that_is_not_one_is_refused_by_name(names, numels, flat, error, message):
    # A str was taken as its letters' names, and negative sizes or a 2-D tensor failed inside
    # torch's split_with_sizes.
    with pytest.raises(error, match=message):
        ErrorFeedback().compensate(names, numels, flat)


def test_a_state_that_is_not_a_dict_is_refused_by_name():
    with pytest.raises(TypeError, match="must be the dict ErrorFeedback.state_dict"):
        ErrorFeedback().load_state_dict(None)
