"""A small atomic .npz checkpoint writer, used when grng_core.checkpoint is not available
(and to write the reference results of the crash-and-resume tests).

save_state(path, tree): the nested dict/list/tuple of arrays goes to a temporary file in the
target's directory, which is flushed and fsync'ed, then renamed over the target with
os.replace (atomic on POSIX and Windows): a reader, or a run resumed after a crash, sees the
previous complete file or the new complete file, never a torn one.
load_state(path, like): the tree rebuilt with the structure of `like`, as NumPy arrays.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np


def _flatten(tree, prefix, out):
    if isinstance(tree, dict):
        for k in sorted(tree, key=str):
            _flatten(tree[k], f"{prefix}{k}|", out)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _flatten(v, f"{prefix}{i}|", out)
    else:
        from grng_core.reference import to_numpy

        out[prefix.rstrip("|") or "root"] = np.asarray(to_numpy(tree))
    return out


def _rebuild(like, prefix, arrays):
    if isinstance(like, dict):
        return {k: _rebuild(v, f"{prefix}{k}|", arrays) for k, v in like.items()}
    if isinstance(like, (list, tuple)):
        return type(like)(_rebuild(v, f"{prefix}{i}|", arrays) for i, v in enumerate(like))
    return arrays[prefix.rstrip("|") or "root"]


def save_state(path, tree) -> None:
    from grng_core.codec import to_portable

    arrays = _flatten(to_portable(tree), "", {})
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_state(path, like):
    from grng_core.codec import from_portable, to_portable

    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return from_portable(_rebuild(to_portable(like), "", arrays), like)
