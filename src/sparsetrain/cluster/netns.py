"""An emulated cluster on one machine: one network namespace a rank, shaped links, one switch.

Topology (every name carries the run's prefix ``st-<pid>-<tag>``, so parallel runs never collide
and a leftover can be traced to the process that made it)::

    <prefix>-0  [st0 198.18.0.1/15] ──veth── [p0]┐
    <prefix>-1  [st0 198.18.0.2/15] ──veth── [p1]┼─ br0   (bridge inside namespace <prefix>-hub)
    ...                                          ┘

Each link is shaped in both directions, like a full-duplex NIC on a switch port:

* upload (rank -> switch): on the rank's ``st0`` egress, ``netem delay <latency>`` as the root
  qdisc with a ``tbf rate <bandwidth>`` child (netem first, so packets wait their latency and
  then queue for the token bucket);
* download (switch -> rank): ``tbf rate <bandwidth>`` on the switch port's egress.

So one message between two ranks sees ``latency`` once and the bandwidth of both its sender's
upload and its receiver's download, as on a real non-blocking switch. Everything lives inside
namespaces this object creates: nothing is added to the host's own namespace, and deleting the
namespaces removes every link and qdisc with them. Addresses come from the benchmarking range
198.18.0.0/15 (RFC 2544).

Kernels built without ``sch_netem`` (some VMs) cannot delay packets in a qdisc. There the
cluster puts a small program of its own in place of the bridge, the delay switch
(``delayswitch.c``, compiled on first use with the machine's C compiler)::

    <prefix>-0  [st0 198.18.0.1/15] ──TAP──┐
    <prefix>-1  [st0 198.18.0.2/15] ──TAP──┼─ delayswitch   (a process in <prefix>-hub)
    ...                                    ┘

Each rank's ``st0`` is then a TAP device whose frames the switch reads, holds for the latency,
passes through a token bucket of the link's rate and burst for the receiving rank (the download
direction, which tbf shapes on the bridge), and writes into the receiver's TAP. The upload
direction keeps its ``tbf`` on ``st0``. Frames carry a virtio-net header, so TCP hands over
64 KiB segments as on veth. The switch's TAPs vanish with it, and it exits with the thread
that built the cluster (so close a cluster from the thread that entered it); if it exits while
ranks run, :meth:`EmulatedCluster.run` fails at once with its message. It costs CPU, taken
from the ranks on a small machine: three copies and two system calls a segment, and the
receiving rank's network stack runs on the switch's time. ``latency_via="netem"`` or
``"switch"`` forces one way, and a latency of 0 uses the bridge alone. Where neither way is
available (no netem, and no C compiler, no ``/dev/net/tun``, or an MTU above a TAP's 65521),
the cluster shapes bandwidth only, warns, and reports ``latency_emulated = False``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .units import parse_duration, parse_rate

NAME_PREFIX = "st-"
ADDRESS_RANGE = ipaddress.ip_network("198.18.0.0/15")
RANK_IFNAME = "st0"
DEFAULT_MASTER_PORT = 29500
MAX_RANKS = 1024
MAX_RATE_BPS = 10e12  # 10 Tbit/s: far above what veths on one machine carry
MAX_LATENCY_S = 10.0  # one way: a link slower than any real one, far above a WAN's
# The names this module gives: st-<pid>-<8 hex digits>-<rank or "hub">. Nothing else is ours.
_OWN_NAME = re.compile(r"^st-(\d+)-[0-9a-f]{8}-(hub|\d+)$")
# Signals that end a run: SIGINT raises KeyboardInterrupt (where Python's default handler is
# installed), SIGTERM and SIGHUP SystemExit, in the main thread, so tear-down runs.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ClusterError(RuntimeError):
    """The emulated cluster could not be built, or a rank failed."""


class ClusterPermissionError(ClusterError):
    """Building an emulated cluster needs root (CAP_NET_ADMIN) and iproute2."""


class ClusterTimeoutError(ClusterError):
    """Ranks or a link probe did not finish within their time; they were killed."""


def _lacking_capabilities() -> list[str]:
    """The capabilities among CAP_NET_ADMIN (12) and CAP_SYS_ADMIN (21) that this process's
    effective set lacks (none where /proc does not say)."""
    try:
        with open("/proc/self/status") as fh:
            line = next(x for x in fh if x.startswith("CapEff:"))
        effective = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError, IndexError):
        return []
    names = {12: "CAP_NET_ADMIN", 21: "CAP_SYS_ADMIN"}
    return [name for bit, name in names.items() if not effective >> bit & 1]


def check_privileges() -> None:
    """Raise :class:`ClusterPermissionError` unless this process can create namespaces.

    Checks, creating nothing: effective user id 0, ``ip`` and ``tc`` on PATH, ``ip netns``
    readable.
    """
    if os.geteuid() != 0:
        raise ClusterPermissionError(
            "the emulated cluster needs root to create network namespaces and shape links with "
            "tc; run it as root (e.g. `sudo sparsetrain bench cluster ...`) or in a container "
            "with CAP_NET_ADMIN and CAP_SYS_ADMIN"
        )
    lacking = _lacking_capabilities()
    if lacking:  # root in a container without them: `ip netns add` failed, exit 1
        raise ClusterPermissionError(
            f"the emulated cluster needs {' and '.join(lacking)} to create network namespaces "
            "and shape links, and this root process lacks them (a container without them?): "
            "run it where root has them, e.g. a container started with --cap-add NET_ADMIN "
            "--cap-add SYS_ADMIN"
        )
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterPermissionError(
            f"the emulated cluster needs iproute2; not found on PATH: {', '.join(missing)}"
        )
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ClusterPermissionError(
            f"`ip netns` is not usable here: {probe.stderr.strip() or 'unknown error'}"
        )


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc


def list_namespaces(prefix: str = NAME_PREFIX) -> list[str]:
    """Return the network namespaces whose name starts with ``prefix``."""
    proc = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def _owner_pid(namespace: str) -> int | None:
    """Return the pid of the process that made ``namespace``, or None if this module did not
    name it (a namespace of someone else's that merely starts with ``st-``)."""
    m = _OWN_NAME.match(namespace)
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str) -> None:
    proc = _run(["ip", "netns", "pids", namespace], check=False)
    for pid in (int(p) for p in proc.stdout.split() if p.isdigit()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cleanup(prefix: str = NAME_PREFIX, *, include_live: bool = False) -> list[str]:
    """Remove leftover emulated-cluster namespaces (and with them their links and qdiscs).

    By default only namespaces whose creating process has exited are removed, so a cleanup
    never breaks a run in progress; ``include_live=True`` removes those of live runs too.
    Only names of this module's pattern (``st-<pid>-<tag>-<rank or hub>``) are touched: a
    namespace of someone else's that happens to start with ``st-`` is left alone.

    Args:
        prefix: the namespace name prefix to match (``"st-"`` matches every run; a run's own
            prefix, e.g. ``"st-4242-ab12"``, matches only that run).
        include_live: also remove namespaces of processes still running.

    Returns:
        The names of the namespaces removed.

    Example:
        >>> cleanup()  # doctest: +SKIP
        ['st-4242-ab12-0', 'st-4242-ab12-1', 'st-4242-ab12-hub']
    """
    check_privileges()
    removed = []
    for ns in list_namespaces(prefix):
        owner = _owner_pid(ns)
        if owner is None:
            continue
        if not include_live and owner != os.getpid() and _alive(owner):
            continue
        _kill_namespace_processes(ns)
        if _run(["ip", "netns", "del", ns], check=False).returncode == 0:
            removed.append(ns)
    return removed


LATENCY_VIA = ("auto", "netem", "switch")
_SWITCH_SOURCE = Path(__file__).with_name("delayswitch.c")
_TAP_MAX_MTU = 65521


def _switch_program() -> Path:
    """The delay switch, compiled on first use (see :mod:`sparsetrain._ccache`)."""
    from .._ccache import compile_cached

    return compile_cached(_SWITCH_SOURCE, ["-O2", "-std=gnu99"])


def _rank_mac(rank: int) -> str:
    """The MAC address of ``rank``'s st0, by which the delay switch knows the rank."""
    return f"02:53:54:00:{rank >> 8:02x}:{rank & 0xFF:02x}"


def _netem_available(namespace: str, dev: str) -> bool:
    """Return whether the kernel has sch_netem (tried on a link of ours, then removed)."""
    ok = _run(["tc", "-n", namespace, "qdisc", "add", "dev", dev, "root", "netem"], check=False)
    if ok.returncode == 0:
        _run(["tc", "-n", namespace, "qdisc", "del", "dev", dev, "root"], check=False)
        return True
    return False


# A token bucket lets ``burst`` bytes through at full speed after an idle moment, so a message
# smaller than that is not shaped at all. The bucket must hold two of the largest packets it
# sees, and veth hands it whole GSO super-packets (64 KiB by default): the burst is then at least
# 134 KB, about 1 ms of traffic at 1 Gbit/s but 107 ms at 10 Mbit/s. Where two such packets
# exceed 1.5 ms of traffic, the links cap GSO so that the burst is about BURST_S (1 ms) of
# traffic, and at least a few MTU-sized packets. Not below that: smaller packets cost the
# kernel CPU per byte, and on a shared machine that slows bulk transfers (8 ranks on 2 cores
# with 15.5 KB bursts at 1 Gbit/s: dense allreduce of 25M floats took 4.5 s instead of 1.5 s).
BURST_S = 1e-3
_GSO_DEFAULT = 65536


def _gso_max_size(rate_bps: float, mtu: int) -> int:
    """The largest packet (GSO super-packet) the links hand their token buckets."""
    if (2 * _GSO_DEFAULT + 3000) * 8 / rate_bps <= 1.5 * BURST_S:
        return _GSO_DEFAULT
    return int(min(_GSO_DEFAULT, max(mtu, rate_bps / 8 * BURST_S / 2)))


def _tbf_args(rate_bps: float, gso: int = _GSO_DEFAULT) -> list[str]:
    # burst: two packets of the largest size (plus headers), or BURST_S of traffic; queue
    # limit: 100 ms worth, so TCP sees few drops.
    burst = max(2 * gso + 3000, int(rate_bps / 8 * BURST_S))
    # (tc takes 32-bit byte counts: past 343 Gbit/s, 100 ms of traffic was refused mid-build)
    limit = min(max(2 * burst, int(rate_bps / 8 * 0.1)), 2**32 - 1)
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "limit", str(limit)]


@dataclass
class EmulatedCluster:
    """A bandwidth- and latency-limited cluster of ``ranks`` network namespaces on this machine.

    Use it as a context manager: entering builds namespaces, links and qdiscs; leaving removes
    all of them, also on an exception, Ctrl-C (KeyboardInterrupt), SIGTERM or SIGHUP (a closed
    terminal). Tear-down itself is not interrupted by a second Ctrl-C: the signal waits until
    everything is removed.

    Args:
        ranks: number of ranks (namespaces), 2 to 1024.
        bandwidth: each link's rate in each direction, in tc notation (``"1gbit"``) or bits/s.
        latency: one-way delay a message sees between two ranks (``"100us"``) or seconds.
        mtu: the links' MTU in bytes.
        latency_via: how the latency is made: ``"auto"`` (netem where the kernel has it, else
            the delay switch), ``"netem"`` or ``"switch"`` (that way or a
            :class:`ClusterError`). Ignored when the latency is 0.

    Attributes:
        prefix: the run's unique name prefix (``st-<pid>-<tag>``).
        latency_method: ``"netem"``, ``"switch"``, or None (latency 0, or neither way works
            here: only bandwidth is shaped). Set when the cluster is built.
        latency_emulated: whether ``latency_method`` is not None.
        gso_max_size, burst_bytes: the largest packet the links hand their token buckets, and
            the bytes a bucket lets through at full speed after an idle moment (about
            ``BURST_S`` of traffic; see ``_tbf_args``).

    Example:
        >>> with EmulatedCluster(4, "1gbit", "100us") as cluster:  # doctest: +SKIP
        ...     cluster.run(lambda rank: [sys.executable, "-m", "my.worker"])
    """

    ranks: int
    bandwidth: str | float = "1gbit"
    latency: str | float = "100us"
    mtu: int = 1500
    latency_via: str = "auto"
    prefix: str = field(init=False)
    latency_method: str | None = field(init=False, default=None)
    _created: list[str] = field(init=False, default_factory=list, repr=False)
    _procs: list[subprocess.Popen] = field(init=False, default_factory=list, repr=False)
    _old_handlers: dict = field(init=False, default_factory=dict, repr=False)
    # Stop signals that arrived while close() was tearing down (None: not closing).
    _deferred: list | None = field(init=False, default=None, repr=False)
    _switch: subprocess.Popen | None = field(init=False, default=None, repr=False)
    _switch_log: object = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int):
            raise TypeError(f"ranks must be an int, got {self.ranks!r}")
        if not 2 <= self.ranks <= MAX_RANKS:
            raise ValueError(f"ranks must be between 2 and {MAX_RANKS}, got {self.ranks}")
        if (
            isinstance(self.mtu, bool)
            or not isinstance(self.mtu, int)
            or not 576 <= self.mtu <= 65535
        ):
            raise ValueError(f"mtu must be an int in [576, 65535], got {self.mtu!r}")
        if self.latency_via not in LATENCY_VIA:
            raise ValueError(
                f"latency_via must be one of {', '.join(LATENCY_VIA)}, got {self.latency_via!r}"
            )
        self.bandwidth_bps = parse_rate(self.bandwidth)
        if not 1000 <= self.bandwidth_bps <= MAX_RATE_BPS:
            # (tc counts a token bucket's burst, 1 ms of traffic, in 32 bits: past 34 Tbit/s
            # the build failed half way with tc's own error)
            raise ValueError(
                f"bandwidth must be between 1kbit and {MAX_RATE_BPS / 1e12:g}tbit, got "
                f"{self.bandwidth!r}"
            )
        self.latency_s = parse_duration(self.latency)
        if self.latency_s > MAX_LATENCY_S:
            # (the link probe waits on every round trip: 1000s had waited for --timeout)
            raise ValueError(
                f"latency must be at most {MAX_LATENCY_S:g}s, one way, got {self.latency!r}"
            )
        self.gso_max_size = _gso_max_size(self.bandwidth_bps, self.mtu)
        self.burst_bytes = 0  # set when the links are shaped
        self.prefix = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"

    @property
    def latency_emulated(self) -> bool:
        return self.latency_method is not None

    # ---- names -------------------------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def namespace(self, rank: int) -> str:
        """Return the network namespace of ``rank``."""
        self._check_rank(rank)
        return f"{self.prefix}-{rank}"

    def address(self, rank: int) -> str:
        """Return the IPv4 address of ``rank`` (198.18.0.1 for rank 0, and so on)."""
        self._check_rank(rank)
        return str(ADDRESS_RANGE[rank + 1])

    @property
    def interface(self) -> str:
        """The name of every rank's link inside its namespace (for GLOO_SOCKET_IFNAME)."""
        return RANK_IFNAME

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank must be in [0, {self.ranks}), got {rank}")

    # ---- set-up and tear-down -------------------------------------------------------------
    def __enter__(self) -> EmulatedCluster:
        check_privileges()
        try:
            if threading.current_thread() is threading.main_thread():
                for sig in _STOP_SIGNALS:
                    current = signal.getsignal(sig)
                    # Leave a user's own Ctrl-C handler (or an ignored SIGINT) alone.
                    if sig == signal.SIGINT and current is not signal.default_int_handler:
                        continue
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            self._build()
        except BaseException as e:
            self._close_after(e)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close(stopping=isinstance(exc, (KeyboardInterrupt, SystemExit)))
        except (KeyboardInterrupt, SystemExit) as e:
            self._close_after(e)
            raise

    def _close_after(self, error: BaseException) -> None:
        """Close once more if a stop signal cut in before :meth:`close` could hold signals back
        (a few bytecodes' window), so the run still ends with nothing left behind."""
        if self._created or self._procs or self._old_handlers:
            self.close(stopping=isinstance(error, (KeyboardInterrupt, SystemExit)))

    def _add_namespace(self, name: str) -> None:
        # Recorded before it exists, so an interrupt right after `ip netns add` cannot leak it;
        # forgotten again if the add failed (the name may be someone else's).
        self._created.append(name)
        try:
            _run(["ip", "netns", "add", name])
        except ClusterError:
            self._created.remove(name)
            raise
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        self._add_namespace(self.hub)
        # Chosen before the ranks' namespaces are made: a latency way that cannot run (netem
        # asked for on a kernel without it) is refused having built only the hub to try it in.
        self.latency_method = self._choose_latency_method()
        for rank in range(self.ranks):
            self._add_namespace(self.namespace(rank))
        if self.latency_method == "switch":
            try:
                self._start_switch()
            except ClusterError as e:
                if self.latency_via == "switch":
                    raise
                self._warn_no_latency(str(e))  # its TAPs went with it: build the bridge
                self.latency_method, self._switch = None, None
        if self.latency_method != "switch":
            self._build_bridge()
        self._shape()

    def _choose_latency_method(self) -> str | None:
        """Return how the latency will be made (None: it will not), warning or raising where
        the way asked for is not available."""
        if self.latency_s <= 0:
            return None
        if self.latency_via in ("auto", "netem") and _netem_available(self.hub, "lo"):
            return "netem"
        if self.latency_via == "netem":
            raise ClusterError("latency_via='netem': this kernel has no sch_netem qdisc")
        problem = None
        if self.mtu > _TAP_MAX_MTU:
            problem = f"its TAP links take an MTU of at most {_TAP_MAX_MTU}, got {self.mtu}"
        elif not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            problem = "/dev/net/tun is not available here"
        else:
            try:
                _switch_program()
            except Exception as e:  # no compiler, an unwritable or unsafe cache
                problem = f"it cannot be built: {e}"
        if problem is None:
            return "switch"
        if self.latency_via == "switch":
            raise ClusterError(f"latency_via='switch': the delay switch cannot run: {problem}")
        self._warn_no_latency(problem)
        return None

    @staticmethod
    def _warn_no_latency(problem: str) -> None:
        warnings.warn(
            f"this kernel has no sch_netem qdisc and the delay switch cannot run ({problem}): "
            "links are bandwidth-shaped only and keep the native latency of a veth pair "
            "(measure it with EmulatedCluster.measure_rtt)",
            RuntimeWarning,
            stacklevel=5,
        )

    def _build_bridge(self) -> None:
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for rank in range(self.ranks):
            ns, port = self.namespace(rank), f"p{rank}"
            # Both ends are born inside our namespaces: the host namespace is never touched.
            _run(["ip", "-n", self.hub, "link", "add", port, "mtu", str(self.mtu), "type", "veth",
                  "peer", "name", RANK_IFNAME, "netns", ns, "mtu", str(self.mtu)])  # fmt: skip
            _run(["ip", "-n", self.hub, "link", "set", port, "master", "br0", "up"])
            self._raise_rank_link(rank)
            if self.gso_max_size < _GSO_DEFAULT:  # both ends: each side's bucket sees its sends
                self._cap_gso(self.hub, port)

    def _raise_rank_link(self, rank: int) -> None:
        """Give ``rank``'s st0 its address, bring it up, and cap its GSO where the rate asks."""
        ns = self.namespace(rank)
        mask = ADDRESS_RANGE.prefixlen
        _run(["ip", "-n", ns, "addr", "add", f"{self.address(rank)}/{mask}", "dev", RANK_IFNAME])
        _run(["ip", "-n", ns, "link", "set", RANK_IFNAME, "up"])
        if self.gso_max_size < _GSO_DEFAULT:
            self._cap_gso(ns, RANK_IFNAME)

    def _cap_gso(self, namespace: str, dev: str) -> None:
        set_gso = ["ip", "-n", namespace, "link", "set", "dev", dev]
        if _run([*set_gso, "gso_max_size", str(self.gso_max_size)], check=False).returncode:
            self.gso_max_size = _GSO_DEFAULT  # an old kernel: keep the large burst

    def _start_switch(self, timeout: float = 30.0) -> None:
        """Start the delay switch in the hub namespace; it makes each rank's st0 (a TAP)."""
        import selectors

        tbf = _tbf_args(self.bandwidth_bps, self.gso_max_size)
        burst, limit = tbf[tbf.index("burst") + 1], tbf[tbf.index("limit") + 1]
        netns_dir = "/var/run/netns" if os.path.isdir("/var/run/netns") else "/run/netns"
        argv = [str(_switch_program()), str(os.getpid()), str(round(self.latency_s * 1e9)),
                str(int(self.bandwidth_bps)), burst, limit,
                *(f"{netns_dir}/{self.namespace(r)}" for r in range(self.ranks))]  # fmt: skip
        # Its messages go to a file kept for the run, which a failure shows. Its own session:
        # a Ctrl-C in the terminal reaches the ranks and this process, not the links.
        self._switch_log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        proc = self.popen(-1, argv, stdout=subprocess.PIPE, stderr=self._switch_log,
                          start_new_session=True)  # fmt: skip
        self._switch = proc
        with selectors.DefaultSelector() as sel, proc.stdout:
            sel.register(proc.stdout, selectors.EVENT_READ)
            # The switch prints nothing after this line: our end of the pipe can close.
            ready = sel.select(timeout) and proc.stdout.readline().strip() == b"ready"
        if not ready:
            _stop([proc])
            raise ClusterError(
                f"the delay switch did not start within {timeout:g} s (exit {proc.returncode})"
                f": {self._switch_message() or 'no message'}"
            )
        for rank in range(self.ranks):
            _run(["ip", "-n", self.namespace(rank), "link", "set", RANK_IFNAME, "address",
                  _rank_mac(rank), "mtu", str(self.mtu)])  # fmt: skip
            self._raise_rank_link(rank)

    def _switch_message(self) -> str:
        if self._switch_log is None:
            return ""
        self._switch_log.seek(0)
        return self._switch_log.read().decode(errors="replace").strip()[-2000:]

    def _check_switch(self) -> None:
        """Raise :class:`ClusterError` if the delay switch has exited (the links are gone)."""
        if self._switch is not None and self._switch.poll() is not None:
            raise ClusterError(
                f"the delay switch exited ({self._switch.returncode}) while ranks were running: "
                f"{self._switch_message() or 'no message'}"
            )

    def _shape(self) -> None:
        tbf = _tbf_args(self.bandwidth_bps, self.gso_max_size)
        self.burst_bytes = int(tbf[tbf.index("burst") + 1])
        for rank in range(self.ranks):
            ns = self.namespace(rank)
            tc_up = ["tc", "-n", ns, "qdisc", "add", "dev", RANK_IFNAME]
            if self.latency_method == "netem":
                delay_us = f"{self.latency_s * 1e6:.1f}us"
                _run(
                    [*tc_up, "root", "handle", "1:", "netem", "delay", delay_us, "limit", "100000"]
                )
                _run([*tc_up, "parent", "1:1", "handle", "10:", *tbf])
            else:
                _run([*tc_up, "root", "handle", "1:", *tbf])
            if self.latency_method != "switch":  # the switch shapes the download itself
                _run(["tc", "-n", self.hub, "qdisc", "add", "dev", f"p{rank}", "root",
                      "handle", "1:", *tbf])  # fmt: skip

    def close(self, stopping: bool = False) -> None:
        """Stop the ranks' processes and remove every namespace, link and qdisc of this run.

        While it runs, Ctrl-C, SIGTERM and SIGHUP are only recorded, so pressing Ctrl-C again
        cannot leave half the namespaces behind; afterwards the first one is raised, unless the
        run is already ``stopping`` (a stop signal's exception is on its way out).
        Only namespaces this object created are removed.
        """
        self._deferred = []
        try:
            _stop(self._procs)
            self._procs.clear()
            for ns in reversed(self._created):
                _kill_namespace_processes(ns)
                _run(["ip", "netns", "del", ns], check=False)
            self._created.clear()
            self._switch = None
            if self._switch_log is not None:
                self._switch_log.close()
                self._switch_log = None
        finally:
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            self._old_handlers.clear()
            pending, self._deferred = self._deferred, None
            if pending and not stopping:
                _raise_for(pending[0])

    def _on_signal(self, signum: int, frame) -> None:
        """The handler of the stop signals while the cluster exists: raise (so the ``with``
        block unwinds into :meth:`close`), each time one arrives, except during tear-down,
        where it is recorded for :meth:`close` to raise when done."""
        if self._deferred is not None:
            self._deferred.append(signum)
            return
        _raise_for(signum)

    # ---- running processes inside ---------------------------------------------------------
    def environment(self, rank: int, master_port: int = DEFAULT_MASTER_PORT) -> dict[str, str]:
        """Return the torchrun-style variables that join ``rank`` to the job over the links."""
        return {
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": str(self.ranks),
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": self.address(0),
            "MASTER_PORT": str(master_port),
            "GLOO_SOCKET_IFNAME": RANK_IFNAME,
            "NCCL_SOCKET_IFNAME": RANK_IFNAME,
            "OMP_NUM_THREADS": "1",
        }

    def popen(
        self, rank: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **kwargs
    ) -> subprocess.Popen:
        """Start ``argv`` inside ``rank``'s namespace (-1: the hub's); the process is killed
        by :meth:`close`, or by the kernel when this process ends without closing (SIGKILL),
        if started from the main thread."""
        if not self._created:
            raise ClusterError("the cluster is not built; use it inside a `with` block")
        full_env = {**os.environ, **(env or {})}
        ns = self.hub if rank == -1 else self.namespace(rank)
        if "preexec_fn" not in kwargs and threading.current_thread() is threading.main_thread():
            kwargs["preexec_fn"] = _killed_with(os.getpid())
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=full_env,
                                **kwargs)  # fmt: skip
        self._procs.append(proc)
        return proc

    def run(
        self,
        argv: Callable[[int], Sequence[str]] | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        master_port: int = DEFAULT_MASTER_PORT,
        show_rank0: bool = True,
    ) -> None:
        """Run one process a rank (a torchrun-style job) and wait until all exit.

        Every rank gets :meth:`environment`. Rank 0 writes to this terminal (``show_rank0``);
        the others to log files whose tails are shown if a rank fails. When one rank fails,
        or ``timeout`` seconds pass, all are killed and :class:`ClusterError` is raised
        (:class:`ClusterTimeoutError` for the timeout).

        Args:
            argv: the command, or a function of the rank returning it.
            env: extra environment variables for every rank.
            timeout: seconds to wait for all ranks; None waits forever.
            master_port: the rendezvous port on rank 0's address.
            show_rank0: let rank 0 print to this process's stdout/stderr.
        """
        logs = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-logs-"))
        procs, files = [], []
        try:
            for rank in range(self.ranks):
                cmd = list(argv(rank) if callable(argv) else argv)
                renv = {**self.environment(rank, master_port), **(env or {})}
                if rank == 0 and show_rank0:
                    procs.append(self.popen(rank, cmd, renv))
                    files.append(None)
                else:
                    f = open(logs / f"rank{rank}.log", "w+b")  # noqa: SIM115
                    files.append(f)
                    procs.append(self.popen(rank, cmd, renv, stdout=f, stderr=subprocess.STDOUT))
            failed = _wait(procs, timeout, self._check_switch)
            if failed is None:
                running = [r for r, p in enumerate(procs) if p.poll() is None]
                raise ClusterTimeoutError(
                    f"ranks did not finish within {timeout:.1f} s (still running: rank(s) "
                    f"{running})" + _tails(files)
                )
            if failed:
                raise ClusterError(
                    f"rank(s) {failed} exited with {[procs[r].returncode for r in failed]}"
                    + _tails(files, failed)
                )
        finally:
            # As in close(): a second Ctrl-C during this clean-up waits until it is done (it
            # had left the log folder behind), and is raised after it unless an exception is
            # already on its way out.
            outer = self._deferred is None
            if outer:
                self._deferred = []
            try:
                _stop(procs)
                for f in files:
                    if f is not None:
                        f.close()
                shutil.rmtree(logs, ignore_errors=True)
            finally:
                if outer:
                    pending, self._deferred = self._deferred, None
                    if pending and sys.exc_info()[0] is None:
                        _raise_for(pending[0])

    # ---- measuring the links -------------------------------------------------------------
    def measure_bandwidth(
        self,
        src: int = 0,
        dst: int = 1,
        nbytes: int = 50_000_000,
        port: int = 5201,
        *,
        timeout: float | None = None,
    ) -> float:
        """Return the bulk TCP throughput from ``src`` to ``dst`` in bits per second: ``nbytes``
        over the time from the sender's first byte until ``dst`` acknowledges the last one.

        The probe gets four times what the shaped link needs plus a minute for start-up, or
        ``timeout`` seconds if that is less; then it is killed and :class:`ClusterTimeoutError`
        raised.
        """
        allowed = 60.0 + 4 * 8 * nbytes / self.bandwidth_bps
        out = self._probe(dst, src, ["recv"], ["send", "--bytes", str(nbytes)], port,
                          what=f"bulk TCP from rank {src} to rank {dst}", result_from=1,
                          timeout=allowed if timeout is None else min(allowed, timeout))  # fmt: skip
        return float(out["bits_per_second"])

    def measure_rtt(
        self,
        src: int = 0,
        dst: int = 1,
        count: int = 50,
        port: int = 5202,
        *,
        timeout: float | None = None,
    ) -> float:
        """Return the median TCP round-trip time of a one-byte message, in seconds.

        The probe gets two minutes, or ``timeout`` seconds if that is less; then it is killed
        and :class:`ClusterTimeoutError` raised.
        """
        out = self._probe(dst, src, ["echo"], ["ping", "--count", str(count)], port,
                          what=f"TCP ping-pong from rank {src} to rank {dst}", result_from=1,
                          timeout=120.0 if timeout is None else min(120.0, timeout))  # fmt: skip
        return float(out["rtt_median_seconds"])

    def _probe(
        self,
        server: int,
        client: int,
        srv_args: Sequence[str],
        cli_args: Sequence[str],
        port: int,
        *,
        what: str,
        timeout: float,
        result_from: int = 0,
    ) -> dict:
        """Run probe.py's ``srv_args`` role on ``server`` and ``cli_args`` on ``client`` (as
        :meth:`run` runs ranks: killed on failure or after ``timeout`` seconds) and return the
        JSON line one of them printed (``result_from``: 0 the server, 1 the client)."""
        import json

        addr = self.address(server)
        # Output goes to files, indexed by rank, so a failure shows each side's last lines.
        files: list = [None] * self.ranks
        procs = []
        try:
            for rank, (role, *rest) in ((server, srv_args), (client, cli_args)):
                files[rank] = tempfile.TemporaryFile()  # noqa: SIM115
                procs.append(self.popen(rank, [*_probe_command(), role, addr, str(port), *rest],
                                        stdout=files[rank], stderr=subprocess.STDOUT))  # fmt: skip
            failed = _wait(procs, timeout, self._check_switch)
            if failed is None:
                raise ClusterTimeoutError(
                    f"link probe ({what}) did not finish within {timeout:.1f} s; it was killed"
                    + _tails(files)
                )
            if failed:
                ranks = [(server, client)[i] for i in failed]
                raise ClusterError(
                    f"link probe ({what}) failed: rank(s) {ranks} exited with "
                    f"{[procs[i].returncode for i in failed]}" + _tails(files, ranks)
                )
            f = files[(server, client)[result_from]]
            f.seek(0)
            return json.loads(f.read().decode().strip().splitlines()[-1])
        finally:
            _stop(procs)
            for f in files:
                if f is not None:
                    f.close()


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _killed_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when ``parent`` (this process,
    which must start it from its main thread: the signal follows the thread that forked) ends.
    A run killed outright has no chance to stop its ranks, which then timed on as orphans,
    holding the cores, until they finished. ``ip netns exec`` execs the command in the same
    process, and the setting survives the exec. None where libc has no ``prctl``."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it ended before the line above: no signal will come
            os._exit(1)

    return set_signal


def _probe_command() -> list[str]:
    """The command that runs probe.py (a role and its arguments follow). It runs as a script:
    importing the package would import torch (seconds)."""
    return [sys.executable, str(Path(__file__).with_name("probe.py"))]


def _wait(
    procs: Sequence[subprocess.Popen],
    timeout: float | None,
    check: Callable[[], None] | None = None,
) -> list[int] | None:
    """Wait until every process has exited with 0 or one has failed, at most ``timeout``
    seconds (None: no limit). Return the indices of the failed ones (empty: all succeeded), or
    None if the time ran out first; ``check`` is called on the way and may raise. The caller
    stops what still runs (:func:`_stop`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        codes = [p.poll() for p in procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed or all(c == 0 for c in codes):
            return failed
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _stop(procs: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """Kill the processes still running and reap them, waiting ``grace`` seconds in all (a
    process stuck in the kernel is left to init rather than hanging the tear-down)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _tails(files, ranks=None, nbytes: int = 2000) -> str:
    out = []
    for rank, f in enumerate(files):
        if f is None or (ranks is not None and rank not in ranks):
            continue
        f.flush()
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - nbytes))
        out.append(f"\n--- rank {rank} (last lines) ---\n" + f.read().decode(errors="replace"))
    return "".join(out)
