"""Bad input to `sparsetrain simulate`, `bench refit` and `bench cluster` is an argparse error.

Each error names the option (or the file) and what is allowed, with exit code 2 and no
traceback. No cluster is built: `bench cluster` runs against a stand-in for EmulatedCluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import sparsetrain
import sparsetrain.cluster
from sparsetrain.cli import main
from sparsetrain.cluster import ClusterError, ClusterPermissionError, ClusterTimeoutError
from sparsetrain.commands import simulate
from tests.unit.test_cli_model import TRUE, model_records


def argparse_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect an argparse error, return its stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def worker_records(sizes=(10**6,), densities=(0.001, 0.01, 0.1), cores=2, world=8) -> list[dict]:
    """Records as the bench worker writes them, timed by the model under TRUE."""
    return model_records(sizes, densities, cores, world)


def results(**changes) -> dict:
    """A valid `bench cluster` JSON, with top-level entries replaced by ``changes``."""
    return {
        "config": {"ranks": 8, "cores": 2},
        "link": {"bandwidth_measured_bps": 8 / TRUE.beta},
        "records": worker_records(),
        **changes,
    }


# ---- simulate ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--gamma-ns", "nan"], "--gamma-ns must be a finite number >= 0, got nan"),
        (["--gamma-ns", "inf"], "--gamma-ns must be a finite number >= 0, got inf"),
        (["--gamma-dense-ns", "-1"], "--gamma-dense-ns must be a finite number >= 0"),
        (["--gamma-sort-ns", "inf"], "--gamma-sort-ns must be a finite number >= 0"),
        (["--overhead-us", "nan"], "--overhead-us must be a finite number >= 0"),
        (["--latency", "1e400s"], "--latency: duration must be a finite number"),
        # tc reads a bare time as microseconds, a Python number is seconds: a unit is needed
        (["--latency", "5"], "--latency: duration '5' needs a unit: write for example 5us"),
        (["--compute", "200"], "--compute: duration '200' needs a unit"),
        (["--latency", "abc"], "--latency: cannot read duration 'abc'"),
        (["--compute", "abc"], "--compute: cannot read duration 'abc'"),
        (["--compute=-5ms"], "--compute: duration must not be negative, got '-5ms'"),
        (["--compute", "1e400s"], "--compute: duration must be a finite number"),
        (["--density", "nan"], "--density must be in (0, 1], got nan"),
        (["--density", "inf"], "--density must be in (0, 1], got inf"),
        (["--density", "1.5"], "--density must be in (0, 1]"),
        (["--numel", "0"], "--numel: count must be a positive whole number, got '0'"),
        (["--numel", "1e400"], "--numel: count must be a positive whole number"),
        (["--ranks", "1.5"], "--ranks: '1.5' is not a whole number (write e.g. 64, 1024 or 1k)"),
        (["--ranks", "1.0005k"], "--ranks: '1.0005k' is not a whole number"),
        (["--ranks", "0"], "--ranks: every value must be >= 2"),
        (["--ranks", "8,,16"], "--ranks '8,,16' has an empty item"),
        (["--bandwidth", "1e400gbit"], "--bandwidth: bandwidth must be a finite number"),
    ],
)
def test_simulate_refuses_unreadable_or_non_finite_options(argv, words, capsys):
    assert words in argparse_error(capsys, ["simulate", *argv])


def test_simulate_reads_ranks_as_numel_is_written(capsys):
    err = argparse_error(capsys, ["simulate", "--ranks", "1k,1e3", "--bandwidth", "10gbit"])
    assert "--ranks lists 1e3 twice (1k and 1e3)" in err
    assert main(["simulate", "--ranks", "64,2k", "--bandwidth", "10gbit"]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows if r and r[0] in ("64", "2000")] == ["64", "2000"]


def test_simulate_fitted_and_explicit_local_costs_exclude_each_other(capsys):
    err = argparse_error(capsys, ["simulate", "--fitted", "x.json", "--gamma-ns", "5"])
    assert "--fitted takes the local costs and the overhead from x.json" in err
    assert "pass either it or --gamma-ns" in err


def test_simulate_keeps_columns_apart_for_huge_values(capsys):
    assert main(["simulate", "--ranks", "8", "--bandwidth", "1gbit", "--numel", "1e30"]) == 0
    rows = capsys.readouterr().out.splitlines()[3:]
    assert rows and all("e+" in row for row in rows)
    assert all(len(row.split()) == len(rows[0].split()) for row in rows)


def test_simulate_density_must_keep_at_least_one_entry(capsys):
    err = argparse_error(capsys, ["simulate", "--density", "1e-12"])
    assert "--density 1e-12 keeps k = 0.00011 entries" in err
    assert "smallest allowed density for this size is 9.1e-09" in err
    err = argparse_error(capsys, ["simulate", "--numel", "7", "--density", "0.1"])
    assert "the smallest allowed density for this size is 0.143" in err
    # The smallest density named is accepted.
    assert main(["simulate", "--ranks", "8", "--density", "9.1e-09"]) == 0
    assert main(["simulate", "--ranks", "4", "--numel", "7", "--density", "0.143"]) == 0
    # 1 / 1e9 in floats rounded up to 1.01e-09, though 1e-09 is accepted.
    err = argparse_error(capsys, ["simulate", "--numel", "1e9", "--density", "1e-30"])
    assert "the smallest allowed density for this size is 1e-09" in err


EXPECTED = "expected a `sparsetrain bench cluster` JSON whose model_fit.params holds gamma"


@pytest.mark.parametrize(
    "text, words",
    [
        ("not json", "not JSON"),
        ("[]", "no model_fit.params"),
        ("{}", "no model_fit.params"),
        ('{"model_fit": null}', "no model_fit.params"),
        ('{"model_fit": {"params": null}}', "no model_fit.params"),
        ('{"model_fit": {"params": {"gamma": 1e-9}}}', "model_fit.params lacks gamma_dense"),
        ('{"model_fit": {"params": {}}}', "model_fit.params lacks gamma, gamma_dense"),
    ],
)
def test_simulate_fitted_says_what_file_it_expects(tmp_path, capsys, text, words):
    path = tmp_path / "fit.json"
    path.write_text(text)
    err = argparse_error(capsys, ["simulate", "--fitted", str(path)])
    assert f"--fitted {path}: {words}" in err
    assert EXPECTED in err


@pytest.mark.parametrize(
    "name, value",
    [("gamma", float("nan")), ("gamma_dense", float("inf")), ("gamma_sort", -1e-9),
     ("overhead", "1ms"), ("gamma", None), ("overhead", True)],
)  # fmt: skip
def test_simulate_fitted_values_must_be_finite_and_non_negative(tmp_path, capsys, name, value):
    params = {"gamma": 1e-9, "gamma_dense": 1e-10, name: value}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"model_fit": {"params": params}}))  # NaN, Infinity as Python's
    err = argparse_error(capsys, ["simulate", "--fitted", str(path)])
    assert f"--fitted {path}: model_fit.params.{name} must be a finite number >= 0" in err


def test_simulate_fitted_missing_file(tmp_path, capsys):
    path = tmp_path / "missing.json"
    err = argparse_error(capsys, ["simulate", "--fitted", str(path)])
    assert f"--fitted {path}: cannot read it" in err and EXPECTED in err


def test_simulate_json_that_cannot_be_written(tmp_path, capsys):
    """Refused before the table is printed, as --plot is (the table printed, then the write
    failed, and a --plot given with it was never drawn)."""
    err = argparse_error(capsys, ["simulate", "--ranks", "8", "--json", str(tmp_path)])
    assert f"--json {tmp_path}: is a folder; give a file name" in err
    (tmp_path / "file").write_text("")
    under_file = tmp_path / "file" / "sim.json"
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--ranks", "8", "--json", str(under_file)])
    said = capsys.readouterr()
    assert exc.value.code == 2 and f"--json {under_file}: " in said.err, said.err
    assert "is a file" in said.err, said.err
    assert "sparsetrain simulate:" not in said.out, said.out  # no table


def test_simulate_help_names_the_real_options_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--compute-ms" not in text and "--compute-ms" not in simulate.__doc__
    assert "--compute 200ms" in text
    for default in ("(default 64,256,1024)", "(default 10gbit,100gbit)", "(default bert-base"):
        assert default in text


@pytest.mark.parametrize(
    "command, default",
    [("demo", "(default: none topk threshold;"), ("train", "(default: threshold;")],
)
def test_help_gives_the_compressors_each_command_runs_by_default(command, default, capsys):
    from sparsetrain.commands.demo import DEMO_COMPRESSORS

    assert DEMO_COMPRESSORS == ["none", "topk", "threshold"]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert default in " ".join(capsys.readouterr().out.split())


# ---- bench refit ------------------------------------------------------------------------------
def _bad_record(**changes) -> dict:
    rec = {**worker_records()[0], **changes}
    return results(records=[rec, *worker_records()[1:]])


def _without(key: str) -> dict:
    rec = worker_records()[0]
    del rec[key]
    return results(records=[rec, *worker_records()[1:]])


@pytest.mark.parametrize(
    "data, words",
    [
        ([], "expected a JSON object, got list"),
        (results(records={"a": 1}), "records must be a list of objects"),
        (results(records=[1, 2, 3]), "records[0] must be an object, got 1"),
        (_without("median_s"), "records[0] lacks median_s"),
        (_without("algorithm"), "records[0] lacks algorithm"),
        (_without("numel"), "records[0] lacks numel"),
        (_without("density"), "records[0] lacks density"),
        (_bad_record(median_s=0), "records[0] median_s must be a finite number of seconds >= 1e-9"),
        (
            _bad_record(median_s=-1.0),
            "median_s must be a finite number of seconds >= 1e-9, got -1.0",
        ),
        (_bad_record(median_s=float("inf")), "median_s must be a finite number of seconds >= 1e-9"),
        (_bad_record(median_s=float("nan")), "median_s must be a finite number of seconds >= 1e-9"),
        (_bad_record(median_s="1"), "median_s must be a finite number of seconds >= 1e-9"),
        (_bad_record(median_s=1e-160), "median_s must be a finite number of seconds >= 1e-9"),
        (results(records=None), "(is it a JSON written by `sparsetrain bench cluster`?)"),
        (_bad_record(numel=0), "records[0] numel must be an int >= 1, got 0"),
        (_bad_record(density=2), "records[0] density must be a number in (0, 1], got 2"),
        (
            _bad_record(numel=1000, density=1e-4),
            "records[0] density 0.0001 keeps no entry of its 1,000-element vector",
        ),
        (_bad_record(algorithm=None), "records[0] algorithm must be a name"),
        (results(config=None), "config must be an object"),
        (results(config={"cores": 2}), "config.ranks must be an int >= 2, got None"),
        (results(config={"ranks": 1}), "config.ranks must be an int >= 2, got 1"),
        (results(config={"ranks": 8.0}), "config.ranks must be an int >= 2, got 8.0"),
        (results(config={"ranks": "8"}), "config.ranks must be an int >= 2, got '8'"),
        (results(config={"ranks": 8, "cores": 0}), "config.cores must be an int >= 1"),
        (results(config={"ranks": 8, "cores": 1.5}), "config.cores must be an int >= 1"),
        (results(link=[1]), "link must be an object"),
        (results(link={"bandwidth_measured_bps": 0}), "link.bandwidth_measured_bps must be a"),
        (results(link={"bandwidth_measured_bps": -1e9}), "link.bandwidth_measured_bps must"),
        (results(link={"bandwidth_measured_bps": "1gbit"}), "link.bandwidth_measured_bps must"),
        (results(link={"bandwidth_measured_bps": float("nan")}), "bandwidth_measured_bps must"),
        # (8 / rate is inf: the fit had failed with a traceback)
        (results(link={"bandwidth_measured_bps": 1e-320}), "bandwidth_measured_bps must"),
        (results(link={"latency_configured_s": float("inf")}), "latency_configured_s must be a"),
        (results(link={"latency_configured_s": "100us"}), "latency_configured_s must be a"),
        (results(link={"latency_configured_s": -1e-4}), "latency_configured_s must be a"),
    ],
)
def test_refit_refuses_malformed_results(tmp_path, capsys, data, words):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    err = argparse_error(capsys, ["bench", "refit", str(path)])
    assert f"cannot read {path}: " in err and words in err


def test_refit_refuses_a_file_that_is_not_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text("{not json")
    assert f"cannot read {path}: Expecting" in argparse_error(capsys, ["bench", "refit", str(path)])


def test_refit_predict_refuses_a_zero_median(tmp_path, capsys):
    good, other = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text(json.dumps(results()))
    other.write_text(json.dumps(_bad_record(median_s=0.0)))
    err = argparse_error(capsys, ["bench", "refit", str(good), "--predict", str(other)])
    assert f"cannot read {other}: records[0] median_s must be" in err


def test_refit_predict_reads_the_other_file_before_printing_the_fit(tmp_path, capsys):
    good = tmp_path / "a.json"
    good.write_text(json.dumps(results()))
    with pytest.raises(SystemExit):
        main(["bench", "refit", str(good), "--predict", str(tmp_path / "missing.json")])
    out, err = capsys.readouterr()
    assert "cannot read" in err and "missing.json" in err
    assert "alpha" not in out  # no fit printed before the error


def test_refit_predict_takes_the_other_runs_emulated_latency_for_each_round(tmp_path, capsys):
    # Two runs on links of 100 us and 2.1 ms, timed by the same coefficients: the fit to the
    # first, given its latency, predicts the second exactly once each round waits 2.1 ms.
    from dataclasses import replace

    from sparsetrain import perfmodel as pm

    def timed(latency):
        params = replace(TRUE, latency=latency)
        return [{**r, "median_s": pm.predict(r["algorithm"], world=8, numel=r["numel"],
                                             density=r["density"], params=params, cores=2)}
                for r in worker_records()]  # fmt: skip

    fitted, other = tmp_path / "fitted.json", tmp_path / "other.json"
    link = {"bandwidth_measured_bps": 8 / TRUE.beta, "latency_emulated": True}
    fitted.write_text(json.dumps(results(link={**link, "latency_configured_s": 1e-4},
                                         records=timed(1e-4))))  # fmt: skip
    other.write_text(json.dumps(results(link={**link, "latency_configured_s": 2.1e-3},
                                        records=timed(2.1e-3))))  # fmt: skip
    assert main(["bench", "refit", str(fitted), "--predict", str(other)]) == 0
    out = capsys.readouterr().out
    assert "latency 100 us a round, known" in out
    want = f"emulated one-way latency: 2100 us in {other}, 100 us in {fitted}; predicted with "
    assert want + "2100 us a round" in out
    assert "held out, all points: 100% of 19 within 25%, median error 0%" in out
    # Runs that record no emulated latency: alpha takes the 100 us, and the 2.1 ms is missed.
    for path in (fitted, other):
        data = json.loads(path.read_text())
        data["link"]["latency_emulated"] = False
        path.write_text(json.dumps(data))
    assert main(["bench", "refit", str(fitted), "--predict", str(other)]) == 0
    out = capsys.readouterr().out
    assert "emulated one-way latency" not in out and "held out, all points: 100%" not in out


def test_refit_predict_says_when_the_runs_ran_on_other_processors(tmp_path, capsys):
    fitted, other = tmp_path / "fitted.json", tmp_path / "other.json"
    cases = [("CPU A", "CPU A", None),
             ("CPU A", "CPU B", f"ran on different processors (CPU A in {fitted}, CPU B in {other})"),
             ("CPU A", None, f"note: {other} does not record the processor it ran on"),
             (None, None, f"note: {fitted} and {other} do not record")]  # fmt: skip
    for mine, theirs, words in cases:
        for path, cpu in ((fitted, mine), (other, theirs)):
            path.write_text(json.dumps(results(**({"environment": {"cpu": cpu}} if cpu else {}))))
        assert main(["bench", "refit", str(fitted), "--predict", str(other)]) == 0
        out = capsys.readouterr().out
        if words is None:
            assert "note:" not in out
        else:
            assert words in out, out


@pytest.mark.parametrize("link", [None, {}, {"bandwidth_measured_bps": None}])
def test_refit_without_a_measured_link_rate_fits_beta_and_says_so(tmp_path, capsys, link):
    path = tmp_path / "r.json"
    data = results(link=link)
    if link is None:
        del data["link"]
    path.write_text(json.dumps(data))
    assert main(["bench", "refit", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path} records no measured link rate; beta is fitted too" in out
    assert "(measured link)" not in out
    assert main(["bench", "refit", str(path), "--free-beta"]) == 0
    assert "records no measured link rate" not in capsys.readouterr().out


# ---- bench cluster ----------------------------------------------------------------------------
class FakeCluster:
    """Stands in for EmulatedCluster: builds nothing; ``fail`` says what goes wrong. It checks
    its arguments as the real one does, and records the timeouts it was given."""

    instances: list[FakeCluster] = []
    fail: str | None = None

    def __init__(self, ranks, bandwidth="1gbit", latency="100us", latency_via="auto"):
        sparsetrain.cluster.netns.EmulatedCluster(
            ranks, bandwidth, latency, latency_via=latency_via
        )
        self.ranks, self.bandwidth_bps, self.latency_s = ranks, 1e9, 1e-4
        self.latency_emulated, self.latency_method = True, "netem"
        self.burst_bytes, self.gso_max_size = 15_500, 6_250
        self.entered, self.timeouts = False, {}
        FakeCluster.instances.append(self)

    def __enter__(self):
        if self.fail == "permission at build":
            raise ClusterPermissionError("the emulated cluster needs root")
        self.entered = True
        return self

    def __exit__(self, *exc):
        pass

    def measure_bandwidth(self, src=0, dst=1, nbytes=0, port=5201, *, timeout=None):
        self.timeouts["bandwidth"] = timeout
        if self.fail == "timeout":
            raise subprocess.TimeoutExpired(["probe.py", "recv"], 120)
        if self.fail == "probe hangs":
            time.sleep(min(timeout, 5))
            raise ClusterTimeoutError(
                f"link probe (bulk TCP from rank 0 to rank 1) did not finish within {timeout:.1f} "
                "s; it was killed"
            )
        time.sleep(0.3)  # the probes take a while: the time left for the rest shrinks
        return 8 / TRUE.beta

    def measure_rtt(self, src=0, dst=1, count=50, port=5202, *, timeout=None):
        self.timeouts["rtt"] = timeout
        return 2e-4

    def run(self, argv, *, timeout=None):
        self.timeouts["run"] = timeout
        cfg = json.loads(open(argv[-1]).read())
        records = worker_records(cfg["sizes"], cfg["densities"])
        records = [r for r in records if r["algorithm"] in cfg["algorithms"]]
        if self.fail == "rank":
            records = records[:2]
        with open(cfg["records_path"], "w") as f:
            json.dump(records, f)
        if self.fail == "rank":
            raise ClusterError("rank(s) [3] exited with [1]")


@pytest.fixture
def fake_cluster(monkeypatch, tmp_path):
    """Replace EmulatedCluster and put the run's temporary folders under tmp_path/"tmp"."""

    def check_privileges():
        if FakeCluster.fail == "permission":
            raise ClusterPermissionError("the emulated cluster needs root")

    monkeypatch.setattr(sparsetrain.cluster, "EmulatedCluster", FakeCluster)
    monkeypatch.setattr(sparsetrain.cluster, "check_privileges", check_privileges)
    monkeypatch.setattr(FakeCluster, "instances", [])
    monkeypatch.setattr(FakeCluster, "fail", None)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return FakeCluster


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--timeout", "0"], "--timeout must be > 0 seconds, got 0.0"),
        (["--min-time", "-1"], "--min-time must be >= 0 seconds, got -1.0"),
        (["--min-time", "nan"], "--min-time must be >= 0 seconds, got nan"),
        (["--max-reps", "2"], "--max-reps must be at least --reps (3), got 2"),
        (["--reps", "30", "--max-reps", "29"], "--max-reps must be at least --reps (30), got 29"),
        (["--timeout", "-5"], "--timeout must be > 0 seconds"),
        (["--timeout", "nan"], "--timeout must be > 0 seconds"),
        (["--probe-bytes", "0"], "--probe-bytes must be at least 1,000,000"),
        (["--probe-bytes", "100000"], "a smaller transfer times its start-up"),
        (["--sizes", "100k", "--densities", "1e-9"], "1e-09 keeps no entry of a 100,000-element"),
        (["--name", ""], "--name must be a non-empty file stem without a path separator"),
        (["--name", "a/b"], "--name must be a non-empty file stem without a path separator"),
        (["--sizes", "3G"], "--sizes: at most 2,147,483,647 (2**31 - 1) elements"),
        (["--sizes", "1M, 2147483648"], "got [2147483648]: the worker's indices are int32"),
        (["--latency", "abc"], "--latency: cannot read duration 'abc'"),
        (["--bandwidth", "fast"], "--bandwidth: cannot read bandwidth 'fast'"),
        (["--algorithms", "dense, oktopk", "--timeout", "0"], "--timeout must be > 0"),
        (["--densities", "0"], "--densities: density must be in (0, 1], got 0"),
        (["--densities", "0.01,1.5"], "--densities: density must be in (0, 1], got 1.5"),
        (["--densities", "often"], "--densities: could not convert string to float: 'often'"),
        (["--densities", ","], "--densities lists nothing"),
        (["--bandwidth", "0.5bit"], "bandwidth must be between 1kbit and 10tbit"),
        # tc's 32-bit burst (it failed half way through the build) and a probe that waited
        # for --timeout
        (["--bandwidth", "100tbit"], "bandwidth must be between 1kbit and 10tbit, got '100tbit'"),
        (["--latency", "1000s"], "latency must be at most 10s, one way, got '1000s'"),
        (["--ranks", "1"], "ranks must be between 2 and 1024, got 1"),
    ],
)
def test_cluster_options_are_checked_before_anything_is_made(
    fake_cluster, tmp_path, capsys, argv, words
):
    out = tmp_path / "new" / "out"
    err = argparse_error(capsys, ["bench", "cluster", "--out", str(out), *argv])
    assert words in err
    assert fake_cluster.instances == []
    assert list(tmp_path.iterdir()) == [tmp_path / "tmp"]  # neither out nor its parent
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cluster_out_must_be_a_folder_it_can_make(fake_cluster, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "out"):
        err = argparse_error(capsys, ["bench", "cluster", "--out", str(out)])
        assert f"--out {out}: {tmp_path / 'file'} is not a folder" in err
    assert fake_cluster.instances == [] and list((tmp_path / "tmp").iterdir()) == []


def test_cluster_refuses_an_out_it_could_not_write_the_results_to(fake_cluster, tmp_path, capsys):
    # Found only after the whole sweep, which was then lost: a folder where the JSON goes,
    # and a file system root may not write to (os.access says yes there).
    (tmp_path / "o" / "run.json").mkdir(parents=True)
    err = argparse_error(capsys, ["bench", "cluster", "--out", str(tmp_path / "o"), "--name",
                                  "run"])  # fmt: skip
    assert f"{tmp_path / 'o' / 'run.json'} is a folder, where the results go" in err
    if os.path.isdir("/proc/self"):
        err = argparse_error(capsys, ["bench", "cluster", "--out", "/proc/self/st-out"])
        assert "--out /proc/self/st-out: cannot write into /proc/self" in err
    assert fake_cluster.instances == []


def test_cleanup_takes_only_the_names_its_runs_give():
    from sparsetrain.cluster.netns import _OWN_NAME

    assert _OWN_NAME.match("st-12-ab12cd34-hub") and _OWN_NAME.match("st-12-ab12cd34-3")
    assert not _OWN_NAME.match("st-12-abcd-0")  # (4 hex digits had been taken as ours)


def test_cluster_without_root_says_so_and_makes_nothing(
    fake_cluster, tmp_path, capsys, monkeypatch
):
    # The real check, as a user without root meets it: `--out` used to be made before it ran.
    monkeypatch.setattr(
        sparsetrain.cluster, "check_privileges", sparsetrain.cluster.netns.check_privileges
    )
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out = tmp_path / "new" / "out"
    assert main(["bench", "cluster", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sparsetrain bench cluster: the emulated cluster needs root" in err
    assert not any(c.entered for c in fake_cluster.instances)
    assert list(tmp_path.iterdir()) == [tmp_path / "tmp"]  # neither out nor its parent
    assert list((tmp_path / "tmp").iterdir()) == []
    # Bad arguments are still named first, also without root.
    err = argparse_error(capsys, ["bench", "cluster", "--out", str(out), "--densities", "2"])
    assert "--densities: density must be in (0, 1], got 2" in err and not out.parent.exists()


def test_cluster_runs_and_writes_results_with_spaced_algorithms(fake_cluster, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "cluster", "--out", str(out), "--name", "run", "--sizes", "1M",
            "--algorithms", "dense, oktopk , allgather,"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "run.json").read_text())
    assert data["config"]["algorithms"] == ["dense", "oktopk", "allgather"]
    assert {r["algorithm"] for r in data["records"]} == {"dense", "oktopk", "allgather"}
    assert data["model_fit"]["beta_from_measured_link"] is True
    env = data["environment"]  # where and on what it ran, so runs of other days compare
    assert isinstance(env["command"], list) and env["cores"] >= 1  # (the command is sys.argv)
    assert env["cpu"] and env["torch"] == torch.__version__
    assert env["started_utc"].endswith("+00:00") and env["sparsetrain"] == sparsetrain.__version__
    assert list((tmp_path / "tmp").iterdir()) == []
    assert "wrote" in capsys.readouterr().out


def test_cluster_rank_failure_keeps_partial_records_and_removes_the_temp_folder(
    fake_cluster, tmp_path, capsys
):
    fake_cluster.fail = "rank"
    out = tmp_path / "out"
    assert main(["bench", "cluster", "--out", str(out), "--name", "run"]) == 1
    err = capsys.readouterr().err
    assert "sparsetrain bench cluster: rank(s) [3] exited with [1]" in err
    partial = out / "run.partial.json"
    assert f"partial records (the points finished): {partial}" in err
    saved = json.loads(partial.read_text())
    assert saved["partial"] and len(saved["records"]) == 2 and saved["config"]["ranks"] == 8
    assert not (out / "run.json").exists()
    # A results file like a finished run's: refit reads it (it used to be a bare list, "expected
    # a JSON object"); two points are too few to fit, and it says that instead.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["bench", "refit", str(partial)])
    err = capsys.readouterr().err
    assert "cannot read" not in err and "points" in err, err
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cluster_timeout_is_reported_and_removes_the_temp_folder(fake_cluster, tmp_path, capsys):
    fake_cluster.fail = "timeout"
    out = tmp_path / "out"
    assert main(["bench", "cluster", "--out", str(out), "--name", "run"]) == 1
    err = capsys.readouterr().err
    assert "sparsetrain bench cluster: Command '['probe.py', 'recv']' timed out" in err
    assert "partial records" not in err and not out.exists()
    assert list((tmp_path / "tmp").iterdir()) == []


class FakeClock:
    """The ``time`` module with a monotonic clock that only the fake's sleeps advance."""

    _real = time

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):
        return getattr(FakeClock._real, name)


def test_cluster_timeout_bounds_the_link_probes_and_the_collectives_together(
    fake_cluster, tmp_path, monkeypatch
):
    # The probes used to get their own allowance (a minute and more), whatever --timeout said.
    # A fake clock for the command and the stand-in: the budgets are exact, whatever the load.
    import sys

    from sparsetrain.commands import bench

    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(sys.modules[__name__], "time", clock)  # FakeCluster's sleep(0.3)
    argv = ["bench", "cluster", "--out", str(tmp_path / "out"), "--sizes", "1M", "--timeout", "10"]
    assert main(argv) == 0
    timeouts = fake_cluster.instances[0].timeouts
    assert timeouts["bandwidth"] == 10
    # One budget: what the bandwidth probe took (0.3 s) is not left for the rest.
    assert timeouts["rtt"] == pytest.approx(10 - 0.3, abs=1e-9)
    assert timeouts["run"] == pytest.approx(10 - 0.3, abs=1e-9)


def test_a_link_probe_that_hangs_is_stopped_by_the_timeout(
    fake_cluster, tmp_path, capsys, monkeypatch
):
    # A fake clock, as above: the time left (and the message) do not depend on the load.
    import sys

    from sparsetrain.commands import bench

    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(sys.modules[__name__], "time", clock)  # FakeCluster's sleep
    fake_cluster.fail = "probe hangs"
    out = tmp_path / "out"
    assert main(["bench", "cluster", "--out", str(out), "--timeout", "0.5"]) == 1
    # The probe got what was left of --timeout (the stand-in sleeps that long, at most 5 s).
    assert fake_cluster.instances[0].timeouts["bandwidth"] == 0.5
    err = capsys.readouterr().err
    assert "link probe (bulk TCP from rank 0 to rank 1) did not finish within 0.5 s" in err
    assert "(--timeout 0.5 s bounds the link probes and the collectives together)" in err
    assert "run" not in fake_cluster.instances[0].timeouts  # no worker was started
    assert not out.exists() and list((tmp_path / "tmp").iterdir()) == []


def test_cluster_refused_at_build_still_exits_2_and_removes_the_temp_folder(
    fake_cluster, tmp_path, capsys
):
    # The check before anything is made passed, and building the cluster still found no root.
    fake_cluster.fail = "permission at build"
    assert main(["bench", "cluster", "--out", str(tmp_path / "out")]) == 2
    assert "sparsetrain bench cluster: the emulated cluster needs root" in capsys.readouterr().err
    assert list((tmp_path / "tmp").iterdir()) == []


def test_plot_file_names_keep_sizes_apart():
    # Whole millions named both 100k and 500k "_0M.png": one picture overwrote the other.
    from sparsetrain.commands.bench import _size_label

    labels = [_size_label(n) for n in (100_000, 500_000, 1_000_000, 1_500_000, 25_000_000, 1234)]
    assert labels == ["100k", "500k", "1M", "1500k", "25M", "1234"]


def test_cleanup_finds_the_temporary_folders_of_dead_runs_only(tmp_path, monkeypatch):
    import os
    import tempfile

    from sparsetrain.commands.bench import _stale_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = 2**22 + 12345  # above the default pid_max: no such process
    names = [f"sparsetrain-bench-{dead}-a1", f"sparsetrain-bench-{os.getpid()}-b2",
             f"st-{dead}-deadbeef-logs-c3", f"st-{dead}-unrelated", "sparsetrain-bench-old"]  # fmt: skip
    for name in names:
        (tmp_path / name).mkdir()
    assert [p.name for p in _stale_folders(include_live=False)] == [names[0], names[2]]
    assert [p.name for p in _stale_folders(include_live=True)] == sorted(names[:3])


# ---- where results go, checked before any work -----------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--report", "{file}/r.json"], "--report {file}/r.json: {file} is a file"),
        (["train", "--report", "{tmp}"], "is a folder; give a file name"),
        (["train", "--report", "{tmp}/r.json", "--plot", "{tmp}/r.txt"], "must end in .png"),
        (["demo", "--out", "{file}"], "--out {file}: is a file, not a folder"),
        (["robust-matrix", "--simulate", "--out-dir", "{file}"], "is a file, not a folder"),
        (["prune", "--report", "{file}/p.json"], "{file} is a file"),
        (["prune", "--report", "{tmp}/p.json", "--plot", "{tmp}/p.txt"], "must end in .png"),
        # The picture would replace the report (its default path is the report's with .png).
        (["train", "--report", "{tmp}/r.png"], "--report and --plot would both write {tmp}/r.png"),
        (["train", "--report", "{tmp}/r.png", "--plot", "{tmp}/./r.png"], "give them different"),
        (["prune", "--report", "{tmp}/p.png"], "--report and --plot would both write"),
        (
            ["simulate", "--json", "{tmp}/s.png", "--plot", "{tmp}/s.png"],
            "--json and --plot would both write {tmp}/s.png",
        ),  # fmt: skip
        (
            [
                "train",
                "--report",
                "{tmp}/run",
                "--plot",
                "{tmp}/r.png",
                "--checkpoint-dir",
                "{tmp}/run",
                "--checkpoint-every",
                "1",
            ],
            "--report {tmp}/run is the folder --checkpoint-dir names",
        ),  # fmt: skip
        (
            ["train", "--checkpoint-dir", "{file}", "--checkpoint-every", "1"],
            "--checkpoint-dir {file}: is a file, not a folder",
        ),  # fmt: skip
    ],
)
def test_commands_refuse_result_paths_they_could_not_write_before_training(
    tmp_path, capsys, argv, words
):
    """A report that cannot be written is a usage error at once, not a traceback after the
    training it was to record."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    fill = {"file": str(blocker), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    assert words.format(**fill) in argparse_error(capsys, argv)


def test_train_with_nccl_on_a_machine_without_gpus_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")
    err = argparse_error(capsys, ["train", "--backend", "nccl", "--workers", "1"])
    assert "backend 'nccl' needs CUDA devices; use backend 'gloo' on CPU" in err
    assert "Traceback" not in err


def test_a_run_asked_to_resume_without_a_checkpoint_says_where_it_looked(tmp_path):
    """--resume before the first save starts at step 0 (a restarted job), and says so, naming
    the other runs' checkpoints in the folder (a run's folder is its label)."""
    from sparsetrain.train import _no_checkpoint_note

    (tmp_path / "topk").mkdir()
    (tmp_path / "topk" / "rank0.pt").write_bytes(b"")
    note = _no_checkpoint_note(tmp_path / "threshold")
    assert f"no checkpoint in {tmp_path / 'threshold'} to resume from; starting at step 0" in note
    assert "checkpoints of other runs are there: topk" in note
    assert "other runs" not in _no_checkpoint_note(tmp_path / "topk")


def test_init_loss_scale_needs_fp16(capsys):
    err = argparse_error(capsys, ["train", "--init-loss-scale", "1024"])
    assert (
        "--init-loss-scale sets the float16 loss scaler's first scale: it needs --amp fp16" in err
    )
    err = argparse_error(capsys, ["train", "--init-loss-scale", "1024", "--amp", "bf16"])
    assert "(got --amp bf16, which scales no loss)" in err


def test_prune_says_when_nm_cannot_reach_the_sparsity_asked_for(tmp_path, capsys, monkeypatch):
    from sparsetrain.commands import prune

    class Stop(Exception):
        pass

    def stop(cfg):
        raise Stop

    monkeypatch.setattr(prune, "run", stop)
    for sparsity, note in (("0.9", True), ("0.5", False)):
        argv = ["prune", "--method", "nm", "--method", "magnitude", "--sparsity", sparsity,
                "--report", str(tmp_path / "p.json")]  # fmt: skip
        with pytest.raises(Stop):
            main(argv)
        err = capsys.readouterr().err
        assert ("nm keeps 1 of every 4 weights, a sparsity of 0.750, not the 0.9" in err) == note
    # At sparsity 0 it would keep 4 of 4: refused at once, not a traceback after dense training.
    argv = ["prune", "--method", "nm", "--sparsity", "0", "--report", str(tmp_path / "p.json")]
    assert "--method nm needs --sparsity > 0" in argparse_error(capsys, argv)


def test_result_path_checks_make_nothing_and_take_files_written_in_place(tmp_path, capsys):
    from sparsetrain.plotting import file_path_problem, folder_path_problem

    out = tmp_path / "new" / "deeper"
    err = argparse_error(capsys, ["robust-matrix", "--aggregators", "foo", "--out-dir", str(out)])
    assert "unknown aggregator(s) ['foo']" in err
    assert folder_path_problem(out) is None and file_path_problem(out / "r.json") is None
    assert not (tmp_path / "new").exists()  # a usage error leaves no folder behind
    assert file_path_problem("/dev/stdout") is None  # exists and writable: written in place


def test_prune_leaves_weights_nm_cannot_group_dense(tmp_path, capsys):
    """digits-cnn's first convolution has 1 input channel, no group of 4: --method nm died
    with a traceback after dense training, and the run's other methods were lost."""
    argv = ["prune", "--task", "digits-cnn", "--method", "nm", "--sparsity", "0.5",
            "--schedule", "oneshot", "--epochs", "1", "--finetune-epochs", "1", "--levels", "0.5",
            "--no-progress", "--report", str(tmp_path / "p.json")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "nm leaves features.0.weight dense" in err
    report = json.loads((tmp_path / "p.json").read_text())
    (run,) = report["runs"]
    assert run["method"] == "nm" and 0.4 < run["final"]["sparsity"] < 0.5


def test_an_out_folder_under_one_this_user_cannot_read_is_named(monkeypatch, tmp_path):
    """bench cluster --out below a folder this user may not look into: a line naming it, where
    Path.exists() raised PermissionError with a traceback."""
    from pathlib import Path

    from sparsetrain.commands import bench

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    problem = bench._out_folder_problem(tmp_path / "locked" / "x")
    assert problem == f"cannot read {tmp_path / 'locked' / 'x'} (Permission denied)"


def test_links_past_343_gbit_keep_a_queue_limit_tc_takes():
    # 100 ms of traffic past 2**32 bytes: tc refused the limit after namespaces were built.
    from sparsetrain.cluster.netns import _tbf_args

    args = _tbf_args(4e11)
    assert int(args[args.index("limit") + 1]) == 2**32 - 1
    args = _tbf_args(1e9)  # (as before where it fits: 100 ms of 1 Gbit/s)
    assert int(args[args.index("limit") + 1]) == 12_500_000


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_root_without_the_network_capabilities_is_told_so_before_anything_is_built():
    # `ip netns add` failed with "mount --make-shared /run/netns failed: Operation not
    # permitted", exit 1, where a permission problem is exit 2 and names what is missing.
    code = ("from sparsetrain.cluster.netns import check_privileges\n"
            "try:\n    check_privileges()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")  # fmt: skip
    res = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "ClusterPermissionError" in res.stdout and "CAP_NET_ADMIN" in res.stdout, res


def test_a_bench_worker_keeps_its_finished_dense_points_when_a_later_one_fails(
    tmp_path, monkeypatch
):
    # Records were written after each sparse point only: a dense-only run kept nothing.
    import socket

    import torch.distributed as dist

    from sparsetrain.commands import bench

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)),
                       ("RANK", "0"), ("WORLD_SIZE", "1")):  # fmt: skip
        monkeypatch.setenv(key, value)
    records = tmp_path / "records.json"
    cfg = {"sizes": [1000, 2000], "densities": [0.01, 0.1], "algorithms": ["dense"], "reps": 1,
           "warmup": 0, "seed": 0, "records_path": str(records)}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    real, calls = bench._time_point, []

    def failing_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a rank died")
        return real(*args)

    monkeypatch.setattr(bench, "_time_point", failing_second)
    threads = torch.get_num_threads()  # (the worker sets one thread)
    try:
        with pytest.raises(RuntimeError, match="a rank died"):
            bench.worker_main(str(tmp_path / "config.json"))
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
    kept = json.loads(records.read_text())
    assert sorted((r["algorithm"], r["numel"], r["density"]) for r in kept) == [
        ("dense", 1000, 0.01), ("dense", 1000, 0.1),
    ]  # fmt: skip
