"""Processes: locks that a forked child must not inherit, and whether a process is still alive.

A lock held by another thread at the moment of fork() stays held forever in the child (the thread that
would release it does not exist there). Objects register the attributes holding their locks, and the
child gets fresh ones.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any

_owners: list[tuple[weakref.ref[Any], tuple[str, ...]]] = []  # weak: registering keeps nothing alive


def renew_locks_after_fork(owner: Any, *attributes: str) -> None:
    _owners[:] = [(ref, names) for ref, names in _owners if ref() is not None]
    _owners.append((weakref.ref(owner), attributes))


def _after_fork_in_child() -> None:
    for ref, attributes in list(_owners):
        owner = ref()
        if owner is not None:
            for attribute in attributes:
                setattr(owner, attribute, threading.Lock())


os.register_at_fork(after_in_child=_after_fork_in_child)


def process_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (an exited child nobody has waited for)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): kill(pid, 0) is all we have
    return stat.rpartition(")")[2].split()[0] != "Z"
