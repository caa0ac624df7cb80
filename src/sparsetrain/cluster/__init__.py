"""An emulated bandwidth-limited cluster on one machine, for benchmarks (stdlib only).

Each rank runs in its own network namespace; the namespaces meet on a bridge, and every link is
shaped by tc (tbf for bandwidth, netem for latency). On kernels without netem, a small
userspace switch of ours takes the bridge's place and delays the frames (see
:mod:`sparsetrain.cluster.netns`). Needs root.

Example::

    from sparsetrain.cluster import EmulatedCluster

    with EmulatedCluster(ranks=8, bandwidth="1gbit", latency="100us") as cluster:
        print(cluster.measure_bandwidth() / 1e9, "Gbit/s")
        cluster.run(lambda rank: [sys.executable, "-m", "my_worker"], timeout=600)
"""

from .netns import (
    ADDRESS_RANGE,
    LATENCY_VIA,
    NAME_PREFIX,
    ClusterError,
    ClusterPermissionError,
    ClusterTimeoutError,
    EmulatedCluster,
    check_privileges,
    cleanup,
    list_namespaces,
)
from .units import parse_count, parse_duration, parse_rate

__all__ = [
    "ADDRESS_RANGE",
    "LATENCY_VIA",
    "NAME_PREFIX",
    "ClusterError",
    "ClusterPermissionError",
    "ClusterTimeoutError",
    "EmulatedCluster",
    "check_privileges",
    "cleanup",
    "list_namespaces",
    "parse_count",
    "parse_duration",
    "parse_rate",
]
