"""A failed write of the output (a full disk, a quota, an I/O error) as one message that names the file, the cause
and what to do, instead of a traceback ending in ``os.pwrite``."""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path


class OutputWriteError(Exception):
    """Writing the output failed while the run was going (a full disk, a quota, an I/O error); the message names
    the file, the cause and what to do."""


def _free_space(path: Path) -> str | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return None


@contextmanager
def writing(path: str | Path):
    """An ``OSError`` inside (writing ``path``, or the file the error names) becomes an :class:`OutputWriteError`."""
    try:
        yield
    except OSError as e:
        where = Path(e.filename or path)
        msg = f"cannot write {where}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_space(where)
            msg += (f" ({free} free there now)" if free else "") + ("; free some space there, or choose an output "
                                                                     "on another file system, and run again")
        raise OutputWriteError(msg) from e
