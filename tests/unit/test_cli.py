"""The `sparsetrain train` / `sparsetrain demo` command lines and the trainer's pure pieces.

Nothing here trains: parsing, validation, sharding, the summary table and the picture.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from sparsetrain.cli import build_parser
from sparsetrain.commands.train import configs_from_args
from sparsetrain.compressors import get_compressor
from sparsetrain.train import (
    TrainConfig,
    WorkerError,
    _checkpoint_problem,
    _resumable,
    launch,
    parse_value,
    shard_indices,
    summary_table,
    write_report,
)


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def configs(*argv: str) -> list[TrainConfig]:
    return configs_from_args(parse(*argv))


def parse_error(capsys, *argv: str) -> str:
    """Run the full command line and return argparse's error message (exit status 2)."""
    from sparsetrain.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---- parsing ----------------------------------------------------------------------------------


def test_the_issue_command_line_becomes_one_config():
    (c,) = configs(
        "train", "--workers", "4", "--compressor", "topk", "--density", "0.01",
        "--task", "digits-mlp", "--epochs", "20", "--report", "out.json",
    )  # fmt: skip
    assert (c.workers, c.compressor, c.density, c.task, c.epochs) == (
        4,
        "topk",
        0.01,
        "digits-mlp",
        20,
    )
    assert c.effective_compressor_options() == {"density": 0.01}
    assert c.error_feedback is None  # auto: the hook turns it on for biased compressors
    assert c.bucket_cap_mb == 25.0  # DDP's default
    (c,) = configs("train", "--bucket-mb", "100")
    assert c.bucket_cap_mb == 100.0
    assert c.reuse_host_memory  # workers keep freed memory unless told not to
    (c,) = configs("train", "--no-reuse-host-memory")
    assert not c.reuse_host_memory
    assert c.ddp  # DDP and its comm hook unless told not to
    (c,) = configs("train", "--no-ddp")
    assert not c.ddp
    assert not c.momentum_correction
    (c,) = configs("train", "--compressor", "topk", "--momentum-correction")
    assert c.momentum_correction
    # The hook gets the momentum; the optimizer will run without it (train_worker).
    assert c.sync_config().momentum_correction == c.momentum == 0.9


def test_several_compressors_run_in_order_and_density_goes_only_where_it_is_taken():
    cs = configs("train", "--compressor", "none", "topk", "--density", "0.05")
    assert [c.name for c in cs] == ["none", "topk"]
    assert cs[0].to_dict()["density"] is None  # the identity compressor has no density
    assert cs[1].to_dict()["density"] == 0.05
    # Without --density the report records the compressor's default, the density it ran at
    # (it recorded null, as for a compressor that takes none); a checkpoint still records
    # what was given, so one written before resumes.
    (c,) = configs("train", "--compressor", "threshold")
    assert c.to_dict()["density"] == get_compressor("threshold").density == 0.01
    assert _resumable(c)["density"] is None
    # ... and a resume compares the density used: the default spelled out is the same run.
    (given,) = configs("train", "--compressor", "threshold", "--density", "0.01")
    (other,) = configs("train", "--compressor", "threshold", "--density", "0.02")

    def problem(saved_by: TrainConfig, now: TrainConfig) -> str | None:
        state = {"config": _resumable(saved_by), "format": 1, "world": 2}
        return _checkpoint_problem(now, state, Path("ck/rank0.pt"), 2)

    assert problem(c, given) is None and problem(given, c) is None
    assert "density 0.01 there, 0.02 here" in problem(c, other)
    # A NumPy density is saved as a Python number, which torch.load's default reads.
    import numpy as np

    config = TrainConfig(compressor="topk", density=np.float64(0.05))
    assert type(_resumable(config)["density"]) is float
    assert type(config.to_dict()["density"]) is float
    # Repeating the flag extends the list instead of replacing it.
    assert [
        c.compressor for c in configs("train", "--compressor", "none", "--compressor", "topk")
    ] == [
        "none",
        "topk",
    ]


def test_options_reach_the_right_compressor_and_values_are_typed():
    args = ("train", "--compressor", "none", "topk", "--option", "topk:density=0.2")
    none, topk = configs(*args)
    assert none.compressor_options == {} and topk.compressor_options == {"density": 0.2}
    # Without a prefix, an option goes to every selected compressor that takes it.
    _, topk = configs("train", "--compressor", "none", "topk", "--option", "density=0.3")
    assert topk.compressor_options == {"density": 0.3}
    # NAME.KEY as --collective-option and robust-matrix write it (it had been refused while
    # the message listed the option among those the compressor takes)
    (c,) = configs("train", "--compressor", "threshold", "--option", "threshold.band=1.25")
    assert c.compressor_options == {"band": 1.25}
    with pytest.raises(ValueError, match="names compressor 'topk', which is not selected"):
        configs("train", "--compressor", "threshold", "--option", "topk.density=0.1")
    (c,) = configs(
        "train", "--compressor", "none", "--error-feedback", "off",
        "--attack", "sign_flip", "--byzantine", "1", "--attack-option", "scale=4",
    )  # fmt: skip
    assert c.error_feedback is False and c.attack_options == {"scale": 4}
    # Options for a robust rule or attack that is not selected are refused.
    with pytest.raises(ValueError, match="attack_options given without an attack"):
        configs("train", "--compressor", "none", "--attack-option", "scale=-4")


def test_collective_options_and_the_auto_choice_from_the_command_line(capsys):
    base = ("train", "--compressor", "threshold", "--density", "0.01")
    (c,) = configs(*base, "--collective", "oktopk", "--collective-option", "repartition_every=16")
    assert c.collective_options == {"repartition_every": 16}
    assert c.sync_config().collective_options_for("oktopk") == {"repartition_every": 16}
    (c,) = configs(*base, "--collective", "auto", "--auto-candidates", "dense, allgather,oktopk",
                   "--collective-option", "oktopk.k=500", "--auto-bandwidth", "1gbit",
                   "--auto-latency", "20us")  # fmt: skip
    assert c.auto_candidates == ["dense", "allgather", "oktopk"]
    assert c.collective_options == {"oktopk": {"k": 500}}
    (colon,) = configs(
        *base,
        "--collective",
        "auto",
        "--auto-candidates",
        "dense,oktopk",
        "--collective-option",
        "oktopk:k=500",
    )  # (NAME:KEY, as --option has it)
    assert colon.collective_options == {"oktopk": {"k": 500}}
    # An un-nested option of a candidate is told where it goes, not to add it as a candidate
    with pytest.raises(ValueError, match=r"'repartition_every' is an option of oktopk: give it "
                       r"as \{'oktopk': \{'repartition_every': 32\}\}"):  # fmt: skip
        TrainConfig(compressor="threshold", density=0.01, collective="auto",
                    auto_candidates=["dense", "oktopk"],
                    collective_options={"repartition_every": 32})  # fmt: skip
    # tc's bytes-per-second units read as bits by most: refused, naming both readings
    with pytest.raises(ValueError, match=r"'10gbps' is ambiguous: .* write 10gbit for 10 "
                       r"gigabits/s, or 80gbit for 10 gigabytes/s"):  # fmt: skip
        configs(*base, "--collective", "auto", "--auto-bandwidth", "10gbps")
    assert c.auto_network["beta"] == 8e-9 and c.auto_network["alpha"] == pytest.approx(20e-6)
    assert c.sync_config().auto_network.beta == 8e-9
    (c,) = configs(*base, "--collective", "auto")  # nothing given: the model's defaults
    assert (c.collective_options, c.auto_candidates, c.auto_network) == ({}, None, None)
    # A tuple of candidates and a NetworkParams are held as the CLI gives them (a list and a
    # dict), so a run resumed from the command line compares equal.
    from sparsetrain.perfmodel import NetworkParams

    c = TrainConfig(compressor="threshold", density=0.01, collective="auto",
                    auto_candidates=("dense", "oktopk"),
                    auto_network=NetworkParams(alpha=1e-5, beta=8e-10))  # fmt: skip
    assert c.auto_candidates == ["dense", "oktopk"] and c.auto_network["beta"] == 8e-10
    with pytest.raises(ValueError, match=r"compressor 'topk' does not take 'repartition_every' \("):
        TrainConfig(compressor="topk", compressor_options={"repartition_every": 8},
                    collective="oktopk")  # fmt: skip
    for argv, words in (
        (("--collective", "auto", "--collective-option", "k=5"), "name the candidate"),
        (
            ("--collective", "oktopk", "--auto-latency", "1ms"),
            "--auto-latency go with --collective auto, got --collective oktopk",
        ),
        (
            ("--collective", "oktopk", "--collective-option", "oktopk.k=8"),
            "give the option without the name (k=...)",
        ),
        (
            ("--collective", "oktopk", "--option", "repartition_every=8"),
            "--option 'repartition_every': no selected compressor takes it; it is an option of the "
            "collective oktopk; pass it as --collective-option repartition_every=...",
        ),
        (("--collective", "auto", "--option", "k=8"), "pass it as --collective-option gtopk.k=..."),
        (("--collective", "auto", "--auto-candidates", ","), "--auto-candidates lists nothing"),
        (("--collective", "auto", "--auto-bandwidth", "x"), "cannot read bandwidth 'x'"),
    ):
        assert words in parse_error(capsys, *base, *argv)


def test_parse_value_reads_literals_and_keeps_other_text():
    assert parse_value("0.5") == 0.5
    assert parse_value("True") is True
    assert parse_value("true") is True and parse_value("FALSE") is False  # as shells spell them
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("median") == "median"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--density", "2"], ["--density", "(0, 1]"]),
        (["--density", "0"], ["--density", "(0, 1]"]),
        (["--workers", "0"], ["--workers", ">= 1"]),
        (["--workers", "four"], ["--workers", "integer"]),
        (["--epochs", "-3"], ["--epochs", ">= 1"]),
        (["--lr", "-0.1"], ["--lr", "> 0"]),
        (["--compressor", "zip"], ["unknown compressor 'zip'", "topk"]),
        (["--task", "imagenet"], ["--task", "digits-mlp"]),
        (["--backend", "mpi"], ["--backend", "gloo"]),
        (["--option", "density"], ["KEY=VALUE"]),
        (["--compressor", "none", "--option", "density=0.1"], ["density", "none of the selected"]),
        (["--compressor", "none", "--option", "topk:density=0.1"], ["'topk'", "not selected"]),
        (["--compressor", "topk", "--option", "warp=9"], ["warp", "density"]),
        (["--compressor", "topk", "topk"], ["more than once"]),
        (["--momentum", "1.0"], ["momentum", "[0, 1)"]),
        (["--byzantine", "4", "--attack", "sign_flip"], ["byzantine must be smaller than workers"]),
        (["--byzantine", "1"], ["needs an attack name"]),
        (["--resume"], ["checkpoint_dir"]),
        (["--bucket-mb", "0"], ["--bucket-mb", "> 0"]),
        # Checked before any worker starts, where they failed inside the workers:
        (
            ["--task-option", "bogus=1"],
            ["--task-option: task 'digits-mlp' does not take", "bogus", "hidden"],
        ),
        (["--collective", "foo"], ["unknown collective 'foo'", "oktopk"]),
        (["--compressor", "randomk", "--error-feedback", "on"], ["scale=False"]),
    ],
)
def test_bad_input_is_an_argparse_error_naming_the_problem(capsys, argv, words):
    if "--compressor" not in argv:  # independent of which compressor is the default
        argv = ["--compressor", "topk", *argv]
    err = parse_error(capsys, "train", *argv)
    # Only the message: the usage block printed before it names every flag and metavar.
    assert "error:" in err
    message = err[err.index("error:") :]
    for w in words:
        assert w in message


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["prune", "--epochs", "-1"], "--epochs: epochs must be an integer >= 0, got -1"),
        (["prune", "--lr", "-1"], "--lr: lr must be a finite number > 0, got -1.0"),
        # (named as PruneConfig's fields alone, fisher_samples, had been)
        (["prune", "--method", "woodfisher", "--fisher-samples", "0"], "--fisher-samples: fisher"),
        # (a task option's error starts with "task": it had been led by --task)
        (["prune", "--task-option", "hidden=0"], "error: --task-option: task option hidden"),
        (["train", "--task-option", "hidden=0"], "error: --task-option: task option hidden"),
        (["robust-matrix", "--aggregators", "foo"], "unknown aggregator(s) ['foo']; valid:"),
        (["robust-matrix", "--task", "foo"], "invalid choice: 'foo'"),
        (["robust-matrix", "--option", "bad"], "--option takes NAME.KEY=VALUE"),
        (["robust-matrix", "--option", "sign_flip.bogus=1"], "does not take option(s) ['bogus']"),
        (
            ["robust-matrix", "--aggregators", "krum", "--option", "krum.f=3"],
            "--option krum.f: n and f are set for every rule and attack by --workers and",
        ),
        (["robust-matrix", "--workers", "4", "--byzantine", "4"], "must be fewer than workers"),
        (["robust-matrix", "--byzantine", "0", "--attacks", "sign_flip"], "needs --byzantine >= 1"),
    ],
)
def test_prune_and_robust_matrix_refuse_bad_input_before_any_work(capsys, argv, words, tmp_path):
    # These were tracebacks from inside the run (or from its worker processes).
    out = ["--report", str(tmp_path / "r.json")] if argv[0] == "prune" else []
    assert words in parse_error(capsys, *argv, *out)


@pytest.mark.parametrize("command", ["prune", "train"])
def test_an_empty_output_path_is_a_usage_error(capsys, command):
    # prune crashed on Path("").with_suffix; train wrote no report without a word.
    assert "--report needs a path, got an empty one" in parse_error(capsys, command, "--report", "")


def test_demo_defaults_compare_three_methods_at_one_percent():
    from sparsetrain.commands import demo

    args = parse("demo")
    assert args.out == "runs/demo" and args.workers == 4
    assert demo.DEMO_COMPRESSORS == ["none", "topk", "threshold"]
    assert demo.DEMO_DEFAULTS["density"] == 0.01


def test_demo_runs_the_three_methods_with_its_defaults(monkeypatch, tmp_path, capsys):
    from sparsetrain.cli import main
    from sparsetrain.commands import demo

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # not a torchrun worker
    calls = []

    def run_and_report(configs, report_path, plot_path, prog):
        calls.append((configs, report_path, plot_path))
        return 0, None

    monkeypatch.setattr(demo, "run_and_report", run_and_report)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    ((configs, report_path, plot_path),) = calls
    assert [c.compressor for c in configs] == ["none", "topk", "threshold"]
    for c in configs:
        assert (c.task, c.density, c.workers, c.epochs) == ("digits-mlp", 0.01, 4, 20), c
    # Error feedback is left on auto and resolves to on for the biased sparse compressors.
    assert [c.sync_config().use_error_feedback for c in configs] == [False, True, True]
    assert [c.effective_compressor_options() for c in configs] == [{}] + [{"density": 0.01}] * 2
    assert (report_path, plot_path) == (str(tmp_path / "report.json"), str(tmp_path / "report.png"))
    assert f"results in {tmp_path}/" in capsys.readouterr().out


@pytest.mark.parametrize("everything", [False, True], ids=["dead-runs-only", "--all"])
def test_bench_cleanup_passes_all_as_include_live_and_lists_what_it_removed(
    monkeypatch, tmp_path, capsys, everything
):
    import tempfile

    import sparsetrain.cluster
    from sparsetrain.cli import main

    calls = []

    def cleanup(prefix="st-", *, include_live=False):
        calls.append((prefix, include_live))
        return ["st-1-ab12cd34-0", "st-1-ab12cd34-hub"]

    monkeypatch.setattr(sparsetrain.cluster, "cleanup", cleanup)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its folder scan stays in here
    dead = 2**22 + 12345  # above the default pid_max: no such process
    live, stale = (
        tmp_path / f"sparsetrain-bench-{os.getpid()}-a1",
        tmp_path / f"sparsetrain-bench-{dead}-b2",
    )
    live.mkdir()
    stale.mkdir()
    assert main(["bench", "cleanup", *(["--all"] if everything else [])]) == 0
    assert calls == [("st-", everything)]
    out = capsys.readouterr().out
    assert "removed 2 namespace(s): st-1-ab12cd34-0, st-1-ab12cd34-hub" in out
    # The temporary folders follow --all too: a live run's only with it.
    removed = sorted([live, stale]) if everything else [stale]
    assert f"removed {len(removed)} temporary folder(s): {', '.join(map(str, removed))}" in out
    assert not stale.exists() and live.exists() == (not everything)


# ---- TrainConfig ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"task": "nope"}, ValueError, ["unknown task 'nope'", "digits-mlp"]),
        ({"compressor": "nope"}, ValueError, ["unknown compressor", "topk"]),
        ({"compressor": "topk", "density": 1.5}, ValueError, ["density", "(0, 1]"]),
        ({"compressor": "topk", "compressor_options": {"k": 3}}, ValueError, ["'k'", "density"]),
        ({"workers": 0}, ValueError, ["workers", ">= 1"]),
        ({"workers": 2.0}, TypeError, ["workers", "integer"]),
        ({"epochs": 0}, ValueError, ["epochs"]),
        ({"lr": 0.0}, ValueError, ["lr", "> 0"]),
        ({"lr": "0.1"}, TypeError, ["lr", "number"]),
        ({"on_nonfinite": "ignore"}, ValueError, ["on_nonfinite", "skip"]),
        ({"backend": "mpi"}, ValueError, ["backend", "gloo"]),
        ({"schedule": "step"}, ValueError, ["schedule", "cosine"]),
        ({"error_feedback": "yes"}, TypeError, ["error_feedback"]),
        ({"compressor_options": [1]}, TypeError, ["compressor_options", "dict"]),
        ({"checkpoint_every": 5}, ValueError, ["checkpoint_dir"]),
        ({"nesterov": True, "momentum": 0.0}, ValueError, ["nesterov"]),
        ({"native_ddp": True, "compressor": "topk"}, ValueError, ["native_ddp", "'none'"]),
        ({"native_ddp": True, "aggregator": "median"}, ValueError, ["native_ddp", "aggregator"]),
        ({"native_ddp": "yes"}, TypeError, ["native_ddp"]),
        ({"reuse_host_memory": 1}, TypeError, ["reuse_host_memory", "True or False"]),
        ({"ddp": "no"}, TypeError, ["ddp", "True or False"]),
        ({"native_ddp": True, "ddp": False}, ValueError, ["native_ddp", "needs ddp=True"]),
        ({"momentum_correction": 1}, TypeError, ["momentum_correction", "True or False"]),
        (
            {"compressor": "topk", "momentum_correction": True, "momentum": 0.0},
            ValueError,
            ["momentum_correction", "momentum > 0"],
        ),
        (
            {"compressor": "topk", "momentum_correction": True, "nesterov": True},
            ValueError,
            ["momentum_correction", "no nesterov"],
        ),
        (
            {"compressor": "none", "momentum_correction": True},
            ValueError,
            ["momentum_correction", "sends chosen indices", "'none'"],
        ),
        # "no" was read as True (resume="no" with a checkpoint_dir resumed), and an infinite
        # timeout passed, then failed in every worker converting it.
        ({"resume": "no"}, TypeError, ["resume must be True or False, got 'no'"]),
        ({"nesterov": 1}, TypeError, ["nesterov must be True or False, got 1"]),
        ({"progress": None}, TypeError, ["progress must be True or False, got None"]),
        ({"timeout_s": float("inf")}, ValueError, ["timeout_s", "(0, 1e+09]", "got inf"]),
        ({"timeout_s": 0}, ValueError, ["timeout_s", "(0, 1e+09]"]),
        ({"bucket_cap_mb": 0}, ValueError, ["bucket_cap_mb", "in (0, 1.1e+12]"]),
        ({"bucket_cap_mb": float("inf")}, ValueError, ["bucket_cap_mb", "in (0, 1.1e+12]"]),
        # Past DDP's int64 bucket bytes, and float32's largest scale: they failed in a worker.
        ({"bucket_cap_mb": 1e13}, ValueError, ["bucket_cap_mb", "in (0, 1.1e+12]"]),
        ({"amp": "fp16", "init_loss_scale": 1e39}, ValueError, ["init_loss_scale", "3.403e+38"]),
        ({"bucket_cap_mb": "25"}, TypeError, ["bucket_cap_mb", "number"]),
        # Robust aggregation is checked here too, not first in every spawned worker.
        ({"aggregator": "bogus"}, ValueError, ["unknown aggregator 'bogus'", "krum"]),
        ({"aggregator": "median", "aggregator_options": {"zzz": 1}}, ValueError, ["'zzz'"]),
        (
            {"aggregator": "krum", "attack": "zero", "byzantine": 1, "workers": 4},
            ValueError,
            ["krum", "n > 2f + 2"],
        ),
        ({"attack": "bogus", "byzantine": 1}, ValueError, ["unknown attack 'bogus'"]),
        ({"amp": "fp8"}, ValueError, ["amp must be one of ('fp16', 'bf16') or None", "'fp8'"]),
        ({"amp": "fp16", "on_nonfinite": "skip"}, ValueError, ["amp='fp16'", "hide them"]),
        # It became "propagate" silently, where the hook refuses "raise" with a scaler.
        ({"amp": "fp16", "on_nonfinite": "raise"}, ValueError, ["amp='fp16'", "stop the run"]),
        (
            {"amp": "fp16", "aggregator": "median"},
            ValueError,
            ["amp='fp16'", "amp='bf16'", "aggregator='median'"],
        ),
    ],
)
def test_train_config_refuses_bad_values_with_a_clear_message(kwargs, error, words):
    with pytest.raises(error) as exc:
        TrainConfig(**kwargs)
    for w in words:
        assert w in str(exc.value)


def test_fp16_mixed_precision_hands_overflows_to_the_loss_scaler():
    # The scaler skips the steps that overflow: the hook passes them on instead of raising,
    # and the command line's --amp reaches the config.
    assert TrainConfig(amp="fp16").on_nonfinite == "propagate"
    assert TrainConfig(amp="bf16").on_nonfinite == "raise"
    assert TrainConfig(amp="fp16").sync_config().on_nonfinite == "propagate"
    args = build_parser().parse_args(["train", "--amp", "fp16"])
    assert configs_from_args(args)[0].amp == "fp16"
    assert configs_from_args(args)[0].on_nonfinite == "propagate"
    assert TrainConfig().on_nonfinite == "raise"
    args = build_parser().parse_args(["train", "--amp", "fp16", "--on-nonfinite", "raise"])
    with pytest.raises(ValueError, match="on_nonfinite='raise' would stop the run"):
        configs_from_args(args)


def test_launch_refuses_runs_that_cannot_share_workers_before_spawning():
    with pytest.raises(ValueError, match="share workers"):
        launch([TrainConfig(workers=2), TrainConfig(workers=3, label="other")])
    with pytest.raises(ValueError, match="distinct labels"):
        launch([TrainConfig(compressor="topk"), TrainConfig(compressor="topk", lr=0.5)])
    with pytest.raises(ValueError, match="share reuse_host_memory"):  # a per-process setting
        launch([TrainConfig(), TrainConfig(reuse_host_memory=False, label="other")])
    with pytest.raises(TypeError, match="TrainConfig"):
        launch([{"compressor": "topk"}])


def test_launch_with_nccl_checks_for_a_gpu_a_worker_before_spawning(monkeypatch, tmp_path):
    # NCCL cannot put two ranks on one GPU: say so here instead of failing in the workers.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no worker folder may be made
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA devices; use backend 'gloo'"):
        launch(TrainConfig(backend="nccl", workers=2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="2 ranks on this machine need 2 CUDA devices.*has 1"):
        launch(TrainConfig(backend="nccl", workers=2))
    assert list(tmp_path.iterdir()) == []


def test_nccl_ranks_find_their_gpu_under_any_launcher(monkeypatch):
    from sparsetrain.train import _device_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert _device_for("nccl", 3) == torch.device("cuda", 3)  # spawned: rank r on GPU r
    with pytest.raises(ValueError, match="9 ranks on this machine need 9 CUDA devices"):
        _device_for("nccl", 8)
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setenv("WORLD_SIZE", "16")
    # A launcher that sets only RANK and WORLD_SIZE (two machines of 8 GPUs): rank 9 is GPU 1.
    assert _device_for("nccl", 9) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "5")  # torchrun says which
    assert _device_for("nccl", 9) == torch.device("cuda", 5)
    assert _device_for("gloo", 9) == torch.device("cpu")


def test_config_dict_is_json_ready_and_records_the_density_used():
    c = TrainConfig(compressor="topk", density=0.02, label="topk-2%")
    d = json.loads(json.dumps(c.to_dict()))
    assert d["density"] == 0.02 and d["label"] == "topk-2%" and d["compressor"] == "topk"


# ---- sharding ---------------------------------------------------------------------------------


# (1, 3) and (2, 5): fewer examples than half the ranks, where the padding must wrap more than
# once (one pass of padding left a rank with an empty shard, which then ran no step at all).
@pytest.mark.parametrize(("n", "world"), [(1348, 4), (10, 3), (7, 8), (5, 1), (1, 3), (2, 5)])
def test_shards_are_disjoint_equal_and_cover_the_data(n, world):
    shards = [shard_indices(n, r, world, seed=3, epoch=1) for r in range(world)]
    assert {len(s) for s in shards} == {-(-n // world)}  # every rank runs the same steps
    everything = torch.cat(shards)
    assert set(everything.tolist()) == set(range(n))
    if n % world == 0:
        assert len(everything) == n  # no padding needed: a true partition


def test_shuffle_depends_on_seed_and_epoch_only():
    a = shard_indices(100, 1, 4, seed=0, epoch=2)
    assert torch.equal(a, shard_indices(100, 1, 4, seed=0, epoch=2))  # a resumed run sees the same
    assert not torch.equal(a, shard_indices(100, 1, 4, seed=0, epoch=3))
    assert not torch.equal(a, shard_indices(100, 1, 4, seed=1, epoch=2))


# ---- report, table, picture -------------------------------------------------------------------


def fake_report() -> dict:
    def run(label: str, acc: float, sent: float) -> dict:
        return {
            "label": label,
            "task": "digits-mlp",
            "compressor": label,
            "final_test_accuracy": acc,
            "bytes_sent_per_rank": sent,
            "dense_bytes_per_rank": 1e6,
            "wall_seconds": 2.5,
            "curves": {
                "step": [0, 10, 20],
                "wall_seconds": [0.0, 1.0, 2.0],
                "train_loss": [None, 1.0, 0.5],
                "test_accuracy": [0.1, 0.5, acc],
            },
        }

    return {"world_size": 4, "runs": [run("none", 0.97, 1e6), run("topk", 0.96, 4e4)]}


def test_summary_table_shows_accuracy_bytes_ratio_and_time():
    lines = summary_table(fake_report()).splitlines()
    assert lines[0].split() == ["run", "test", "acc", "MB", "sent/rank", "vs", "dense", "seconds"]
    assert lines[2].split() == ["none", "97.0%", "1.000", "100.00%", "2.5"]
    assert lines[3].split() == ["topk", "96.0%", "0.040", "4.00%", "2.5"]
    # Steps dropped for NaN/Inf (a loss scaler's overflows) get a column where there were any.
    report = fake_report()
    report["runs"][1]["skipped_steps"] = 3
    lines = summary_table(report).splitlines()
    assert lines[0].split()[-2:] == ["skipped", "steps"]
    assert lines[2].split()[-1] == "0" and lines[3].split()[-1] == "3"


def test_report_round_trips_and_the_picture_is_a_png(tmp_path):
    from sparsetrain.plotting import plot_report

    report = fake_report()
    path = write_report(report, tmp_path / "sub" / "out.json")
    assert json.loads(path.read_text()) == report
    png = plot_report(json.loads(path.read_text()), tmp_path / "out.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no runs"):
        plot_report({"runs": []}, tmp_path / "empty.png")


def test_worker_error_names_the_rank_and_the_cause():
    e = WorkerError(2, "ValueError", "unknown collective 'x'", "Traceback ...")
    assert str(e) == "worker rank 2 failed: ValueError: unknown collective 'x'"
    assert e.rank == 2 and e.error_type == "ValueError"


def test_worker_error_leaves_out_a_torch_errors_native_stack_but_keeps_its_own_lines():
    gloo = (
        "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242\n"
        "Exception raised from recvFromPeer at gloo/pair.cc:534 (most recent call first):\n"
        "frame #0: c10::Error::Error(...) + 0x98\nframe #1: ..."
    )
    e = WorkerError(1, "RuntimeError", gloo)
    assert str(e) == (
        "worker rank 1 failed: RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection "
        "closed by peer [127.0.0.1]:4242"
    )
    ours = "the ranks differ:\n  density: rank 0 has 0.1, rank 1 has 0.2"
    assert str(WorkerError(0, "ValueError", ours)).endswith(ours)


def test_evaluate_gives_the_same_answer_for_any_dataset_type():
    from torch.utils.data import Dataset

    from sparsetrain.train import evaluate

    class Pairs(Dataset):  # not a TensorDataset: examples are collated one by one
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    torch.manual_seed(0)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    model = torch.nn.Linear(4, 3)
    cpu = torch.device("cpu")
    loss_fn = torch.nn.functional.cross_entropy
    fast = evaluate(model, torch.utils.data.TensorDataset(x, y), loss_fn, cpu, batch_size=16)
    slow = evaluate(model, Pairs(x, y), loss_fn, cpu, batch_size=7)
    assert fast == pytest.approx(slow)
    with torch.no_grad():
        logits = model(x)
    assert fast[1] == int((logits.argmax(1) == y).sum()) / len(y)
    assert fast[0] == pytest.approx(loss_fn(logits, y).item())


def test_under_torchrun_train_config_checks_against_world_size(monkeypatch):
    # workers is ignored under torchrun (launch() takes WORLD_SIZE), so the checks that depend
    # on the number of ranks must use the job's size: Krum with f=1 needs 5 ranks, not 4.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    TrainConfig(aggregator="krum", attack="sign_flip", byzantine=1)
    TrainConfig(attack="sign_flip", byzantine=5)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
        TrainConfig(aggregator="krum", attack="sign_flip", byzantine=1, workers=8)


def test_no_help_text_shows_docstring_markup():
    import argparse

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    found = list(parsers(build_parser()))
    assert len(found) > 8  # the subcommands and bench's own
    for p in found:
        assert "``" not in p.format_help(), p.prog


def test_momentum_correction_names_only_the_conditions_it_misses():
    with pytest.raises(ValueError) as e:
        TrainConfig(compressor="topk", momentum_correction=True, nesterov=True)
    assert "it needs no nesterov (got nesterov=True)" in str(e.value)
    assert "momentum > 0" not in str(e.value) and "native_ddp" not in str(e.value)


def test_python_dash_m_sparsetrain_runs_the_command_line():
    """`python -m sparsetrain` is the `sparsetrain` script: same parser, same exit status."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sparsetrain", "simulate", "--ranks", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("usage: sparsetrain simulate"), done.stderr


def test_a_report_is_replaced_only_once_the_new_one_is_whole(tmp_path, monkeypatch):
    """A full disk while writing left the older report as 4096 bytes of broken JSON."""
    import sparsetrain.train as train_module

    path = tmp_path / "r.json"
    write_report({"old": 1}, path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module.os, "replace", full)
    with pytest.raises(OSError):
        write_report(fake_report(), path)
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_a_report_that_cannot_be_written_is_kept_elsewhere_and_the_plot_still_made(
    tmp_path, monkeypatch, capsys
):
    """After training, an unwritable report path was a traceback: the results were lost and
    the plot never made."""
    from sparsetrain.commands import train as command

    report = fake_report()
    monkeypatch.setattr(command, "check_launch", lambda configs: None)
    monkeypatch.setattr(command, "launch", lambda configs: report)
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "afile" / "r.json"  # its folder is a file
    code, _ = command.run_and_report([], str(bad), str(tmp_path / "p.png"), "sparsetrain train")
    err = capsys.readouterr().err
    assert code == 1
    assert f"sparsetrain train: error: cannot write the report to {bad}:" in err
    spare = Path(err.split("report: ")[1].split(" (instead)")[0])
    try:
        assert json.loads(spare.read_text()) == report
    finally:
        spare.unlink()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_nohup_keeps_the_launcher_running_on_sighup():
    """Under nohup SIGHUP is ignored; the launcher's handler replaced that and stopped a run
    meant to outlive the terminal."""
    import signal

    from sparsetrain.train import _exit_on_sigterm

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        restore = _exit_on_sigterm()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        restore()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        restore = _exit_on_sigterm()
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
        restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


def test_checkpoints_and_reports_get_the_mode_open_would_give(tmp_path):
    """Written through mkstemp, they were readable by their owner only (0600)."""
    from sparsetrain.train import _save_checkpoint

    mask = os.umask(0o022)
    try:
        _save_checkpoint(tmp_path / "rank0.pt", {"step": 1})
        write_report({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(mask)
    assert (tmp_path / "rank0.pt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_report_path_that_is_a_link_stays_a_link(tmp_path):
    target = tmp_path / "real.json"
    write_report({"old": 1}, target)
    (tmp_path / "link.json").symlink_to(target)
    write_report({"new": 2}, tmp_path / "link.json")
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads(target.read_text()) == {"new": 2}


def test_checkpoint_lock_removes_dead_saves_and_runs_unlocked_where_locks_are_missing(
    tmp_path, monkeypatch
):
    """A save killed half way left a checkpoint-sized temporary file behind each time; a file
    system without locks (Lustre without -o flock) made every rank fail."""
    import errno
    import fcntl

    from sparsetrain.train import _checkpoints_locked

    config = TrainConfig(checkpoint_dir=str(tmp_path), label="run", progress=False)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "rank0.abc123.tmp").write_bytes(b"half a checkpoint")
    (folder / "rank1.abc123.tmp").write_bytes(b"another rank's")
    with _checkpoints_locked(config, 0):
        pass
    assert sorted(p.name for p in folder.iterdir()) == ["rank0.lock", "rank1.abc123.tmp"]

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock the checkpoints"):
        with _checkpoints_locked(config, 0):
            pass


def test_the_bucket_size_flag_has_ddps_name_too():
    # DDP, TrainConfig and GradientSync call it bucket_cap_mb; the flag was --bucket-mb only.
    for flag in ("--bucket-cap-mb", "--bucket-mb"):
        args = build_parser().parse_args(["train", flag, "10"])
        assert configs_from_args(args)[0].bucket_cap_mb == 10.0


def test_version_flag_prints_the_package_version(capsys):
    import sparsetrain

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparsetrain {sparsetrain.__version__}"


def test_the_package_ships_its_license_and_typing_marker():
    import sparsetrain

    root = Path(__file__).resolve().parents[2]
    assert "Apache License" in (root / "LICENSE").read_text()
    assert (Path(sparsetrain.__file__).parent / "py.typed").exists()


@pytest.fixture
def closed_stdout(tmp_path, monkeypatch):
    """sys.stdout as a pipe whose reader has gone: every write raises BrokenPipeError (its fd
    is a file of the test's, which the redirect to os.devnull may take)."""
    import sys

    sink = open(tmp_path / "sink", "w")  # noqa: SIM115 - the fd the closed stdout stands on

    class Closed:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return sink.fileno()

    monkeypatch.setattr(sys, "stdout", Closed())
    yield
    sink.close()


def test_a_closed_stdout_neither_fails_nor_skips_the_reports_files(
    tmp_path, monkeypatch, capsys, closed_stdout
):
    """`sparsetrain train ... | head -1`: the closed pipe was taken for a failed write, "cannot
    write the report" was said of a report that was written, a spare copy was left in $TMPDIR
    and the exit status was 1."""

    from sparsetrain.commands import train as command

    monkeypatch.setattr(command, "check_launch", lambda configs: None)
    monkeypatch.setattr(command, "launch", lambda configs: fake_report())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    report, plot = tmp_path / "out" / "r.json", tmp_path / "out" / "r.png"
    code, _ = command.run_and_report([], str(report), str(plot), "sparsetrain train")
    assert code == 0
    assert "cannot write" not in capsys.readouterr().err
    assert json.loads(report.read_text())["runs"] and plot.stat().st_size > 0
    assert not list((tmp_path / "tmp").iterdir())  # no spare copy


def test_a_diverged_runs_report_is_standard_json(tmp_path):
    """A diverged run's NaN loss was written as a bare NaN, which JSON parsers outside Python
    refuse."""
    report = fake_report()
    run = report["runs"][0]
    run["final_test_loss"] = float("nan")
    run["curves"]["test_loss"] = [1.0, float("inf"), float("nan")]
    path = write_report(report, tmp_path / "r.json")

    def refuse(name: str) -> float:
        raise ValueError(f"{name} is not JSON")

    back = json.loads(path.read_text(), parse_constant=refuse)
    assert back["runs"][0]["final_test_loss"] is None
    assert back["runs"][0]["curves"]["test_loss"] == [1.0, None, None]
    assert back["runs"][1] == json.loads(json.dumps(report["runs"][1]))  # the rest as it was


def test_a_workers_warnings_name_its_rank_instead_of_torchs_spawn_code(monkeypatch, capsys):
    """A library warning points at the user's call; in `sparsetrain train`'s workers there is
    none, and it pointed at torch/multiprocessing/spawn.py's `fn(i, *args)`."""
    import warnings

    from sparsetrain.train import _name_rank_in_warnings

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after
    _name_rank_in_warnings(3)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("aggregator 'median' is built for f=0", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "sparsetrain: rank 3: UserWarning: aggregator 'median' is built for f=0\n", err


def test_simulate_writes_its_files_when_stdout_is_closed(tmp_path, closed_stdout):
    """The table went first: a closed stdout ended the command before --json and --plot were
    written, and the exit was a quiet 141."""

    from sparsetrain.cli import main

    out, png = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["simulate", "--ranks", "8", "--json", str(out), "--plot", str(png)]) == 0
    assert json.loads(out.read_text())["rows"] and png.stat().st_size > 0


def test_demo_gives_sparse_settings_to_the_compressors_that_take_them(
    monkeypatch, tmp_path, capsys
):
    # --collective oktopk and --momentum-correction refused the whole demo for its dense
    # baseline, and --option density=0.05 clashed with the demo's own 0.01.
    from sparsetrain.cli import main
    from sparsetrain.commands import demo

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(
        demo, "run_and_report", lambda configs, *a: (calls.append(configs), (0, None))[1]
    )
    assert (
        main(["demo", "--collective", "oktopk", "--momentum-correction", "--out", str(tmp_path)])
        == 0
    )
    by = {c.compressor: c for c in calls[-1]}
    assert (by["none"].collective, by["none"].momentum_correction) == ("allgather", False)
    for c in ("topk", "threshold"):
        assert (by[c].collective, by[c].momentum_correction) == ("oktopk", True)
    err = capsys.readouterr().err
    assert (
        "note: --collective oktopk reduces sparse payloads: topk, threshold use it; none runs"
        in err
    )
    assert (
        "note: --momentum-correction needs error feedback: topk, threshold use it; none runs" in err
    )
    assert (
        main(["demo", "--compressor", "topk", "--option", "density=0.05", "--out", str(tmp_path)])
        == 0
    )
    (only,) = calls[-1]
    assert only.density is None and only.compressor_options == {"density": 0.05}
    # One compressor that cannot take the collective is still refused, naming it.
    with pytest.raises(SystemExit):
        main(["train", "--compressor", "none", "--collective", "oktopk"])
    assert "compressor 'none' sends dense payloads" in capsys.readouterr().err


def test_a_bad_value_the_config_refuses_names_the_commands_flag(capsys):
    # The command printed TrainConfig's field names (momentum, weight_decay) to its user.
    from sparsetrain.cli import main

    for argv, flag in ((["--momentum", "5"], "--momentum: momentum must be in [0, 1)"),
                       (["--weight-decay", "-1"], "--weight-decay: weight_decay must be"),
                       (["--bucket-cap-mb", "1e13"], "--bucket-cap-mb: bucket_cap_mb must be")):  # fmt: skip
        with pytest.raises(SystemExit):
            main(["train", *argv])
        assert flag in capsys.readouterr().err


def test_a_robust_rule_without_a_compressor_runs_uncompressed_and_says_so(capsys):
    # It had kept threshold, which sends no fewer bytes through the rule's gather of whole
    # gradients and lost accuracy (52% against 91.5% under median).
    (c,) = configs("train", "--aggregator", "median", "--aggregator-option", "f=1")
    assert c.compressor == "none"
    assert "running --compressor none" in capsys.readouterr().err
    for given in (("--compressor", "topk"), ("--density", "0.1")):
        (c,) = configs("train", "--aggregator", "median", *given)
        assert c.compressor == ("topk" if "topk" in given else "threshold")
    (c,) = configs("train")
    assert c.compressor == "threshold"


def test_lists_of_names_take_spaces_and_commas_alike_or_say_how(capsys):
    # robust-matrix took only commas and prune only a repeated flag: either other form failed
    # as an unrecognized argument; train took only spaces and did not say so.
    args = parse("robust-matrix", "--aggregators", "mean", "median,krum", "--attacks", "none")
    assert args.aggregators == "mean,median,krum" and args.attacks == "none"
    assert parse("robust-matrix").aggregators.split(",")[0] == "mean"  # the default as it was
    assert parse("prune", "--method", "magnitude", "woodfisher", "--method", "rigl",
                 "--report", "r.json").method == [
        "magnitude", "woodfisher", "rigl",
    ]  # fmt: skip
    err = parse_error(capsys, "train", "--compressor", "threshold,topk")
    assert "several are separated by spaces: --compressor threshold topk" in err


def test_the_robust_heatmap_labels_a_rule_built_for_a_lower_f_as_the_table_does(tmp_path):
    from sparsetrain.commands.robust_matrix import format_table, plot_heatmap

    result = {
        "task": "digits-mlp", "config": {"byzantine": 4, "workers": 10}, "simulate": True,
        "cells": [
            {"aggregator": "krum", "attack": "none", "accuracy": 0.9, "rule_f": 3,
             "byzantine": 0, "workers": 10},
            {"aggregator": "median", "attack": "none", "accuracy": 0.9, "rule_f": 4,
             "byzantine": 0, "workers": 10},
        ],
        "worst": {},
    }  # fmt: skip
    assert "krum(f=3)" in format_table(result)
    import matplotlib.pyplot as plt

    shown = []
    real = plt.Axes.set_yticks

    def spy(self, ticks, labels=None, **kw):
        shown.append(list(labels or []))
        return real(self, ticks, labels, **kw)

    plt.Axes.set_yticks = spy
    try:
        plot_heatmap(result, str(tmp_path / "m.png"))
    finally:
        plt.Axes.set_yticks = real
    assert ["krum(f=3)", "median"] in shown


def test_a_ctrl_c_while_torch_is_imported_is_a_quiet_exit(tmp_path):
    """`import sparsetrain` loads torch only when a name needs it, so the command's own Ctrl-C
    handling covers torch's import of several seconds: a Ctrl-C then had printed Python's
    traceback from the script's first line. (A stand-in torch raises it here.)"""
    import subprocess
    import sys

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    import sparsetrain

    src = Path(sparsetrain.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(src)])}
    code = "import sys; from sparsetrain.cli import main; sys.exit(main(['simulate']))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 130, out.stderr
    assert out.stderr.strip() == "interrupted"


def test_the_package_names_load_their_modules_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, sparsetrain, sparsetrain.cli; print('torch' in sys.modules); "
        "from sparsetrain import GradientSync, get_compressor; "
        "print(GradientSync.__module__, get_compressor('topk', density=0.1).name, "
        "set(sparsetrain.__all__) <= set(dir(sparsetrain)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "sparsetrain.sync.gradient_sync", "topk", "True"]
    # Subpackages are reached as attributes after a plain import, as the docs use them.
    code = "import sparsetrain; print(sparsetrain.comm.available_collectives()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "allgather"
    import sparsetrain

    with pytest.raises(AttributeError, match="module 'sparsetrain' has no attribute 'Nope'"):
        sparsetrain.Nope  # noqa: B018
