"""`sparsetrain simulate` and `sparsetrain bench refit`: the cost model's command lines.

No cluster is built: refit reads a results file written here from known coefficients.
"""

from __future__ import annotations

import json

import pytest

from sparsetrain import perfmodel as pm
from sparsetrain.cli import main

TRUE = pm.NetworkParams(
    alpha=5e-4, beta=8e-9, gamma=2e-8, gamma_dense=3e-9, gamma_sort=2e-9, overhead=1e-3
)


def model_records(sizes, densities, cores=2, world=8) -> list[dict]:
    """Records as the bench worker writes them, timed by the model under TRUE."""
    records = []
    for n in sizes:
        for d in densities:
            for a in pm.available_models():
                t = pm.predict(a, world=world, numel=n, density=d, params=TRUE, cores=cores)
                records.append({"algorithm": a, "numel": n, "density": d, "median_s": t,
                                "times_s": [t], "bytes_sent_max": 1, "bytes_recv_max": 1})  # fmt: skip
    return records


def write_results(path, sizes, densities, cores=2, world=8):
    """A `bench cluster` JSON whose medians are the model's own times under TRUE."""
    records = model_records(sizes, densities, cores, world)
    path.write_text(
        json.dumps(
            {
                "config": {"ranks": world, "cores": cores},
                "link": {"bandwidth_measured_bps": 8 / TRUE.beta},
                "records": records,
            }
        )
    )
    return path


def test_refit_recovers_the_model_and_checks_it_on_held_out_points(tmp_path, capsys):
    fitted = write_results(tmp_path / "a.json", [10**6, 25 * 10**6], [0.001, 0.01, 0.1])
    held = write_results(tmp_path / "b.json", [5 * 10**6], [0.003, 0.03])
    assert main(["bench", "refit", str(fitted), "--predict", str(held)]) == 0
    out = capsys.readouterr().out
    assert "(2 shared cores)" in out
    # Dense allreduce is listed at every density but timed once a size: 2 sizes x 3 densities
    # x 6 sparse collectives plus 2 dense times, and 1 size x 2 densities x 6 plus 1.
    assert "100% of 38 points within 25%" in out
    assert "held out, sizes or densities not fitted on: 100% of 13 within 25%" in out


def test_refit_predicts_another_number_of_ranks_with_messages_waiting_for_the_cores(
    tmp_path, capsys
):
    """Runs whose times are the model's own at 8 and 16 ranks on 2 cores: a fit to the first
    predicts the second exactly, pricing each message at twice the first run's cost."""
    fitted = write_results(tmp_path / "a.json", [10**6, 25 * 10**6], [0.001, 0.01, 0.1])
    held = write_results(tmp_path / "b.json", [10**6], [0.001, 0.01, 0.1], world=16)
    assert main(["bench", "refit", str(fitted), "--predict", str(held)]) == 0
    out = capsys.readouterr().out
    assert f"ranks a core: 8 in {held} (16 ranks on 2 cores), 4 in {fitted}" in out
    assert "held out, all points: 100% of 19 within 25%, median error 0%, max 0%" in out
    # --cores is the fitted run's: the held-out run keeps the 2 it records (it took 8 too)
    assert main(["bench", "refit", str(fitted), "--predict", str(held), "--cores", "4"]) == 0
    out = capsys.readouterr().out
    assert f"ranks a core: 8 in {held} (16 ranks on 2 cores), 2 in {fitted}" in out


def test_refit_draws_the_errors_of_both_runs(tmp_path, capsys, monkeypatch):
    from sparsetrain.commands import bench

    fitted = write_results(tmp_path / "a.json", [10**6, 25 * 10**6], [0.001, 0.01, 0.1])
    held = write_results(tmp_path / "b.json", [5 * 10**6], [0.003, 0.03])
    png = tmp_path / "errors.png"
    drawn = {}
    real = bench.plot_model_errors

    def spy(sets, path, title, **kw):
        drawn["sets"] = sets
        return real(sets, path, title, **kw)

    monkeypatch.setattr(bench, "plot_model_errors", spy)
    argv = ["bench", "refit", str(fitted), "--predict", str(held), "--plot", str(png)]
    assert main(argv) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (mine, points), (theirs, held_points) = drawn["sets"]
    assert "a.json" in mine and "b.json" in theirs
    # one point a measurement (dense once a size), each (algorithm, measured, modelled)
    assert len(points) == 38 and len(held_points) == 13
    for _, measured, modelled in points + held_points:
        assert modelled == pytest.approx(measured, rel=1e-6)


def test_a_dense_time_listed_at_every_density_counts_once(tmp_path, capsys):
    path = write_results(tmp_path / "a.json", [10**6, 25 * 10**6], [0.001, 0.01, 0.1])
    data = json.loads(path.read_text())
    for r in data["records"]:  # one slow dense measurement at 25M, in its three copies
        if r["algorithm"] == "dense" and r["numel"] == 25 * 10**6:
            r["median_s"] *= 3
            r["times_s"] = [r["median_s"]]
    path.write_text(json.dumps(data))
    assert main(["bench", "refit", str(path), "--write"]) == 0
    assert "97% of 38 points within 25%" in capsys.readouterr().out  # 1 miss, not 3 of 42
    fit = json.loads(path.read_text())["model_fit"]
    assert fit["n_points"] == 38 and len(fit["points"]) == 42  # every record keeps a prediction


def test_refit_write_stores_the_fit_that_simulate_reads(tmp_path, capsys):
    path = write_results(tmp_path / "a.json", [10**6, 25 * 10**6], [0.001, 0.01, 0.1])
    before = json.loads(path.read_text())
    before["model_fit"] = {"params": {"alpha": 1.0}, "within_25_percent": 0.0}  # a stale fit
    path.write_text(json.dumps(before))
    assert main(["bench", "refit", str(path), "--write"]) == 0
    after = json.loads(path.read_text())
    assert after["records"] == before["records"] and after["link"] == before["link"]
    assert after["model_fit"]["within_25_percent"] == 1.0
    for name, value in TRUE.as_dict().items():
        assert after["model_fit"]["params"][name] == pytest.approx(value, rel=1e-6, abs=1e-15)
    assert len(after["model_fit"]["points"]) == len(before["records"])
    capsys.readouterr()
    assert main(["simulate", "--ranks", "8", "--bandwidth", "1gbit", "--fitted", str(path)]) == 0
    assert "overhead 1e+03 us/operation" in capsys.readouterr().out
    # Without --write the file is left as it is.
    main(["bench", "refit", str(path), "--cores", "8"])
    assert json.loads(path.read_text()) == after


def test_refit_write_to_an_unwritable_file_is_an_argparse_error(tmp_path, capsys, monkeypatch):
    import pathlib

    path = write_results(tmp_path / "a.json", [10**6], [0.01, 0.1])
    before = path.read_text()
    write_text = pathlib.Path.write_text

    def full_disk(self, text, *args, **kwargs):  # half the text written, then no room
        write_text(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "refit", str(path), "--write"])
    assert exc.value.code == 2
    assert "--write: cannot write" in capsys.readouterr().err
    # The run's measurements are as they were (the file was cut at the failed write), also
    # for a file named *.tmp (the temporary file was that file itself, then deleted).
    assert path.read_text() == before and not list(tmp_path.glob(".*.part"))
    named_tmp = tmp_path / "run.tmp"
    with open(named_tmp, "w") as f:  # (write_text is patched)
        f.write(before)
    with pytest.raises(SystemExit):
        main(["bench", "refit", str(named_tmp), "--write"])
    assert named_tmp.read_text() == before
    capsys.readouterr()


def test_refit_write_through_a_link_writes_the_file_it_names(tmp_path, capsys):
    real = write_results(tmp_path / "real.json", [10**6], [0.01, 0.1])
    real.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(real.name)
    assert main(["bench", "refit", str(link), "--write"]) == 0
    assert link.is_symlink() and "model_fit" in json.loads(real.read_text())
    assert real.stat().st_mode & 0o777 == 0o640


def test_refit_with_the_wrong_core_count_fits_worse(tmp_path, capsys):
    fitted = write_results(tmp_path / "a.json", [10**6, 25 * 10**6], [0.001, 0.01, 0.1])
    main(["bench", "refit", str(fitted)])
    right = capsys.readouterr().out.splitlines()[-1]
    main(["bench", "refit", str(fitted), "--cores", "8"])
    wrong = capsys.readouterr().out.splitlines()[-1]
    assert "median error 0%" in right
    assert "median error 0%" not in wrong


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "refit", "missing.json"], "cannot read missing.json"),
        (["bench", "refit", "x.json", "--cores", "0"], "--cores must be >= 1"),
        (["bench", "refit", "x.json", "--plot", "e.jpg"], "--plot e.jpg: the file name must end"),
    ],
)
def test_refit_bad_input_is_an_argparse_error(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert words in err[err.index("error:") :]  # the message, not the usage block


def test_simulate_prints_the_winner_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "sim.json"
    argv = ["simulate", "--ranks", "64,1024", "--bandwidth", "10gbit", "--model", "bert-base",
            "--compute", "200ms", "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "bert-base (110M parameters)" in text and "winner" in text
    data = json.loads(out_json.read_text())
    assert [r["ranks"] for r in data["rows"]] == [64, 1024]
    assert data["gamma_sort"] == pytest.approx(1e-10) and data["compute_s"] == pytest.approx(0.2)
    for row in data["rows"]:
        assert row["winner"] == min(row["times_s"], key=row["times_s"].__getitem__)
        assert row["speedup_exchange"] == pytest.approx(
            row["dense_s"] / min(row["times_s"].values())
        )


def test_simulate_names_the_dense_ring_where_no_algorithm_beats_it(tmp_path, capsys):
    # gTop-k won a row at 0.39x, slower than the dense ring printed beside it.
    out_json = tmp_path / "sim.json"
    argv = ["simulate", "--ranks", "8", "--bandwidth", "100gbit", "--algorithms", "gtopk,ssar_rd",
            "--compute", "200ms", "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(out_json.read_text())["rows"]
    assert min(row["times_s"].values()) > row["dense_s"]
    assert (row["winner"], row["speedup_exchange"], row["speedup_iteration"]) == ("dense", 1, 1)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.split()[:1] == ["8"]]
    assert line.split()[4:] == ["dense", f"{row['dense_s'] * 1e3:.2f}", "1.00x", "1.00x"]


def test_simulate_prints_times_under_a_millisecond_to_three_digits(capsys):
    # Two decimals printed 0.04 for both the winner and the dense ring it beat by 1.14x.
    argv = ["simulate", "--numel", "50k", "--ranks", "3", "--bandwidth", "100gbit",
            "--algorithms", "allgather"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[2:] == [
        "0.0361", "allgather", "0.0413", "1.14x"
    ]  # fmt: skip


def test_simulate_draws_the_projection(tmp_path, capsys):
    png = tmp_path / "plots" / "sim.png"
    argv = ["simulate", "--ranks", "8,64,512", "--bandwidth", "1gbit,10gbit", "--plot", str(png)]
    assert main(argv) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_plot_to_an_unwritable_path_is_an_argparse_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--ranks", "8", "--plot", str(blocker / "sim.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --plot {blocker / 'sim.png'}: {blocker} is a file" in err


def test_simulate_takes_local_costs_from_a_fit(tmp_path, capsys):
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"model_fit": {"params": TRUE.as_dict()}}))
    assert main(["simulate", "--ranks", "8", "--bandwidth", "1gbit", "--fitted", str(fit)]) == 0
    assert "gamma_sort 2 ns/(entry*log2), overhead 1e+03 us/operation" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["simulate", "--ranks", "1"], "--ranks: every value must be >= 2"),
        (
            ["simulate", "--ranks", "1000000000", "--numel", "1M", "--density", "0.5"],
            "--ranks 1,000,000,000 exceeds the vector's 1,000,000 elements",
        ),
        (["simulate", "--bandwidth", "fast"], "--bandwidth: cannot read bandwidth 'fast'"),
        # (beta, 8 / rate, is inf: the message had named NetworkParams.beta)
        (["simulate", "--bandwidth", "1e-320bit"], "--bandwidth 9.99989e-321 bit/s is too small"),
        (["simulate", "--density", "0"], "--density must be in (0, 1], got 0.0"),
        (["simulate", "--overhead-us", "-1"], "--overhead-us must be a finite number >= 0"),
        (["simulate", "--algorithms", "ring"], "unknown ['ring']"),
        (["simulate", "--plot", "sim.txt"], "--plot sim.txt: the file name must end in .png"),
        (["simulate", "--plot", "."], "--plot .: is a folder"),
    ],
)
def test_simulate_bad_input_is_an_argparse_error(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert words in err[err.index("error:") :]  # the message, not the usage block


def test_passes_are_pooled_and_their_agreement_counted_once_a_measurement():
    from sparsetrain.commands.bench import _add_pass, _pass_agreement

    merged = {}
    for times, sent in (([1.0, 1.2], 10), ([1.1, 3.0], 12), ([0.9, 1.0], 11)):
        rec = {"times_s": times, "warmup_s": [5.0], "median_s": sum(times) / 2,
               "bytes_sent_max": sent, "bytes_recv_max": 2 * sent}  # fmt: skip
        _add_pass(merged, ("oktopk", 100, 0.01), {"algorithm": "oktopk", "numel": 100,
                                                   "density": 0.01}, rec)  # fmt: skip
        for d in (0.01, 0.1):  # dense: timed once a size, listed at every density
            dense = {**rec, "median_s": 2.0, "times_s": [2.0, 2.0]}
            _add_pass(merged, ("dense", 100, d), {"algorithm": "dense", "numel": 100,
                                                  "density": d}, dense)  # fmt: skip
    r = merged[("oktopk", 100, 0.01)]
    assert r["times_s"] == [1.0, 1.2, 1.1, 3.0, 0.9, 1.0] and r["median_s"] == 1.05
    assert r["pass_medians"] == [1.1, 2.05, 0.95] and r["warmup_s"] == [5.0] * 3
    assert r["bytes_sent_max"] == 12 and r["bytes_recv_max"] == 24
    a = _pass_agreement(list(merged.values()))
    assert a["passes"] == 3 and a["n_points"] == 2 and a["points_within"] == 1
    assert a["largest_spread"] == pytest.approx(2.05 / 0.95)
    assert a["largest_at"] == ["oktopk", 100, 0.01]
    assert _pass_agreement([{**r, "pass_medians": [1.0]}]) is None  # one pass: nothing to say


def test_refit_fits_one_pass_of_a_passes_run(tmp_path, capsys):
    path = write_results(tmp_path / "a.json", [10**6, 25 * 10**6], [0.001, 0.01, 0.1])
    data = json.loads(path.read_text())
    for r in data["records"]:  # pass 2 ran at the model's times, pass 1 twice as slow
        r["pass_medians"] = [2 * r["median_s"], r["median_s"]]
        r["median_s"] *= 1.5
    path.write_text(json.dumps(data))
    assert main(["bench", "refit", str(path), "--pass", "2"]) == 0
    out = capsys.readouterr().out
    assert "median error 0%" in out and "100% of 38 points within 25%" in out
    assert "the 2 passes' medians agree within 20% on 0 of 38 points" in out
    head, first = out.splitlines()[:2]
    assert head.endswith("passes") and first.endswith("2.00x")  # each point's spread
    main(["bench", "refit", str(path), "--pass", "1"])  # twice the model's times: a worse fit
    assert "median error 0%" not in capsys.readouterr().out
    for argv, words in (
        (["--pass", "3"], f"--pass 3: every point of {path} finished 2 passes; choose 1 to 2"),
        (["--pass", "1", "--write"], "it cannot be given with --pass"),
    ):
        with pytest.raises(SystemExit):
            main(["bench", "refit", str(path), *argv])
        assert words in capsys.readouterr().err
    assert json.loads(path.read_text()) == data  # the refused --write wrote nothing


def test_a_partial_passes_file_counts_the_passes_every_point_finished(tmp_path, capsys):
    path = write_results(tmp_path / "a.json", [10**6], [0.01, 0.1])
    data = json.loads(path.read_text())
    for i, r in enumerate(data["records"]):  # stopped during pass 3: the first points have 3
        r["pass_medians"] = [r["median_s"]] * (3 if i < 4 else 2)
    data["records"][0]["pass_medians"][2] *= 3  # a spread only the unfinished pass shows
    path.write_text(json.dumps(data))
    main(["bench", "refit", str(path)])
    assert "the 2 passes' medians agree within 20% on 13 of 13 points" in capsys.readouterr().out
    data["records"][1]["pass_medians"] = [0.0, None]
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        main(["bench", "refit", str(path)])
    assert "pass_medians must be a list of finite numbers of seconds" in capsys.readouterr().err


def test_refit_says_which_points_kept_the_host_busy(tmp_path, capsys):
    """A point whose ranks' CPU seconds fill the cores measures the host, not the network: the
    table gives each point's share of the cores, a line names how many passed 80%."""
    path = write_results(tmp_path / "a.json", [10**6], [0.01, 0.1])
    main(["bench", "refit", str(path)])
    assert "host" not in capsys.readouterr().out  # a run before CPU times were recorded
    data = json.loads(path.read_text())
    for i, r in enumerate(data["records"]):  # 2 cores: busy 95% on the first point, else 40%
        share = 0.95 if i == 0 else 0.4
        r["cpu_s"] = [2 * share * r["median_s"] * f for f in (0.9, 1.0, 1.1)]
    path.write_text(json.dumps(data))
    main(["bench", "refit", str(path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("host") and lines[1].endswith(" 95%") and lines[2].endswith(" 40%")
    first = data["records"][0]
    note = (
        f"host: 1 of 13 points kept the 2 cores at least 80% busy (the busiest 95%: "
        f"{first['algorithm']} at 1,000,000 and {first['density']:g})"
    )
    assert any(line.startswith(note) for line in lines)
    data["records"][1]["cpu_s"] = [0.1, -1.0]
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        main(["bench", "refit", str(path)])
    assert "records[1] cpu_s must be a list of finite numbers of CPU seconds" in (
        capsys.readouterr().err
    )


def _tree_form_run(tmp_path, recorded_as: str):
    """A run to fit (the default form) and a held-out one timed with the tree form, recorded as
    ``recorded_as``: (fitted path, held-out path, its parsed JSON)."""
    from sparsetrain.comm import p2p

    fitted = write_results(tmp_path / "a.json", [10**6, 25 * 10**6], [0.001, 0.01, 0.1])
    with p2p.few_int_form("tree"):
        held = write_results(tmp_path / "b.json", [10**6], [0.001, 0.01])
    result = json.loads(held.read_text())
    result["config"]["few_ints"] = recorded_as
    held.write_text(json.dumps(result))
    return fitted, held, result


def test_refit_prices_the_few_int_form_each_run_used(tmp_path, capsys):
    """A run with --few-ints tree is predicted with the log2 p agreement and gathers, one
    without the option as the world size says (direct sends at 8 ranks), exactly."""
    from sparsetrain.comm import p2p

    fitted, held, result = _tree_form_run(tmp_path, recorded_as="tree")
    assert p2p.TREE_FROM == 32  # the form was the block's only
    assert main(["bench", "refit", str(fitted), "--predict", str(held)]) == 0
    out = capsys.readouterr().out
    assert "held out, all points: 100% of 13 within 25%, median error 0%, max 0%" in out
    assert "few-int exchanges: tree in" in out and "each run is priced in its own" in out
    # Read as a direct-form run, the same times are off: the forms' costs differ.
    result["config"]["few_ints"] = "direct"
    held.write_text(json.dumps(result))
    assert main(["bench", "refit", str(fitted), "--predict", str(held)]) == 0
    assert "max 0%" not in capsys.readouterr().out.split("held out, all points")[1]
    with pytest.raises(ValueError, match="one of auto, direct, tree"):
        with p2p.few_int_form("ring"):
            pass
    # A recorded threshold wins over the form: a run that used TREE_FROM = 2 by its value.
    result["config"].update(few_ints="auto", tree_from=2)
    held.write_text(json.dumps(result))
    assert main(["bench", "refit", str(fitted), "--predict", str(held)]) == 0
    assert "max 0%" in capsys.readouterr().out.split("held out, all points")[1]
    # A damaged form or threshold is an error naming the entry, not a silent default.
    for bad, word in (({"few_ints": "Tree"}, "config.few_ints"), ({"tree_from": 1}, "tree_from")):
        result["config"].update({"few_ints": "auto", "tree_from": None, **bad})
        held.write_text(json.dumps(result))
        with pytest.raises(SystemExit):
            main(["bench", "refit", str(held)])
        assert word in capsys.readouterr().err


def test_refit_predict_as_prices_the_held_out_run_in_the_form_named(tmp_path, capsys):
    """Times of the tree form, recorded as a direct run: priced as recorded they are off,
    with --predict-as tree exact; --predict-as without --predict is an error."""
    fitted, held, _ = _tree_form_run(tmp_path, recorded_as="direct")
    args = ["bench", "refit", str(fitted), "--predict", str(held)]
    assert main(args) == 0
    assert "max 0%" not in capsys.readouterr().out.split("held out, all points")[1]
    assert main([*args, "--predict-as", "tree"]) == 0
    out = capsys.readouterr().out
    assert "priced as tree (--predict-as)" in out
    assert "held out, all points: 100% of 13 within 25%, median error 0%, max 0%" in out
    with pytest.raises(SystemExit):
        main(["bench", "refit", str(fitted), "--predict-as", "tree"])
    assert "give --predict JSON too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--predict-as", "ring"])
    assert "invalid choice: 'ring'" in capsys.readouterr().err


def test_simulate_prices_the_values_and_indices_the_library_sends(tmp_path, capsys):
    # Every projection priced 4-byte values and indices: float16 gradients (2 bytes) and
    # vectors of 2**31 elements or more (8-byte indices) were priced wrong, without a word.
    rows = {}
    for argv in (["--value-bytes", "2"], [], ["--numel", "3G"]):
        out = tmp_path / "s.json"
        assert main(["simulate", "--ranks", "256", "--bandwidth", "10gbit", "--algorithms",
                     "allgather", "--json", str(out), *argv]) == 0  # fmt: skip
        data = json.loads(out.read_text())
        rows[tuple(argv)] = (data["value_bytes"], data["index_bytes"], data["rows"][0])
    text = capsys.readouterr().out
    assert "; 2-byte values, 4-byte indices" in text and "; 4-byte values, 8-byte indices" in text
    half, full, big = rows[("--value-bytes", "2")], rows[()], rows[("--numel", "3G")]
    assert (half[:2], full[:2], big[:2]) == ((2, 4), (4, 4), (4, 8))
    assert half[2]["dense_s"] < 0.55 * full[2]["dense_s"]  # half the bytes on the ring
    assert half[2]["times_s"]["allgather"] < full[2]["times_s"]["allgather"]


def test_simulate_keeps_its_link_column_for_any_rate(capsys):
    # 1e-09Gb/s and 0.0001Gb/s pushed the row's columns apart.
    argv = ["simulate", "--ranks", "8", "--bandwidth", "1bit,100mbit,10gbit,2000gbit", "--numel",
            "1M", "--algorithms", "oktopk"]  # fmt: skip
    assert main(argv) == 0
    rows = capsys.readouterr().out.splitlines()[-4:]
    assert [r.split()[1] for r in rows] == ["1b/s", "100Mb/s", "10Gb/s", "2Tb/s"]
    assert len({r.index(r.split()[1]) + len(r.split()[1]) for r in rows}) == 1  # right-aligned
