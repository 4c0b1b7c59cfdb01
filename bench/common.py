"""Memory readings shared by the benchmarks (Linux /proc; falls back to ru_maxrss elsewhere)."""

from __future__ import annotations

import resource


def _status_mib(field: str) -> float:
    # VmRSS: resident now; VmHWM: peak resident of this process image (unlike ru_maxrss, not inherited
    # from the parent across fork+exec).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")
