"""What JAX gives the core: per-example gradients, K-FAC layer statistics, oracles, collectives.

Everything here is autodiff plumbing (vmap, grad, jvp, the perturbation pass) and reshaping;
the curvature math is in grng_core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

import grng_core as gc
from grng_jax._layers import (
    LayerRef,
    batch_size,
    describe,
    example_shapes,
    leaf_paths,
    lifted_modules,
    shared_reason,
)
from grng_jax._shared_ids import shared_ids
from grng_jax._tags import Collector, collecting
from grng_jax._uncovered import NESTED_USE, UNCOVERED


def per_example_grads(loss_fn: Callable, treedef, leaves: list, batch, key=None) -> list:
    """Leaf (B, *shape) = grad of l_i: ``vmap`` over examples of ``grad`` of the loss on a
    one-example batch. `key` (for a sampled loss ``loss_fn(params, batch, key)``) is folded with
    the example's index so that every example draws its own sample."""

    def one(example, i):
        ex = jax.tree_util.tree_map(lambda x: x[None], example)

        def f(lv):
            p = jax.tree_util.tree_unflatten(treedef, lv)
            return loss_fn(p, ex) if key is None else loss_fn(p, ex, jax.random.fold_in(key, i))

        return jax.grad(f)(leaves)

    n = batch_size(batch)
    return jax.vmap(one)(batch, jnp.arange(n))


def _at_least_f32(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def layer_stats(loss_fn: Callable, treedef, leaves: list, batch,
                specs: Sequence[LayerRef], params_for_names=None,
                key=None) -> list[gc.LayerStats]:
    """K-FAC statistics of the layers `specs` ((weight, bias) leaf indices) by the perturbation
    trick (see grng_jax._tags): one abstract trace finds the tagged calls and their output
    shapes, then one forward and backward pass with a zero perturbation on every output
    returns each layer's inputs a and output gradients dL/dz; rows s = B * dL/dz.

    A kernel called several times (shared weights, positions unrolled by hand) gets the rows of
    every call. Raises ValueError when a layer of `specs` is not called through a tagged layer.
    """
    specs = [r if isinstance(r, LayerRef) else LayerRef(*r) for r in specs]
    examples = batch_size(batch)  # a batch of mixed leading sizes: named before the trace

    def loss_of(lv, perturbs, b=batch):
        p = jax.tree_util.tree_unflatten(treedef, lv)
        col = Collector(lv, perturbs)
        with collecting(col):
            out = loss_fn(p, b) if key is None else loss_fn(p, b, key)
        return out, col

    found, other, nested = _discover(loss_of, leaves, batch)
    names = params_for_names if params_for_names is not None else \
        jax.tree_util.tree_unflatten(treedef, leaves)
    shapes = example_shapes(batch)
    shared = shared_ids(found, batch, examples, shapes,
                        lambda b: _discover(loss_of, leaves, b, True)[0],
                        lambda w: describe(names, w))
    _check_calls(found, other, specs, names, leaves, nested, examples, shapes, shared)

    perturbs = [jnp.zeros(c.out_shape, c.out_dtype) for c in found]

    def f(perturbs):
        out, col = loss_of(leaves, perturbs)
        return out, [c.inputs for c in col.calls]

    dz, inputs = jax.grad(f, has_aux=True)(perturbs)
    n = batch_size(batch)
    out = []
    for ref in specs:
        w, b = ref.weight, ref.bias
        idx = [k for k, c in enumerate(found) if c.weight == w]
        shape = leaves[w].shape
        d_out = math.prod(ref.out_shape(shape))
        d_in = math.prod(shape) // d_out
        a_shape = (-1,) if ref.embed else (-1, d_in)  # an embedding's rows: token ids
        a = [jnp.reshape(inputs[k], a_shape) for k in idx]
        s = [jnp.reshape(_at_least_f32(dz[k]) * n, (-1, d_out)) for k in idx]
        rows_a = a[0] if len(a) == 1 else jnp.concatenate(a, axis=0)
        rows_s = s[0] if len(s) == 1 else jnp.concatenate(s, axis=0)
        out.append(gc.LayerStats(weight=w, bias=b, inputs=rows_a, output_grads=rows_s,
                                 transposed=ref.transposed, batch_size=n))
    return out


_FIX = ("call it through grng_jax.dense(x, kernel, bias) or a covered layer (flax.linen Dense / "
        "DenseGeneral / Conv / Embed, flax.nnx Linear / LinearGeneral / Conv / Embed, equinox "
        "nn.Linear / nn.Conv) on the params leaves themselves (not arrays computed from them: "
        "a cast, jax.lax.stop_gradient — keep frozen leaves out of params, eqx.partition / "
        "optax.masked), outside nn.scan / nn.vmap / nn.remat / "
        "lax.scan / jax.checkpoint and outside a jax.jit inside loss_fn (jit the whole train "
        "step instead; jax.vmap is fine), or leave it out with layers=[...] "
        "(layers=grng_jax.find_layers(loss_fn, params, batch) lists the layers that qualify; "
        "layers=None: every leaf diagonal), or "
        "use structure='diagonal' or 'woodbury'")


def _discover(loss_of: Callable, leaves: list, batch,
              abstract: bool = False) -> tuple[list, dict, dict]:
    """An abstract trace of the loss on `batch` (concrete or abstract): its tagged calls, the
    registered leaves used otherwise, and the covered layers inside nested transformations."""
    found: list = []
    other: dict = {}
    nested: dict = {}

    def discover(lv, b):
        out, col = loss_of(lv, None, b)
        found.extend(col.calls)
        other.update(col.other_uses)
        nested.update(col.nested)
        return out

    if abstract:  # ShapeDtypeStruct leaves: traced as arguments
        jax.eval_shape(discover, leaves, batch)
    else:  # the batch as given (leaves that are not arrays stay as they are)
        jax.eval_shape(lambda lv: discover(lv, batch), leaves)
    return found, other, nested


def _nested_note(lifted: dict[str, list[str]]) -> str:
    """`lifted`: `lifted_modules`' names of the layers called inside each transformation."""
    if not lifted:
        return ""
    parts = [f"{how} ({', '.join(sorted(set(layers))[:4])})" for how, layers in lifted.items()]
    return (" (the loss calls covered layers inside " + "; ".join(parts) + ": there the "
            "layer's parameters are lifted into the transformation and its statistics cannot "
            "be collected)")


def _refuse_other_use(name: str, how: str) -> None:
    """A registered layer also used outside its tagged calls: refused, with the fix for `how`
    (an uncovered configuration, a tied use such as Embed.attend, a nested transformation)."""
    if how.startswith(UNCOVERED):
        raise ValueError(f"K-FAC layer {name!r} is called as {how[len(UNCOVERED):]}, "
                         "a configuration whose K-FAC statistics this adapter does not "
                         "collect: leave it to the diagonal with layers=grng_jax."
                         "find_layers(loss_fn, params, batch), which skips such layers, "
                         "or a layers=[...] without it (or use structure='diagonal')")
    if not how.startswith(NESTED_USE):  # Embed.attend: tied weights
        raise ValueError(f"K-FAC layer {name!r} is also used by {how} (a tied weight), "
                         "which its K-FAC statistics cannot see: leave it to the diagonal "
                         "with layers=grng_jax.find_layers(loss_fn, params, batch), which "
                         "does so, or a layers=[...] without it")
    raise ValueError(f"K-FAC layer {name!r} is also used by {how}, which the K-FAC "
                     f"statistics cannot see: {_FIX}")


def _check_calls(found: list, other: dict, specs, names, leaves, nested=None,
                 examples: int | None = None, shapes: tuple = (),
                 shared: set | frozenset = frozenset()) -> None:
    """Every layer of `specs` is called through a tagged layer of its kind, with its declared
    bias and input axes, on inputs with an example axis (`shared_reason`), and used nowhere
    else (a tied or uncovered use would be missed)."""
    for ref in specs:
        w, b = ref.weight, ref.bias
        mine = [c for c in found if c.weight == w]
        name = describe(names, w)
        if w in other:
            _refuse_other_use(name, other[w])
        if not mine:
            used = {i for c in found for i in (c.weight, c.bias) if i is not None}
            lifted = lifted_modules(nested or {}, leaves, leaf_paths(names), used)
            raise ValueError(f"K-FAC layer {name!r} was not called through a tagged layer in "
                             f"loss_fn{_nested_note(lifted)}, so its inputs and output "
                             f"gradients cannot be collected: {_FIX}")
        k_in = ref.resolved_in_axes(leaves[w].ndim)
        why_shared = next((why for c in mine
                           if (why := shared_reason(c, examples, shapes, shared))), None)
        if why_shared:
            raise ValueError(f"K-FAC layer {name!r} is {why_shared}: leave it to the diagonal with "
                             "layers=grng_jax.find_layers(loss_fn, params, batch), which skips "
                             "such layers, or a layers=[...] without it")
        for c in mine:
            if c.transposed != ref.transposed:
                how = "in the Flax layout (input axes first)" if ref.transposed else \
                    "output axis first (transposed=False)"
                raise ValueError(
                    f"K-FAC layer {name!r} is registered {how} "
                    f"but the model's {c.kind} layer stores it the other way: pass "
                    "layers=grng_jax.find_layers(loss_fn, params, batch), or "
                    f"grng_jax.Layer(..., transposed={c.transposed})")
            if (c.kind == "embed") != ref.embed or c.in_axes != k_in:
                raise ValueError(
                    f"K-FAC layer {name!r} is registered as "
                    f"{'an embedding' if ref.embed else f'a kernel with {k_in} input axes'} "
                    f"but the model calls it as {'an embedding' if c.kind == 'embed' else ''}"
                    f"{'' if c.kind == 'embed' else f'a {c.kind} with {c.in_axes} input axes'}:"
                    " pass layers=grng_jax.find_layers(loss_fn, params, batch)")
        for c in mine:
            if c.foreign_bias and b is not None:
                raise ValueError(
                    f"K-FAC layer {describe(names, w)!r} is declared with bias "
                    f"{describe(names, b)!r} but the model adds a bias that is not that leaf "
                    "(computed from it, or one this optimizer does not update): register the "
                    "layer without it (grng_jax.Layer(kernel_path, bias=None)), or pass "
                    "layers=grng_jax.find_layers(loss_fn, params, batch)")
            if c.bias != b:
                got = "no bias" if c.bias is None else f"bias {describe(names, c.bias)!r}"
                want = "no bias" if b is None else f"bias {describe(names, b)!r}"
                raise ValueError(f"K-FAC layer {describe(names, w)!r} is declared with {want} "
                                 f"but the model calls it with {got}")


def pmean(tree, axis_name):
    if axis_name is None:
        return tree
    return jax.tree_util.tree_map(lambda x: lax.pmean(x, axis_name), tree)


def collective(axis_name) -> gc.Collective | None:
    """Replica mean and tiled gather over `axis_name` (pmap / shard_map), or None."""
    if axis_name is None:
        return None
    return gc.Collective(mean=lambda x: lax.pmean(x, axis_name),
                         gather=lambda x: lax.all_gather(x, axis_name, tiled=True),
                         replicas=lax.psum(1, axis_name))  # the axis size, a Python int


def oracle(loss_fn: Callable, treedef, batch, axis_name, need_grad: bool,
           need_hvp: bool) -> gc.Oracle:
    """grad_fn(leaves) and hvp_fn(leaves, v) of the batch loss (lists like the params leaves),
    replica-averaged under `axis_name`: the gradient by ``grad``, H v by ``jvp`` of ``grad``."""

    def grad_leaves(lv):
        p = jax.tree_util.tree_unflatten(treedef, lv)
        return jax.tree_util.tree_leaves(jax.grad(loss_fn)(p, batch))

    def grad_fn(lv):
        return pmean(grad_leaves(list(lv)), axis_name)

    def hvp_fn(lv, v):
        lv, v = list(lv), [jnp.asarray(x).astype(p.dtype) for x, p in zip(v, lv)]
        _, hv = jax.jvp(grad_leaves, (lv,), (v,))
        return pmean(hv, axis_name)

    # the update's gradient may come through other optax transformations (clipping, scaling)
    # or other dropout masks than `loss_fn`'s: differences are taken against its own gradient
    return gc.Oracle(grad_fn=grad_fn if need_grad else None,
                     hvp_fn=hvp_fn if need_hvp else None, own_base=True)
