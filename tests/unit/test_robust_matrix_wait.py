"""How robust-matrix's gloo cells collect their ranks' results, with stand-ins for the processes:
which rank is named as the cause when one fails."""

from __future__ import annotations

import json
import queue
from types import SimpleNamespace

import pytest

from sparsetrain.commands.robust_matrix import _answers


def _cell(exitcodes, messages):
    procs = [SimpleNamespace(exitcode=code) for code in exitcodes]
    results = queue.Queue()
    for m in messages:
        results.put(m)
    return procs, results


def test_every_rank_answered_gives_each_ranks_result():
    procs, results = _cell([0, 0], [(1, "ok", 0.5, {}), (0, "ok", 0.5, {"removed": {}})])
    assert _answers(procs, results, 5) == {0: (0.5, {"removed": {}}), 1: (0.5, {})}


def test_a_rank_that_raised_is_named_even_if_its_process_then_aborted():
    # Rank 1 put its traceback, then gloo's teardown aborted it (exit -6); rank 0 is still
    # waiting for it. It was reported as "rank 1 died without a result", the traceback dropped.
    procs, results = _cell([None, -6], [(1, "error", "Traceback ...\nValueError: bad", None)])
    with pytest.raises(RuntimeError, match=r"^rank 1 failed:\nTraceback ...\nValueError: bad$"):
        _answers(procs, results, 5)


def test_a_rank_killed_without_a_word_is_named_before_the_peer_that_lost_it():
    procs, results = _cell(
        [-9, 0], [(1, "error", "Traceback ...\nRuntimeError: Connection closed by peer", None)]
    )
    with pytest.raises(RuntimeError, match=r"rank 0 of 2 died without a result \(exit code -9\)"
                       r".* rank 1 then failed too \(RuntimeError: Connection closed by peer\)"):  # fmt: skip
        _answers(procs, results, 5)


def test_no_answer_before_the_deadline_says_how_many_finished():
    procs, results = _cell([None, None], [(0, "ok", 0.5, {})])
    with pytest.raises(RuntimeError, match=r"no result within 0.2 s \(1 of 2 finished\)"):
        _answers(procs, results, 0.2)


def test_the_matrix_records_each_cells_options_so_a_result_can_be_reproduced():
    # Two runs that differed only in --option sign_flip.scale=10 recorded the same config,
    # with a placeholder rule and attack that described no cell.
    from sparsetrain.commands.robust_matrix import run_matrix
    from sparsetrain.robust.simulate import RobustRunConfig

    base = RobustRunConfig(workers=4, byzantine=1, attack="zero", steps=3)
    result = run_matrix("digits-mlp", base, ["mean", "median"], ["none", "sign_flip"],
                        {"sign_flip": {"scale": 10.0}}, progress=False)  # fmt: skip
    assert result["options"] == {"sign_flip": {"scale": 10.0}}
    assert not {"aggregator", "attack", "aggregator_options"} & set(result["config"])
    cell = next(c for c in result["cells"] if c["attack"] == "sign_flip")
    assert cell["attack_options"] == {"scale": 10.0} and cell["aggregator_options"] == {}
    assert all(isinstance(c["diverged"], bool) for c in result["cells"])
    json.dumps(result)  # what the command writes


def test_a_cell_that_times_out_keeps_the_finished_cells_and_the_limit_is_the_users(
    tmp_path, monkeypatch, capsys
):
    # A cell past the fixed 600 s raised, and every cell finished before it was lost.
    from sparsetrain.commands import robust_matrix
    from sparsetrain.robust.simulate import RobustRunConfig

    limits = []

    def fake_ranks(task_name, cfg, timeout_s=600.0, task_options=None):
        limits.append(timeout_s)
        if cfg.aggregator == "median":
            raise RuntimeError(f"the ranks gave no result within {timeout_s:g} s (0 of 4 finished)")
        return {"accuracy": 0.5, "aggregator_stats": {}}

    monkeypatch.setattr(robust_matrix, "run_ranks", fake_ranks)
    base = RobustRunConfig(workers=4, byzantine=0, steps=3)
    partial = tmp_path / "out" / "robust_matrix.partial.json"
    with pytest.raises(RuntimeError, match="within 7 s"):
        robust_matrix.run_matrix("digits-mlp", base, ["mean", "median"], ["none"], {},
                                 simulate_mode=False, progress=False, timeout_s=7.0,
                                 partial=str(partial))  # fmt: skip
    assert limits == [7.0, 7.0]
    kept = json.loads(partial.read_text())
    assert [c["aggregator"] for c in kept["cells"]] == ["mean"]
    assert kept["stopped_at"] == {"aggregator": "median", "attack": "none"}
    assert f"the 1 cell(s) finished before it are in {partial}" in capsys.readouterr().err
