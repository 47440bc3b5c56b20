"""Files of the portable checkpoint: atomic `.npz` writes and safe reads (never unpickles)."""

from __future__ import annotations

import os
import tempfile
import zipfile

import numpy as np


def read_archive(path) -> dict[str, np.ndarray]:
    """Every entry of the archive as NumPy arrays; any problem is a clear ValueError."""
    source = f"checkpoint {os.fspath(path)!r}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{source} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{source} is not a .npz archive (corrupted, truncated or not a GRNG "
                         "checkpoint)")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                try:
                    out[name] = z[name]
                except ValueError as e:
                    if "pickle" in str(e) or "Object arrays" in str(e):
                        raise ValueError(
                            f"{source}: entry {name!r} holds a pickled Python object; "
                            "refusing to load it (checkpoints hold numeric arrays only and "
                            "loading never unpickles)") from e
                    raise
    except ValueError as e:
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source} could not be read ({e}): corrupted checkpoint") from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError) as e:
        raise ValueError(f"{source} could not be read ({type(e).__name__}: {e}): corrupted or "
                         "truncated checkpoint") from e
    except Exception as e:  # zlib.error and other decoder failures
        raise ValueError(f"{source} could not be read ({type(e).__name__}: {e}): corrupted "
                         "checkpoint") from e
    return out


def _write_npz(fileobj, arrays: dict) -> None:
    np.savez(fileobj, **arrays)


def _file_mode(path: str) -> int:
    """The mode of the file being replaced, else 0666 minus the process umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path, arrays: dict) -> None:
    """Write the archive to a temporary file beside `path`, fsync it and move it over `path`;
    a failed write leaves the previous file as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp creates 0600; keep the usual permissions
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not available everywhere
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
