"""Files the server creates are its user's alone: 0600 files, 0700 directories.

Used where the server creates something on disk: the SQLite database file (created
empty just before SQLite would create it, so that SQLite gives its ``-wal``, ``-shm`` and
``-journal`` files the same mode), and the mail directory and ``.eml`` receipts of the
file mailer. The modes are set explicitly, whatever the process's umask. Files and
directories that already exist are left as the operator made them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; True if it was created.

    Its directory must exist (as SQLite requires). Raises OSError as ``open`` does.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(descriptor, FILE_MODE)  # the umask may have taken bits off
    finally:
        os.close(descriptor)
    return True


def make_private_directory(path: Path) -> None:
    """Create the directory ``path`` with mode 0700 unless it exists (missing parents
    are created as ``mkdir -p`` would). Raises OSError as ``mkdir`` does."""
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=DIRECTORY_MODE)
        os.chmod(path, DIRECTORY_MODE)  # the umask may have taken bits off


def make_private(descriptor: int) -> None:
    """Give an open file mode 0600 (before its contents are written)."""
    os.fchmod(descriptor, FILE_MODE)
