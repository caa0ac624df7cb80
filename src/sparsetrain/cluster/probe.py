"""Measure what an emulated link achieves: bulk TCP throughput and round-trip time.

Run inside a network namespace (``ip netns exec NS python -m sparsetrain.cluster.probe ...``);
the client (``send`` or ``ping``) prints one JSON line with what it measured. Stdlib only.

Throughput is timed on the sender, from just before its first byte until the receiver says it
has read the last one, so a receiver that is scheduled late can only lower the rate measured
(bytes queued in its socket buffer are counted against time that has already run).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

_CHUNK = 1 << 20


def _listen(addr: str, port: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    return srv


def _connect(addr: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((addr, port), timeout=timeout)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def serve_throughput(addr: str, port: int, timeout: float) -> dict:
    """Accept one sender, read until it closes, and tell it how many bytes arrived (the
    acknowledgement its clock stops at). Returns the bytes received."""
    with _listen(addr, port) as srv:
        srv.settimeout(timeout)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout)
            got = 0
            while True:
                buf = conn.recv(_CHUNK)
                if not buf:
                    break
                got += len(buf)
            conn.sendall(str(got).encode())
    return {"bytes": got}


def send_bulk(addr: str, port: int, nbytes: int, timeout: float) -> dict:
    """Send ``nbytes`` as fast as TCP allows and return the bytes delivered and the rate: from
    just before the first byte is sent until the receiver acknowledges the last one."""
    payload = b"\0" * _CHUNK
    with _connect(addr, port, timeout) as conn:
        sent = 0
        start = time.perf_counter()
        while sent < nbytes:
            conn.sendall(payload[: min(_CHUNK, nbytes - sent)])
            sent += min(_CHUNK, nbytes - sent)
        conn.shutdown(socket.SHUT_WR)
        ack = b""
        while True:
            buf = conn.recv(64)
            if not buf:
                break
            ack += buf
        elapsed = time.perf_counter() - start
    if ack != str(sent).encode():
        raise RuntimeError(f"the receiver acknowledged {ack!r} of {sent} bytes sent")
    return {"bytes": sent, "seconds": elapsed, "bits_per_second": 8 * sent / max(elapsed, 1e-9)}


def serve_echo(addr: str, port: int, timeout: float) -> dict:
    """Echo one-byte messages back until the peer closes."""
    with _listen(addr, port) as srv:
        srv.settimeout(timeout)
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                b = conn.recv(1)
                if not b:
                    break
                conn.sendall(b)
    return {}


def ping(addr: str, port: int, count: int, timeout: float) -> dict:
    """Return the median round-trip time of ``count`` one-byte TCP exchanges."""
    with _connect(addr, port, timeout) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(count + 5):
            t0 = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(1)
            rtts.append(time.perf_counter() - t0)
    rtts = rtts[5:]
    return {"rtt_median_seconds": statistics.median(rtts), "rtt_min_seconds": min(rtts)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("role", choices=["recv", "send", "echo", "ping"])
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--bytes", type=int, default=50_000_000)
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.role == "recv":
        serve_throughput(a.addr, a.port, a.timeout)
        out = {}
    elif a.role == "send":
        out = send_bulk(a.addr, a.port, a.bytes, a.timeout)
    elif a.role == "echo":
        out = serve_echo(a.addr, a.port, a.timeout)
    else:
        out = ping(a.addr, a.port, a.count, a.timeout)
    if out:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
