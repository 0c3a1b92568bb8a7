"""Every file fitnets writes goes through here: to a temporary file beside its place, flushed, then renamed, so a
crash never leaves a half-written file, and a full disk is reported in one line with the earlier file intact.
Under torchrun only rank 0 writes."""

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.runtime import dist


class DiskFull(ConfigError):
    """A write ran out of space (or quota): reported as one line, like bad input."""


FULL = (errno.ENOSPC, errno.EDQUOT)


def out_of_space(err: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC or EDQUOT anywhere in the exception chain or, since
    torch's file writer drops the errno ("unexpected pos ..."), under 1 MiB left in `folder` after the failure."""
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in FULL:
            return True
        cause = cause.__cause__ or cause.__context__
    return isinstance(err, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 2**20


def _size(n: int) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a fresh temporary file beside `path`, flush it to disk, rename it over `path`.
    Under torchrun only rank 0 writes: every output of fitnets goes through here. A full disk raises DiskFull
    and leaves any earlier `path` as it was."""
    if not dist.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    except Exception as err:
        if not out_of_space(err, path.parent):   # checked while the partial file still fills the disk
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
    finally:
        tmp.unlink(missing_ok=True)
    # Measured once the failed writer has let go of the partial file, so its space counts as free.
    free = _size(shutil.disk_usage(path.parent).free)
    needs = f", and it needs more than {_size(written)}" if written else ""
    raise DiskFull(f"the disk is full: could not write {path} ({free} free there{needs}); free some space there "
                   "or write elsewhere; files written before are intact")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")
