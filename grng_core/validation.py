"""Input checks of `Optimizer.init` / `update`: clear errors before anything is computed."""

from __future__ import annotations

from grng_core.state import OptState

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _real_floats(xp) -> tuple:
    """The namespace's real floating dtypes (those of `_FLOAT_NAMES` it has)."""
    return tuple(getattr(xp, n) for n in _FLOAT_NAMES if hasattr(xp, n))


def _is_real_float(dtype, floats) -> bool:
    return dtype in floats or str(dtype).endswith("bfloat16")


def check_params(container, leaves, xp) -> None:
    floats = _real_floats(xp)
    for k, x in zip(container.keys, leaves):
        if not _is_real_float(x.dtype, floats):
            raise TypeError(f"params leaf {k!r} has dtype {x.dtype}: GRNG needs real "
                            "floating-point parameters (float16, bfloat16, float32, float64)")


def check_shapes(container, params, grads, pe, xp=None) -> None:
    for k, p, g in zip(container.keys, params, grads):
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"grads leaf {k!r} has shape {tuple(g.shape)}, the parameter has "
                             f"{tuple(p.shape)}")
        if xp is not None and not xp.isdtype(g.dtype, "real floating"):
            raise ValueError(f"grads leaf {k!r} has dtype {g.dtype}: gradients are real "
                             f"floating point (the parameter's is {p.dtype})")
    if pe is not None:
        B = pe[0].shape[0] if pe[0].ndim else 0
        for k, p, j in zip(container.keys, params, pe):
            if tuple(j.shape) != (B, *p.shape):
                raise ValueError(f"stats.per_example_grads leaf {k!r} has shape "
                                 f"{tuple(j.shape)}, expected {(B, *p.shape)}: a leading axis "
                                 f"of the batch's {B} examples (the first leaf's), then the "
                                 "parameter's shape")
        if B == 0:
            raise ValueError("stats.per_example_grads hold an empty batch (0 examples): "
                             "step on a batch with at least one example")


def check_state(state, opt, leaves) -> None:
    if not isinstance(state, OptState):
        raise TypeError("state must be the OptState returned by this optimizer's init, got "
                        f"{type(state).__name__}")
    _check_leaf_count(state, leaves)
    if state.momentum is not None:  # absent / present buffers follow momentum at the step
        for m, p in zip(state.momentum, leaves):
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"state does not match params: momentum buffer shape "
                                 f"{tuple(m.shape)} vs parameter {tuple(p.shape)}")
    if (state.curvature.kfac is not None) != (opt.config.structure == "kfac"):
        have = "kfac" if state.curvature.kfac is not None else "no kfac"
        raise ValueError(f"state does not match this optimizer: the state has {have} layers, "
                         f"the optimizer's structure is {opt.config.structure!r}")


def _check_leaf_count(state, leaves) -> None:
    """The state's per-leaf buffers (diagonal entries, K-FAC layers' leaves) fit `leaves`: a
    state built for another params tree is named here, not deep inside the step."""
    n = len(leaves)
    diag = state.curvature.diagonal
    why = None
    if diag is not None and len(diag) != n:
        why = f"the state was built for {len(diag)} parameter leaves, params has {n}"
    elif state.momentum is not None and len(state.momentum) != n:
        why = f"the state has {len(state.momentum)} momentum buffers, params has {n} leaves"
    else:
        for i, (v, p) in enumerate(zip(diag or (), leaves)):
            if v is not None and tuple(v.shape) != tuple(p.shape):
                why = f"leaf {i}: the state's diagonal has shape {tuple(v.shape)}, the " \
                      f"parameter {tuple(p.shape)}"
                break
        for layer in state.curvature.kfac or ():
            L = layer.layout
            if why is None and (L.weight >= n or _size(leaves[L.weight]) != L.d_out * L.d_in):
                why = f"K-FAC layer at leaf {L.weight} ({L.d_out} x {L.d_in}) is not in params"
    if why:
        raise ValueError(f"state does not match params: {why} (a state from another model's "
                         "init? build it with this optimizer's init(params))")


def _size(x) -> int:
    out = 1
    for d in x.shape:
        out *= int(d)
    return out
