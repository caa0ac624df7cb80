"""The trainer's data order when a run resumes on another number of ranks (`_Plan`): every
example is still trained on once an epoch, and the learning-rate schedule goes on from where it
was, whatever the step and the numbers of ranks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sparsetrain.train import TrainConfig, _Plan, shard_indices

SEED = 3


def _epochs_seen(plan: _Plan, steps: range, seen: dict[int, Counter]) -> None:
    """Add the examples that ``steps`` of ``plan`` train on, over all its ranks, by epoch."""
    b = plan.batch_size
    for step in steps:
        epoch, start, taken = plan.where(step)
        for rank in range(plan.world):
            order = shard_indices(plan.num_examples, rank, plan.world, SEED, epoch, start=start)
            seen.setdefault(epoch, Counter()).update(order[taken * b : (taken + 1) * b].tolist())


@pytest.mark.parametrize("n,batch", [(37, 4), (100, 5), (23, 1)])
@pytest.mark.parametrize("old,new", [(2, 3), (3, 2), (4, 1), (1, 4), (2, 2), (5, 3)])
def test_a_resumed_run_trains_on_every_example_once_an_epoch(n, batch, old, new):
    epochs = 3
    first = _Plan(n, batch, epochs, old)
    for cut in range(first.planned + 1):
        second = _Plan(n, batch, epochs, new, first.resumed_on(cut))
        seen: dict[int, Counter] = {}
        _epochs_seen(first, range(cut), seen)
        _epochs_seen(second, range(cut, second.planned), seen)
        assert sorted(seen) == list(range(epochs)), (cut, sorted(seen))
        for epoch, counts in seen.items():
            # Each example at least once; the only repeats are the padding that deals an
            # epoch (or its rest) out evenly: fewer than a rank each, on either side.
            assert set(counts) == set(range(n)), (cut, epoch)
            extra = sum(counts.values()) - n
            assert 0 <= extra < old + new, (cut, epoch, extra)
        # The schedule goes on from where it was and ends at 1.
        assert second.progress(cut) == pytest.approx(first.progress(cut))
        if second.planned > cut:
            assert second.progress(second.planned) == pytest.approx(1.0)
            assert second.epochs_done(second.planned) == pytest.approx(epochs)
        # The curves' epochs go on from the old run's, without a jump.
        assert second.epochs_done(cut) == first.epochs_done(cut)
        if cut < second.planned:
            assert second.epochs_done(cut + 1) > second.epochs_done(cut)


def test_twice_resharded_still_once_an_epoch():
    n, batch, epochs = 50, 3, 4
    a = _Plan(n, batch, epochs, 2)
    b = _Plan(n, batch, epochs, 3, a.resumed_on(11))
    c = _Plan(n, batch, epochs, 1, b.resumed_on(20))
    d = _Plan(n, batch, epochs, 4, c.resumed_on(30))
    assert 11 < a.planned and 20 < b.planned and 30 < c.planned
    assert [b.where(20)[0], c.where(30)[0]] == [2, 3]  # each cut is inside an epoch
    seen: dict[int, Counter] = {}
    _epochs_seen(a, range(11), seen)
    _epochs_seen(b, range(11, 20), seen)
    _epochs_seen(c, range(20, 30), seen)
    _epochs_seen(d, range(30, d.planned), seen)
    assert sorted(seen) == list(range(epochs))
    for counts in seen.values():
        assert set(counts) == set(range(n))
    assert d.progress(d.planned) == pytest.approx(1.0)
    assert b.progress(11) == pytest.approx(a.progress(11))
    assert c.progress(20) == pytest.approx(b.progress(20))
    assert d.progress(30) == pytest.approx(c.progress(30))


def test_a_run_that_never_changed_ranks_keeps_its_order_and_schedule():
    n, batch, world, epochs = 37, 4, 3, 2
    plan = _Plan(n, batch, epochs, world)
    assert plan.steps_per_epoch == 4 and plan.planned == 8
    for step in range(plan.planned):
        epoch, start, taken = plan.where(step)
        assert (epoch, taken) == divmod(step, 4) and start == 0
        assert plan.epochs_done(step) == step / 4
        assert plan.progress(step) == step / 8
    # start=0 is the order shard_indices always gave
    for rank in range(world):
        assert shard_indices(n, rank, world, SEED, 1).tolist() == (
            shard_indices(n, rank, world, SEED, 1, start=0).tolist()
        )


def test_the_same_number_of_ranks_from_a_layout_is_the_same_order():
    # A run resharded onto 2 ranks at an epoch's end then trains as a run of 2 from the start.
    n, batch, epochs = 40, 4, 3
    first = _Plan(n, batch, epochs, 4)
    cut = first.steps_per_epoch  # the end of epoch 0
    second = _Plan(n, batch, epochs, 2, first.resumed_on(cut))
    plain = _Plan(n, batch, epochs, 2)
    offset = plain.steps_per_epoch - cut
    for step in range(cut, second.planned):
        assert second.where(step) == plain.where(step + offset)
    assert second.planned + offset == plain.planned


def test_fewer_epochs_than_reached_plans_nothing_more():
    first = _Plan(30, 2, 3, 2)
    cut = 2 * first.steps_per_epoch + 1  # in epoch 2
    layout = first.resumed_on(cut)
    assert layout["epoch"] == 2
    assert _Plan(30, 2, 2, 3, layout).planned == cut  # 2 epochs: past the end already
    assert _Plan(30, 2, 3, 3, layout).planned > cut


# ---- which checkpoint files a resume keeps: _repair_actions ----------------------------------
NONE = (-1, -1)


def _slots(**files: tuple) -> dict[int, list[int]]:
    """rank<q>=(latest, kept, carried): each (step, world), carried (world, step) of the run a
    resharded one carried over; a bare (step, world) is a latest file alone."""
    out = {}
    for name, value in files.items():
        if not isinstance(value[0], tuple):
            value = (value,)
        latest, kept, carried = (*value, NONE, NONE)[:3]
        out[int(name[4:])] = [*latest, *kept, *carried]
    return out


@pytest.mark.parametrize(
    "files",
    [
        dict(rank0=(20, 2), rank1=(20, 2)),  # one run
        dict(rank0=((20, 2), (15, 2)), rank1=(15, 2)),  # stopped between its ranks' saves
        dict(rank0=(5, 2)),  # stopped during its very first save: it starts over
        dict(rank0=((20, 3), (15, 3)), rank1=(15, 3), rank2=(15, 3)),  # as above, on 3
        # A run on 3 that resumed one of 2 at step 15, at a later save stopped half way.
        dict(rank0=((25, 3), (20, 3), (2, 15)), rank1=((20, 3), NONE, (2, 15)),
             rank2=((20, 3), NONE, (2, 15))),
    ],
)  # fmt: skip
def test_one_runs_files_are_left_as_they_are(files):
    from sparsetrain.train import _repair_actions

    assert _repair_actions(_slots(**files)) == {}


def test_a_first_save_on_more_ranks_stopped_half_way_is_undone():
    from sparsetrain.train import _repair_actions

    # 2 -> 3 at step 15: ranks 0 and 1 wrote theirs (keeping the old run's), rank 2 did not.
    old, carried = (15, 2), (2, 15)
    files = _slots(rank0=((20, 3), old, carried), rank1=((20, 3), old, carried))
    assert _repair_actions(files) == {0: "restore", 1: "restore"}
    # Only rank 2, which the old run did not have, wrote its file: that one is set aside.
    files = _slots(rank0=old, rank1=old, rank2=((20, 3), NONE, carried))
    assert _repair_actions(files) == {2: "drop"}
    # Ranks 0 and 2, rank 1 stopped between its save's two renames (its old file kept only).
    files = _slots(rank0=((20, 3), old, carried), rank1=(NONE, old), rank2=((20, 3), NONE, carried))
    assert _repair_actions(files) == {0: "restore", 2: "drop"}


def test_a_first_save_on_fewer_ranks_stopped_half_way_is_undone():
    from sparsetrain.train import _repair_actions

    old = (15, 3)
    files = _slots(rank0=((20, 2), old, (3, 15)), rank1=old, rank2=old)
    assert _repair_actions(files) == {0: "restore"}


def test_after_a_first_save_on_every_rank_the_old_runs_files_go():
    from sparsetrain.train import _repair_actions

    # 4 -> 2, stopped before the save's clean-up: the kept files of the old run and its
    # ranks 2 and 3.
    old, carried = (15, 4), (4, 15)
    files = _slots(
        rank0=((20, 2), old, carried), rank1=((20, 2), old, carried), rank2=old, rank3=old
    )
    assert _repair_actions(files) == {0: "drop_prev", 1: "drop_prev", 2: "stale", 3: "stale"}
    # 2 -> 4, all saved: the kept files of ranks 0 and 1 are the old run's.
    old, carried = (15, 2), (2, 15)
    files = _slots(
        rank0=((20, 4), old, carried), rank1=((20, 4), old, carried),
        rank2=((20, 4), NONE, carried), rank3=((20, 4), NONE, carried),
    )  # fmt: skip
    assert _repair_actions(files) == {0: "drop_prev", 1: "drop_prev"}


def test_only_the_carried_runs_own_files_are_ever_touched():
    from sparsetrain.train import _repair_actions

    # Another run (a fresh one, which carried nothing over) over an old run of 4: its files
    # and the old run's are left for the configuration check and the errors that follow.
    old = (10, 4)
    files = _slots(rank0=((30, 2), old), rank1=((30, 2), old), rank2=old, rank3=old)
    assert _repair_actions(files) == {}
    # A resharded run's files next to a third run's: only the carried run's go.
    carried = (4, 15)
    files = _slots(
        rank0=((20, 2), (15, 4), carried), rank1=((20, 2), (9, 4), carried),
        rank2=(15, 4), rank3=(9, 3),
    )  # fmt: skip
    assert _repair_actions(files) == {0: "drop_prev", 2: "stale"}
    # Rank 1 of the old run is missing: undoing rank 0's would not leave the old run whole.
    assert _repair_actions(_slots(rank0=((20, 3), (15, 2), (2, 15)))) == {}
    # A file that cannot be read (-2): nothing is touched, the load names it.
    files = _slots(rank0=((20, 3), (15, 2), (2, 15)), rank1=(15, 2), rank2=(-2, -1))
    assert _repair_actions(files) == {}


def test_a_file_set_aside_never_replaces_one_set_aside_before(tmp_path):
    from sparsetrain.train import _set_aside

    for step in range(3):
        (tmp_path / "rank0.pt").write_text(f"step {step}")
        _set_aside(tmp_path / "rank0.pt")
    assert not (tmp_path / "rank0.pt").exists()
    kept = ["rank0.unfinished.pt", "rank0.unfinished.1.pt", "rank0.unfinished.2.pt"]
    assert [(tmp_path / name).read_text() for name in kept] == ["step 0", "step 1", "step 2"]


def test_the_largest_seed_every_command_takes_draws_an_order_and_a_larger_one_is_refused():
    # seed * 1_000_003 overflowed manual_seed in every worker for seeds above about 1.8e13,
    # though --seed takes any integer below 2**63; the order of smaller seeds is unchanged.
    from sparsetrain.robust.simulate import batch_generator

    top = 2**63 - 1
    order = shard_indices(10, 0, 1, top, 3)
    assert sorted(order.tolist()) == list(range(10))
    assert torch.equal(order, shard_indices(10, 0, 1, top, 3))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 * 1_000_003 + 3))
    assert torch.equal(shard_indices(10, 0, 1, 5, 3), expected)
    batch_generator(top, 7)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        TrainConfig(seed=2**63)
