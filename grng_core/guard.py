"""Non-finite steps leave everything untouched (issue: reliability).

`finite(arrays)` is one boolean array over the update and the state the step recomputed; the
optimizer selects the old state and zero updates with `xp.where` when it is false (jit-safe),
or — with concrete values — returns them directly and `explain` warns naming what was
non-finite, or raises (`on_nonfinite="raise"`).
"""

from __future__ import annotations

import warnings

from grng_core.concrete import concrete_bool


def finite(arrays, xp):
    """True when every array holds only finite values (a 0-d bool array)."""
    ok = None
    for x in arrays:
        f = xp.all(xp.isfinite(x))
        ok = f if ok is None else (ok & f)
    return ok


def tree_leaves(tree) -> list:
    if isinstance(tree, dict):
        return [x for k in tree for x in tree_leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in tree_leaves(v)]
    return [] if tree is None else [tree]


def changed_leaves(new, old) -> list:
    """Leaves of `new` that are not the very objects of `old` (the ones this step computed;
    the others were checked when they were made)."""
    if isinstance(new, dict):
        return [x for k in new for x in changed_leaves(new[k], old.get(k) if isinstance(old, dict)
                                                       else None)]
    if isinstance(new, (list, tuple)):
        olds = old if isinstance(old, (list, tuple)) and len(old) == len(new) else [None] * len(new)
        return [x for v, o in zip(new, olds) for x in changed_leaves(v, o)]
    return [] if new is None or new is old else [new]


def tree_map2(fn, a, b):
    """fn over matching leaves of two nested dict/list trees of arrays."""
    if isinstance(a, dict):
        return {k: tree_map2(fn, a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(tree_map2(fn, x, y) for x, y in zip(a, b))
    return fn(a, b)


def explain(groups: dict, xp, on_nonfinite: str) -> None:
    """After a failed check (concrete values): warn, or raise FloatingPointError for
    on_nonfinite="raise", naming the groups ({description: arrays}) that hold NaN or Inf."""
    bad = [name for name, arrays in groups.items()
           if arrays and not concrete_bool(finite(arrays, xp))]
    where = ", ".join(bad) if bad else "another replica's inputs"
    msg = (f"non-finite values (NaN or Inf) in {where}: "
           "the step was skipped, parameters and optimizer state are unchanged")
    if on_nonfinite == "raise":
        raise FloatingPointError(msg.replace("the step was skipped", "refusing the step"))
    warnings.warn(msg, RuntimeWarning, stacklevel=4)
