"""File modes for files written atomically through a temporary name.

``tempfile.mkstemp`` creates files ``0600`` and ``mkdtemp`` folders ``0700`` whatever the umask, which
leaves checkpoints and generated data unreadable by the rest of a shared cluster group. Files written
that way are given the mode an ordinary ``open()`` or ``mkdir()`` would have given them.
"""

from __future__ import annotations

import os
import threading

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where ``/proc`` allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:  # elsewhere the only way to read it is to set it and put it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def ordinary_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask (0o644 at umask 022)."""
    return 0o666 & ~current_umask()


def ordinary_dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0o777 less the umask (0o755 at umask 022)."""
    return 0o777 & ~current_umask()
