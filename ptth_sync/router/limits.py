"""How many descriptors the router may spend on what, so that it never dies of EMFILE.

Servers raise their soft ``RLIMIT_NOFILE`` to the hard limit at start (nginx's
``worker_rlimit_nofile``, systemd's default for services); the router does too.
The budget then splits what is left after a reserve (logs, pipes, listeners,
the admin endpoints) between client connections, established tunnels and
tunnel connections still in their handshake, so that none of them can take
the descriptors the others need.
"""

from __future__ import annotations

import logging
from typing import Tuple

try:
    import resource
except ImportError:  # Defensive: not a Unix
    resource = None  # type: ignore[assignment]

__all__ = ["descriptor_budget", "open_file_limit", "raise_open_file_limit"]

log = logging.getLogger("ptth_sync.router")

#: Descriptors kept for everything that is neither a client nor a tunnel.
RESERVE = 64
#: Never ask for more than this many, even when the hard limit is unlimited.
CEILING = 1 << 20


def open_file_limit() -> int:
    """The soft limit on open descriptors of this process."""
    if resource is None:
        return 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return CEILING if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> int:
    """Raise the soft descriptor limit to the hard one (at most :data:`CEILING`); returns the limit now."""
    if resource is None:
        return open_file_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = CEILING if hard == resource.RLIM_INFINITY else min(hard, CEILING)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # Defensive: a container may forbid it
            log.warning("Could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return open_file_limit()


def descriptor_budget(limit: int = 0) -> Tuple[int, int]:
    """``(client connections, tunnel connections in their handshake)`` allowed under ``limit`` descriptors.

    Of what the reserve leaves: three quarters for clients, one eighth for
    pending tunnels; the last eighth, and whatever clients and pending tunnels
    leave unused, is for established tunnels.
    """
    usable = max((limit or open_file_limit()) - RESERVE, 64)
    return max(usable * 3 // 4, 16), max(usable // 8, 8)
