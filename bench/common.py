"""What the bench servers, the driver and the client agree on: the secret, the topic, process limits."""

from __future__ import annotations

import resource

# A fixed, benchmark-only signing key: both servers verify tokens with it, the driver issues them.
BENCH_SECRET = "bench-only-secret-0123456789abcdef-not-for-production"
TOPIC = "bench:t"
EVENT = "tick"


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (thousands of sockets); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
