"""Process limits a burst needs: one socket, so one file descriptor, per open request."""

from __future__ import annotations

import sys


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard one; return ``(soft, hard)`` after.

    An unlimited hard limit is reported as ``sys.maxsize``. Where the platform has no
    such limit (Windows), both are ``sys.maxsize``.
    """
    if sys.platform == "win32":
        return sys.maxsize, sys.maxsize
    import resource  # POSIX only: imported here so the module loads everywhere

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinity = resource.RLIM_INFINITY
    if soft != infinity:
        # macOS refuses RLIM_INFINITY as a soft limit, so an unlimited hard one gets finite tries.
        targets = (1 << 20, 65536, 10240) if hard == infinity else (hard,)
        soft = _try_soft_limits(soft, hard, [t for t in targets if t > soft])
    return _finite(soft, infinity), _finite(hard, infinity)


def _try_soft_limits(soft: int, hard: int, targets: list[int]) -> int:
    import resource

    for target in targets:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return target
    return soft


def _finite(limit: int, infinity: int) -> int:
    return sys.maxsize if limit == infinity else limit
