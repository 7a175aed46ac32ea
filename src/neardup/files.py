"""Opening the user's files safely, and telling files and folders apart by identity, not by spelling.

Every read of a catalogued file (the server, thumbnails, actions, the indexing loader) goes through
:func:`open_regular`: a path that is now a FIFO, a device or a folder is refused without blocking (a FIFO
opened for reading would wait for a writer forever), a symlink swapped in after indexing is refused unless
the caller follows symlinks on purpose, and the checks run on the open descriptor (``fstat``), so the file
checked is the file read. :func:`check_record` then compares the open file with what the catalog recorded.

A path is not an identity: two spellings (a symlinked folder, a bind mount, ``..``) can name one file, and
one spelling can name another file after a swap. :func:`same_file`, :func:`real_folder` and :func:`is_within`
compare what paths point at.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from collections.abc import Iterable
from typing import BinaryIO

from .errors import NeardupError

class FileCheckError(NeardupError):
    """The file at a path is not the one expected (gone, swapped, changed, not a regular file)."""


def open_regular(path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> BinaryIO:
    """Open a regular file for reading without blocking on FIFOs and (by default) without following a
    symlink in the last path component; the type check is made on the open descriptor.

    Raises:
        FileCheckError: with a one-line reason (missing, a symlink, not a regular file, unreadable).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileCheckError("file not found") from None
    except PermissionError:
        raise FileCheckError("permission denied") from None
    except IsADirectoryError:
        raise FileCheckError("is a folder, not a file") from None
    except OSError as error:
        if not follow_symlinks and error.errno == getattr(os, "ELOOP", 40) and os.path.islink(path):
            raise FileCheckError("is now a symbolic link") from None
        raise FileCheckError(f"cannot read file: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            if stat.S_ISDIR(info.st_mode):
                raise FileCheckError("is a folder, not a file")
            if stat.S_ISFIFO(info.st_mode):
                raise FileCheckError("is a named pipe (FIFO), not a file")
            raise FileCheckError("is not a regular file")
        # Blocking reads again: a regular file never blocks, and buffered reads expect blocking semantics.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_record(stream: BinaryIO, *, size: int | None = None, mtime_ns: int | None = None) -> os.stat_result:
    """Compare an open file with the catalog's size and modification time.

    Raises:
        FileCheckError: "changed since it was indexed" when either differs.
    """
    info = os.fstat(stream.fileno())
    if size is not None and info.st_size != size:
        raise FileCheckError(f"changed since it was indexed (size {info.st_size}, was {size})")
    if mtime_ns is not None and info.st_mtime_ns != mtime_ns:
        raise FileCheckError("changed since it was indexed (modification time differs)")
    return info


def read_checked(path: str | os.PathLike[str], *, size: int | None = None, mtime_ns: int | None = None,
                 sha256: str | None = None, follow_symlinks: bool = False) -> bytes:
    """The whole content of a regular file, checked against the catalog's size, mtime and sha256.

    Raises:
        FileCheckError: one-line reason when the file is not the one catalogued.
    """
    with open_regular(path, follow_symlinks=follow_symlinks) as stream:
        check_record(stream, size=size, mtime_ns=mtime_ns)
        return read_verified(stream, size=size, sha256=sha256)


def read_verified(stream: BinaryIO, *, size: int | None = None, sha256: str | None = None) -> bytes:
    """The rest of an open file's content, checked against the catalog's size and sha256 once read.

    Raises:
        FileCheckError: one-line reason when the bytes read are not the ones catalogued.
    """
    try:
        data = stream.read()
    except OSError as error:
        raise FileCheckError(f"cannot read file: {error.strerror or error}") from None
    if size is not None and len(data) != size:
        raise FileCheckError(f"changed while being read ({len(data)} bytes, expected {size})")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FileCheckError("changed since it was indexed (content differs)")
    return data


def sha256_of(stream: BinaryIO) -> str:
    """sha256 (hex) of an open binary file's content from its current position."""
    return hashlib.file_digest(stream, "sha256").hexdigest()


def identity(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what ``path`` names, or None when it cannot be stat'ed."""
    try:
        info = os.stat(path, follow_symlinks=follow_symlinks)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when both paths reach the same file (same device and inode), whatever their spelling."""
    first = identity(a)
    return first is not None and first == identity(b)


def real_folder(path: str | os.PathLike[str]) -> str:
    """The canonical spelling of a folder: absolute, symlinks and ``..`` resolved."""
    return os.path.realpath(os.path.abspath(path))


def is_within(path: str | os.PathLike[str], folders: Iterable[str]) -> bool:
    """True when ``path`` lies in one of ``folders`` (given as :func:`real_folder` spellings), comparing
    real locations: the file's parent folder is resolved, the file itself is not (a symlinked file inside
    a protected folder is in that folder)."""
    parent = real_folder(os.path.dirname(os.path.abspath(path)))
    for folder in folders:
        if parent == folder or parent.startswith(folder.rstrip(os.sep) + os.sep):
            return True
    return False
