"""The emulated cluster builds shaped namespaces and removes everything it made, on every path."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sparsetrain.cluster import (
    ADDRESS_RANGE,
    ClusterError,
    ClusterPermissionError,
    ClusterTimeoutError,
    EmulatedCluster,
    check_privileges,
    cleanup,
    list_namespaces,
)


def _can_build() -> str | None:
    try:
        check_privileges()
    except ClusterPermissionError as e:
        return str(e)
    return None


# Kernels without sch_netem shape bandwidth only and warn; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:this kernel has no sch_netem:RuntimeWarning")

_REASON = _can_build()
needs_root = pytest.mark.skipif(_REASON is not None, reason=f"needs root and ip netns: {_REASON}")


def _host_state() -> tuple[set[str], dict[str, list[str]]]:
    """The host namespace's link names and each device's qdiscs (names and kinds only:
    counters change between calls)."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    by_dev: dict[str, list[str]] = {}
    for line in qdiscs.splitlines():
        words = line.split()
        if "dev" in words:
            by_dev.setdefault(words[words.index("dev") + 1], []).append(" ".join(words[:5]))
    return names, {dev: sorted(q) for dev, q in by_dev.items()}


def _assert_host_untouched(before, cluster: EmulatedCluster) -> None:
    """No host link of a name the cluster gives its links appeared, and no host device's
    qdiscs changed. Other processes on a shared machine may add or remove their own
    interfaces meanwhile: only devices present both times are compared."""
    links, qdiscs = _host_state()
    ours = {cluster.interface, "br0", *(f"p{r}" for r in range(cluster.ranks))}
    assert (links - before[0]) & ours == set()
    for dev in links & before[0]:
        assert qdiscs.get(dev) == before[1].get(dev), dev


def _qdiscs(ns: str, dev: str) -> str:
    return subprocess.run(
        ["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True
    ).stdout


def _switch_pids() -> set[int]:
    """The process ids of running delay switches (any run's)."""
    pids = set()
    for comm in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv0 = open(comm, "rb").read().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0).startswith(b"delayswitch-"):
            pids.add(int(comm.split("/")[2]))
    return pids


def _can_compile() -> bool:
    from sparsetrain.cluster.netns import _switch_program

    try:
        _switch_program()
    except RuntimeError:
        return False
    return True


needs_switch = pytest.mark.skipif(
    _REASON is not None or not _can_compile(),
    reason="needs root, ip netns and a C compiler for the delay switch",
)


@needs_root
@pytest.mark.parametrize("latency, via", [("0", "auto"), ("100us", "auto"), ("100us", "switch")])
def test_builds_shaped_links_and_removes_everything(latency, via):
    if via == "switch" and not _can_compile():
        pytest.skip("no C compiler for the delay switch")
    before, switches = _host_state(), _switch_pids()
    with EmulatedCluster(3, bandwidth="200mbit", latency=latency, latency_via=via) as cluster:
        names = list_namespaces(cluster.prefix + "-")
        assert names == sorted([f"{cluster.prefix}-{r}" for r in range(3)] + [cluster.hub])
        if latency == "0":
            assert cluster.latency_method is None
        elif via == "switch":
            assert cluster.latency_method == "switch" and cluster.latency_emulated
        mine = _switch_pids() - switches
        assert len(mine) == (cluster.latency_method == "switch")
        for rank in range(3):
            ns = cluster.namespace(rank)
            assert "tbf" in _qdiscs(ns, cluster.interface)
            assert "rate 200Mbit" in _qdiscs(ns, cluster.interface)
            link = subprocess.run(["ip", "-d", "-n", ns, "link", "show", cluster.interface],
                                  capture_output=True, text=True).stdout  # fmt: skip
            if cluster.latency_method == "switch":  # a TAP of the switch, which shapes the
                assert "tun type tap" in link  # download direction itself
                assert "02:53:54:00:00:0" + str(rank) in link
            else:
                assert "veth" in link
                assert "tbf" in _qdiscs(cluster.hub, f"p{rank}")
            addr = subprocess.run(
                ["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", cluster.interface],
                capture_output=True,
                text=True,
            ).stdout
            assert f"{cluster.address(rank)}/15" in addr
            assert ADDRESS_RANGE.overlaps(__import__("ipaddress").ip_network(cluster.address(rank)))
            lo = subprocess.run(
                ["ip", "-n", ns, "link", "show", "lo"], capture_output=True, text=True
            )
            assert "UP" in lo.stdout
            if cluster.latency_method == "netem":
                assert "netem" in _qdiscs(ns, cluster.interface)
        _assert_host_untouched(before, cluster)  # the host namespace is never touched
    assert list_namespaces(cluster.prefix) == []
    _assert_host_untouched(before, cluster)
    assert _switch_pids() - switches == set()  # the switch is gone, and its TAPs with it


@needs_switch
def test_the_delay_switch_delays_each_way_by_the_latency_and_keeps_the_rate():
    # A TCP ping-pong crosses the switch twice: its round trip is at least twice the latency,
    # and not much more (the switch's own cost is tens of microseconds a frame).
    with EmulatedCluster(3, bandwidth="200mbit", latency="4ms", latency_via="switch") as cluster:
        rtt = cluster.measure_rtt(0, 1, count=20)
        assert 8e-3 <= rtt < 12e-3, rtt
        rtt = cluster.measure_rtt(2, 0, count=20)
        assert 8e-3 <= rtt < 12e-3, rtt
        rate = cluster.measure_bandwidth(1, 2, 10_000_000)  # 0.4 s at the configured rate
        assert 0.7 * cluster.bandwidth_bps < rate < 1.1 * cluster.bandwidth_bps, rate


@needs_switch
def test_ranks_talk_over_the_switch_both_ways_at_once():
    # Every rank sends to every other at the same time (broadcast ARP first, then TCP): the
    # switch forwards by the ranks' addresses and loses nothing.
    script = textwrap.dedent(
        """
        import os, socket, threading, time
        r, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        me = "198.18.0.%d" % (r + 1)
        srv = socket.create_server((me, 6000))
        payload = bytes([r]) * 300_000
        def serve():
            for _ in range(n - 1):
                c, _ = srv.accept()
                got = b""
                while len(got) < len(payload):
                    got += c.recv(1 << 16)
                assert len(set(got)) == 1 and len(got) == len(payload), len(got)
        t = threading.Thread(target=serve); t.start()
        for peer in range(n):
            if peer == r:
                continue
            deadline = time.monotonic() + 25
            while True:
                try:
                    socket.create_connection(("198.18.0.%d" % (peer + 1), 6000)).sendall(payload)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        t.join()
        """
    )
    with EmulatedCluster(4, bandwidth="100mbit", latency="1ms", latency_via="switch") as c:
        c.run([sys.executable, "-c", script], timeout=60, show_rank0=False)


@needs_switch
def test_a_switch_that_exits_fails_the_run_at_once_with_its_message():
    # A rank's link deleted under the switch: it exits with a message (it used to poll the
    # dead TAP at full speed), and run() stops the ranks at once instead of at the timeout.
    with EmulatedCluster(2, latency="1ms", latency_via="switch") as cluster:
        delete = ["ip", "-n", cluster.namespace(1), "link", "del", cluster.interface]
        assert subprocess.run(delete).returncode == 0
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"(?s)delay switch exited .*rank 1's link failed"):
            cluster.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=50,
                        show_rank0=False)  # fmt: skip
        assert time.monotonic() - t0 < 20
    assert list_namespaces(cluster.prefix) == []


@needs_root
def test_an_mtu_a_tap_cannot_take_is_refused_or_bridged():
    with pytest.raises(ClusterError, match="TAP links take an MTU of at most 65521, got 65535"):
        with EmulatedCluster(2, latency="1ms", mtu=65535, latency_via="switch"):
            pass
    with EmulatedCluster(2, latency="1ms", mtu=65535) as cluster:  # auto: netem, or none
        assert cluster.latency_method in ("netem", None)


@needs_root
def test_without_a_compiler_the_cluster_warns_or_refuses_as_asked(monkeypatch, tmp_path):
    from sparsetrain.cluster.netns import _netem_available

    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))  # nothing compiled there yet
    cluster = EmulatedCluster(2, latency="1ms", latency_via="switch")
    cannot = "latency_via='switch': the delay switch cannot run: it cannot be built"
    with pytest.raises(ClusterError, match=cannot):
        with cluster:
            pass
    assert list_namespaces(cluster.prefix) == []
    with EmulatedCluster(2, latency="1ms") as cluster:
        netem = _netem_available(cluster.hub, "lo")
        assert cluster.latency_method == ("netem" if netem else None)
    if not netem:
        with pytest.warns(RuntimeWarning, match="the delay switch cannot run .it cannot be built"):
            with EmulatedCluster(2, latency="1ms"):
                pass
        cluster = EmulatedCluster(2, latency="1ms", latency_via="netem")
        with pytest.raises(ClusterError, match="latency_via='netem': this kernel has no"):
            with cluster:
                pass
        assert list_namespaces(cluster.prefix) == []


@needs_root
def test_netem_asked_for_without_it_is_refused_before_the_ranks_namespaces(monkeypatch):
    from sparsetrain.cluster import netns

    made = []
    add = EmulatedCluster._add_namespace
    monkeypatch.setattr(netns, "_netem_available", lambda namespace, dev: False)
    monkeypatch.setattr(EmulatedCluster, "_add_namespace", lambda c, n: (made.append(n), add(c, n)))
    cluster = EmulatedCluster(4, latency="1ms", latency_via="netem")
    with pytest.raises(ClusterError, match="latency_via='netem': this kernel has no"):
        with cluster:
            pass
    assert made == [cluster.hub]
    assert list_namespaces(cluster.prefix) == []


@needs_root
def test_exception_inside_block_tears_down():
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedCluster(2) as cluster:
            assert list_namespaces(cluster.prefix)
            raise RuntimeError("boom")
    assert list_namespaces(cluster.prefix) == []


@needs_root
def test_failing_rank_kills_the_others_and_reports(tmp_path):
    script = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\ntime.sleep(60)\n"
    with EmulatedCluster(3) as cluster:
        with pytest.raises(ClusterError, match=r"rank\(s\) \[1\] exited with \[3\]") as exc:
            cluster.run([sys.executable, "-c", script], timeout=30, show_rank0=False)
        # Had run() waited for the sleepers, the 30 s timeout would have fired first.
        assert not isinstance(exc.value, ClusterTimeoutError)
        assert subprocess.run(["ip", "netns", "pids", cluster.namespace(0)],
                              capture_output=True, text=True).stdout.strip() == ""  # fmt: skip
    assert list_namespaces(cluster.prefix) == []


@needs_root
def test_ranks_reach_each_other_with_torchrun_environment(tmp_path):
    out = tmp_path / "env"
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"]
    script = textwrap.dedent(
        f"""
        import os, socket
        r = int(os.environ["RANK"])
        with open("{out}" + str(r), "w") as f:
            f.write(" ".join(os.environ[k] for k in {names!r}))
        addr = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        if r == 0:
            s = socket.create_server(addr); c, _ = s.accept()
            assert c.recv(5) == b"hello"
        else:
            import time
            deadline = time.monotonic() + 25  # rank 0 may start late on a loaded machine
            while True:
                try:
                    socket.create_connection(addr).sendall(b"hello")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        """
    )
    with EmulatedCluster(2) as cluster:
        cluster.run([sys.executable, "-c", script], timeout=30, show_rank0=False)
        for r in range(2):
            env = cluster.environment(r)
            assert env["RANK"] == str(r) and env["MASTER_ADDR"] == cluster.address(0)
            want = " ".join(env[k] for k in names)
            assert (tmp_path / f"env{r}").read_text() == want


def _wait_for_file(proc: subprocess.Popen, path, timeout: float = 120.0) -> str:
    """Return what the child wrote to ``path`` once it is there; fail, with the child's
    stderr, if the child exits or ``timeout`` seconds pass first (importing torch and building
    the namespaces can take many seconds on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    if path.exists() and path.read_text():
        return path.read_text()
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    pytest.fail(
        f"the child wrote nothing to {path.name} (exit {proc.returncode}); its stderr:\n"
        + err.decode(errors="replace")
    )


@needs_root
@pytest.mark.parametrize(
    "sig, repeat",
    [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGHUP, 0), (signal.SIGINT, 40)],
    ids=["SIGINT", "SIGTERM", "SIGHUP", "SIGINT-repeated"],
)
def test_signal_tears_down(tmp_path, sig, repeat):
    # repeat: an impatient user pressing Ctrl-C again and again while tear-down runs.
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import signal, time
        from sparsetrain.cluster import EmulatedCluster
        # As in a terminal: a background job of a script inherits SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with EmulatedCluster(4) as c:
            open("{ready}", "w").write(c.prefix)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        prefix = _wait_for_file(proc, ready)
        assert list_namespaces(prefix)
        proc.send_signal(sig)
        for _ in range(repeat):
            time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(sig)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert list_namespaces(prefix) == []


@needs_root
def test_a_caught_ctrl_c_does_not_mute_the_next_one(tmp_path):
    # A body that catches one Ctrl-C (say, to skip an item) must still stop on the next.
    ready, caught = tmp_path / "ready", tmp_path / "caught"
    script = textwrap.dedent(
        f"""
        import signal, time
        from sparsetrain.cluster import EmulatedCluster
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with EmulatedCluster(2) as c:
            try:
                # Inside the try: the Ctrl-C sent once this is read cannot end the run.
                open("{ready}", "w").write(c.prefix)
                time.sleep(60)
            except KeyboardInterrupt:
                open("{caught}", "w").write("1")
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        _wait_for_file(proc, ready)
        proc.send_signal(signal.SIGINT)  # caught by the body
        _wait_for_file(proc, caught)
        proc.send_signal(signal.SIGINT)  # must stop the run
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert list_namespaces(ready.read_text()) == []


@needs_switch
def test_the_delay_switch_dies_with_a_killed_run_and_cleanup_removes_the_rest(tmp_path):
    # SIGKILL gives the run no chance to tear down: the switch must not live on (it would hold
    # its TAPs and a core's worth of wake-ups), and cleanup() removes the namespaces left.
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from sparsetrain.cluster import EmulatedCluster
        with EmulatedCluster(2, latency="1ms", latency_via="switch") as c:
            open("{ready}", "w").write(c.prefix)
            time.sleep(60)
        """
    )
    switches = _switch_pids()
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        prefix = _wait_for_file(proc, ready)
        assert len(_switch_pids() - switches) == 1
        proc.kill()
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while _switch_pids() - switches and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _switch_pids() - switches == set()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(list_namespaces(prefix)) == 3  # the run's two ranks and its hub, left behind
    assert sorted(cleanup(prefix)) == sorted([f"{prefix}-0", f"{prefix}-1", f"{prefix}-hub"])
    assert list_namespaces(prefix) == []


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_root
def test_ranks_die_with_a_killed_run(tmp_path):
    # SIGKILL gives the run no chance to stop its ranks: they timed on as orphans, holding the
    # cores, until they finished (`bench cleanup` removed them only when called).
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from sparsetrain.cluster import EmulatedCluster
        with EmulatedCluster(2) as c:
            procs = [c.popen(r, ["sleep", "300"]) for r in range(2)]
            open("{ready}", "w").write(c.prefix + " " + " ".join(str(p.pid) for p in procs))
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    prefix, ranks = None, []
    try:
        prefix, *pids = _wait_for_file(proc, ready).split()
        ranks = [int(p) for p in pids]
        assert all(_running(p) for p in ranks)
        proc.kill()
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while any(_running(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in ranks if _running(p)], "ranks outlived the killed run"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in ranks:  # (failing: not left sleeping)
            if _running(p):
                os.kill(p, signal.SIGKILL)
        if prefix is not None:
            assert len(cleanup(prefix)) == 3  # the namespaces, left behind for cleanup()


@needs_root
def test_cleanup_removes_leftovers_of_dead_runs_only():
    # Every cleanup() here is scoped to names this test made: a default-prefix call would also
    # remove other runs' leftovers on the host, and include_live=True would kill live runs.
    # The names carry a tag of this run's, so parallel runs and old leftovers never clash.
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = secrets.token_hex(4)
    stale = f"st-{dead.pid}-{tag}-0"
    live = f"st-{os.getppid()}-{tag}-hub"  # our parent (pytest's launcher or shell) is alive
    # Someone else's namespaces that merely start with "st-": never ours to delete. The first
    # has no pid after "st-", so it can never be of the module's pattern.
    other = f"st-test{tag}"
    foreign = [other, f"st-{dead.pid}-not-ours-{tag}", f"st-{dead.pid}-{tag}-0-x"]
    created, removed = [], []
    try:
        for ns in (stale, live, *foreign):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            created.append(ns)
        # The dead pid's scope holds the stale run and two foreign names of the same pid: only
        # the name pattern keeps the foreign ones.
        removed += cleanup(f"st-{dead.pid}-")
        assert removed == [stale]
        assert cleanup(live) == [] and live in list_namespaces(live)  # its owner is alive
        removed += cleanup(live, include_live=True)
        assert removed == [stale, live]
        assert set(foreign) <= set(list_namespaces())
        assert cleanup(f"st-{dead.pid}-") == []
        # No name under "st-test<tag>" can be of this module's pattern: include_live is safe.
        assert cleanup(other, include_live=True) == []
        assert set(foreign) <= set(list_namespaces())
    finally:
        for ns in created:  # only what this test made and cleanup() did not remove
            if ns not in removed:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert [n for n in list_namespaces() if n in (stale, live, *foreign)] == []


@needs_root
def test_a_name_clash_fails_without_touching_the_other_run(monkeypatch):
    from sparsetrain.cluster import netns

    monkeypatch.setattr(netns.secrets, "token_hex", lambda n: "c1a5" * n)
    with EmulatedCluster(2) as first:
        theirs = list_namespaces(first.prefix + "-")
        with pytest.raises(ClusterError, match="netns add"):
            with EmulatedCluster(2):
                pass
        assert list_namespaces(first.prefix + "-") == theirs  # the first run keeps everything
    assert list_namespaces(first.prefix + "-") == []


def test_without_root_refuses_and_creates_nothing(monkeypatch):
    ours = f"st-{os.getpid()}-"  # every cluster this process builds is named so
    before = list_namespaces(ours) if shutil.which("ip") else []
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterPermissionError, match="needs root"):
        with EmulatedCluster(2):
            pass
    with pytest.raises(ClusterPermissionError, match="needs root"):
        cleanup()
    assert (list_namespaces(ours) if shutil.which("ip") else []) == before


@needs_root
@pytest.mark.parametrize("latency", ["0", "1us"])
def test_small_messages_are_shaped_too(latency):
    # A token bucket passes `burst` bytes at full speed after an idle moment; with veth's 64 KiB
    # GSO packets that was 134 KB, so a 40 KB message crossed a 10 Mbit/s link in 0.3 ms.
    # "1us": the delay switch where the kernel has no netem (its TAPs take TCP segments too).
    with EmulatedCluster(2, bandwidth="10mbit", latency=latency) as cluster:
        assert cluster.gso_max_size == 1500 and cluster.burst_bytes <= 6000
        links = [(cluster.namespace(0), cluster.interface), (cluster.namespace(1), "st0")]
        if cluster.latency_method != "switch":
            links.append((cluster.hub, "p0"))
        for ns, dev in links:
            link = subprocess.run(
                ["ip", "-d", "-n", ns, "link", "show", dev], capture_output=True, text=True
            ).stdout
            assert "gso_max_size 1500 " in link
        rate = cluster.measure_bandwidth(0, 1, 40_000)  # 32 ms at the configured rate
        assert rate < 3 * cluster.bandwidth_bps, rate


@pytest.fixture
def probes_here(monkeypatch):
    """Run the link probes in this namespace (no root needed) as ``python -c SCRIPT``; set the
    script with the returned function. Returns (set_script, the processes started)."""
    from sparsetrain.cluster import netns

    started: list[subprocess.Popen] = []

    def popen(self, rank, argv, env=None, **kwargs):
        proc = subprocess.Popen(argv, **kwargs)
        self._procs.append(proc)
        started.append(proc)
        return proc

    monkeypatch.setattr(EmulatedCluster, "popen", popen)

    def set_script(script: str) -> None:
        monkeypatch.setattr(netns, "_probe_command", lambda: [sys.executable, "-c", script])

    return set_script, started


def test_a_hanging_link_probe_is_killed_and_named(probes_here):
    set_script, started = probes_here
    set_script("import time; time.sleep(60)")
    cluster = EmulatedCluster(2, bandwidth="1mbit")  # its own allowance for 50 MB: 1660 s
    t0 = time.monotonic()
    bulk = r"link probe \(bulk TCP from rank 0 to rank 1\) did not finish within 0\.5 s; it was"
    with pytest.raises(ClusterTimeoutError, match=bulk + " killed"):
        cluster.measure_bandwidth(0, 1, 50_000_000, timeout=0.5)
    ping = r"link probe \(TCP ping-pong from rank 1 to rank 0\) did not finish within 0\.3 s"
    with pytest.raises(ClusterTimeoutError, match=ping):
        cluster.measure_rtt(1, 0, timeout=0.3)
    assert time.monotonic() - t0 < 10
    assert len(started) == 4 and all(p.poll() is not None for p in started)  # killed, reaped


def test_a_failing_link_probe_names_the_rank_and_shows_its_output(probes_here):
    set_script, started = probes_here
    # Only the sender (rank 0) fails; the receiver (rank 1) would wait for it forever.
    set_script("import sys, time\nif sys.argv[1] == 'send': sys.exit('no route')\ntime.sleep(60)")
    failed = r"(?s)link probe .* failed: rank\(s\) \[0\] exited with \[1\].*rank 0.*no route"
    with pytest.raises(ClusterError, match=failed) as exc:
        EmulatedCluster(2).measure_bandwidth(0, 1, 10**6, timeout=30)
    assert not isinstance(exc.value, ClusterTimeoutError)
    assert all(p.poll() is not None for p in started)


@needs_root
def test_bench_timeout_bounds_the_link_probe_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    # At 1 Mbit/s the 50 MB link probe needs 400 s; --timeout 2 used to bound only the
    # collectives, so the probe ran on for its own allowance (1660 s).
    from sparsetrain.cli import main
    from sparsetrain.commands import bench

    class StoppedClock:
        """The command's ``time`` module with a monotonic clock that stands still, so the probe
        gets all of --timeout and its message says so exactly (a loaded machine could take
        50 ms before the probe starts and print 1.9 s); the probe itself keeps the real clock."""

        def monotonic(self) -> float:
            return 1000.0

        def __getattr__(self, name):
            return getattr(time, name)

    monkeypatch.setattr(bench, "time", StoppedClock())

    ours = f"st-{os.getpid()}-"  # the command builds its cluster in this process
    before = list_namespaces(ours)
    out = tmp_path / "out"
    argv = ["bench", "cluster", "--ranks", "2", "--bandwidth", "1mbit", "--latency", "0",
            "--sizes", "100k", "--densities", "0.01", "--algorithms", "dense", "--timeout", "2",
            "--out", str(out)]  # fmt: skip
    t0 = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert "link probe (bulk TCP from rank 0 to rank 1) did not finish within 2.0 s" in err
    assert "--timeout 2 s bounds the link probes and the collectives together" in err
    assert "ranks share" not in err  # 2 ranks are not too many for any machine's cores
    assert list_namespaces(ours) == before and not out.exists()
    assert glob.glob(f"{tempfile.gettempdir()}/sparsetrain-bench-{os.getpid()}-*") == []
    assert glob.glob(f"{tempfile.gettempdir()}/st-{os.getpid()}-*") == []


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_bench_keeps_the_points_it_timed_and_leaves_nothing(tmp_path, sig):
    # Ctrl-C (or SIGTERM) tore the cluster down and dropped every point already timed, where
    # a failed run kept them in a .partial.json.
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sparsetrain", "bench", "cluster", "--ranks", "2",
            "--bandwidth", "1gbit", "--latency", "0", "--sizes", "20k", "--densities", "0.01",
            "--algorithms", "allgather", "--reps", "1", "--passes", "100000", "--probe-bytes",
            "1000000", "--name", "s", "--out", str(out)]  # fmt: skip
    # As in a terminal: a background job of a script (CI's) inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not glob.glob(f"{tmp_path}/sparsetrain-bench-*/records.json"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()  # (failing: what its run built goes too)
            proc.wait(timeout=20)
            cleanup(f"st-{proc.pid}-")
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert f"partial records (the points finished): {out / 's.partial.json'}" in err
    partial = json.loads((out / "s.partial.json").read_text())
    assert partial["partial"] is True and partial["records"][0]["algorithm"] == "allgather"
    assert list_namespaces(f"st-{proc.pid}-") == []
    assert not glob.glob(f"{tmp_path}/sparsetrain-bench-*")


@needs_root
def test_bench_passes_pool_every_pass_and_report_how_they_agree(tmp_path, capsys, monkeypatch):
    from sparsetrain.cli import main
    from sparsetrain.commands import bench

    # More ranks a core than the model was checked at get a warning (here: any, by patching).
    monkeypatch.setattr(bench, "RANKS_PER_CORE_MODELLED", 0)

    out = tmp_path / "out"
    argv = ["bench", "cluster", "--ranks", "2", "--bandwidth", "1gbit", "--latency", "0",
            "--sizes", "20k", "--densities", "0.01,0.1", "--algorithms", "dense,allgather,oktopk",
            "--reps", "2", "--passes", "3", "--probe-bytes", "1000000", "--name", "p", "--out",
            str(out), "--few-ints", "tree"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "warning: 2 ranks share" in captured.err and "scheduling" in captured.err
    result = json.loads((out / "p.json").read_text())
    assert result["config"]["passes"] == 3
    assert result["config"]["few_ints"] == "tree"  # the log2 p form, forced on 2 ranks
    assert result["config"]["tree_from"] == 2  # and the threshold it ran with
    assert "few-int exchanges: tree" in text
    records = result["records"]
    assert len(records) == 3 * 2  # one record a point, not one a pass
    for r in records:
        assert len(r["pass_medians"]) == 3 and len(r["times_s"]) == 3 * 2
        assert len(r["warmup_s"]) == 3  # the untimed run of every pass
        assert r["median_s"] == statistics.median(r["times_s"])  # over all passes' runs
    a = result["pass_agreement"]
    assert a["passes"] == 3 and a["n_points"] == 5  # dense counts once for its size
    assert f"the 3 passes' medians agree within 20% on {a['points_within']} of 5 points" in text


@needs_root
def test_few_ints_benchmark_times_both_forms_and_leaves_nothing_behind(tmp_path, capsys):
    """benchmarks/bench_few_ints.py, whose table sets p2p.TREE_FROM, runs both forms on each
    world and writes every time; its clusters are gone afterwards."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_few_ints.py"
    spec = importlib.util.spec_from_file_location("bench_few_ints", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before, spaces = _host_state(), set(list_namespaces())
    out = tmp_path / "few.json"
    assert bench.main(["--ranks", "2,3", "--latency", "0", "--reps", "2", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == ["2", "3"]
    for run in runs.values():
        for form in ("direct", "tree"):
            assert all(run["seconds"][form][op] > 0 for op in ("agree", "gather"))
    assert "tree/direct" in capsys.readouterr().out
    assert set(list_namespaces()) == spaces and _host_state() == before
    with pytest.raises(SystemExit):
        bench.main(["--ranks", "1,4"])
    assert "at least 2 ranks" in capsys.readouterr().err


def test_token_bucket_bursts_are_about_a_millisecond_of_traffic():
    from sparsetrain.cluster.netns import _gso_max_size, _tbf_args

    # At most ~1.5 ms of traffic (the MTU floor: 6 KB, 4.8 ms at 10 Mbit/s); 1 Gbit/s and up
    # keep the kernel's 64 KiB packets (134 KB, 1.07 ms at 1 Gbit/s).
    for rate, gso, burst in ((10e6, 1500, 6000), (100e6, 6250, 15_500), (500e6, 31_250, 65_500),
                             (1e9, 65536, 134_072), (10e9, 65536, 1_250_000)):  # fmt: skip
        args = _tbf_args(rate, _gso_max_size(rate, 1500))
        assert _gso_max_size(rate, 1500) == gso and int(args[args.index("burst") + 1]) == burst


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        # tc would get "rate 0bit"
        ({"ranks": 2, "bandwidth": "0.5bit"}, ValueError, "bandwidth must be between 1kbit and"),
        ({"ranks": 1}, ValueError, "ranks must be between 2 and 1024, got 1"),
        ({"ranks": 2.0}, TypeError, "ranks must be an int, got 2.0"),
        ({"ranks": 2, "bandwidth": "1 gigabit"}, ValueError, "unknown unit 'gigabit'"),
        ({"ranks": 2, "bandwidth": "0gbit"}, ValueError, "bandwidth must be positive"),
        ({"ranks": 2, "latency": "-1ms"}, ValueError, "duration must not be negative"),
        ({"ranks": 2, "latency": "5 fortnights"}, ValueError, "unknown unit 'fortnights'"),
        ({"ranks": 2, "mtu": 10}, ValueError, r"mtu must be an int in \[576, 65535\], got 10"),
        (
            {"ranks": 2, "latency_via": "tc"},
            ValueError,
            "latency_via must be one of auto, netem, switch, got 'tc'",
        ),
    ],
)
def test_bad_options_are_refused_before_anything_is_built(kwargs, error, message):
    ours = f"st-{os.getpid()}-"  # every cluster this process builds is named so
    before = list_namespaces(ours) if shutil.which("ip") else []
    with pytest.raises(error, match=message) as exc:
        with EmulatedCluster(**kwargs):
            pass
    assert type(exc.value) is error
    assert (list_namespaces(ours) if shutil.which("ip") else []) == before
