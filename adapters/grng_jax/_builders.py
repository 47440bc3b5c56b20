"""``grng_jax.reng`` / ``ring`` / ``rkalman``: signatures and docstrings from the config records.

Every core hyperparameter is a field of `grng_core.config.RENGConfig`, `RINGConfig` or
`RKalmanConfig`; the factories here take exactly those fields (``lr`` spelled
``learning_rate``, optax's name, so that ``optax.inject_hyperparams`` can inject it), each
defaulting to None (= the core's default), then the adapter options. ``inspect.signature`` and
``help()`` show them all.
"""

from __future__ import annotations

import inspect

import optax

from grng_core.config import CONFIGS, TITLES
from grng_jax._optax import transform

LR = "learning_rate"
OPTIONS = (("axis_name", None), ("layers", "auto"), ("refresh", "switch"),
           ("fallback", "diagonal"), ("seed", None))

SUMMARIES = {
    "reng": "RENG (d = (F + λI)⁻¹ ĝ) as an optax transformation.",
    "ring": "RING (d = (1 − ρλ)(F + λI)⁻¹ g + ρ g) as an optax transformation. RING needs no "
            "oracle:\n    loss_fn and batch only feed the curvature.",
    "rkalman": "R-Kalman (a Kalman filter over the parameters, the mean moving along P⁺ ĝ) as "
               "an optax\n    transformation.",
}

ADAPTER_DOC = """
    Adapter options (not passed to the core):
      axis_name: a pmap / shard_map axis name: gradients, oracle results and curvature
        statistics are averaged (per-example rows gathered) over it. None: one device.
      layers: which params leaves form K-FAC layers (structure "kfac"): "auto" (leaves named
        ``kernel`` with their sibling ``bias``, whose shape gives the output axes: flax.linen /
        flax.nnx Dense / Linear / DenseGeneral / LinearGeneral / Conv and grng_jax.init_dense;
        2-D leaves named ``embedding``: Embed; leaves named ``weight`` with a ``bias`` of their
        first axis's size: equinox nn.Linear / nn.Conv, output axis first), a sequence of
        grng_jax.Layer (grng_jax.find_layers(loss_fn, params, batch) lists them from a trace,
        orientation included), a callable params -> sequence, or None. Leaves outside the
        layers use the diagonal.
      fallback: the structure used instead of "kfac" when the model has no layer at all
        (``grng_core.Optimizer.resolve``): "diagonal" (default; no per-example gradients) or
        "woodbury" (the batch's exact empirical Fisher, any model; needs loss_fn and batch).
      refresh: "switch" (default) runs only the refresh branch the step needs (lax.switch over
        the (curvature, inverse) flag pairs of ``grng_core.schedule.flag_table``), "where" lets
        the core compute both branches and select in-graph (use it under vmap of the optimizer).
      seed: seeds the PRNG key kept in the state for fisher="mc".

    update(grads, state, params, *, loss_fn=None, batch=None, mc_loss_fn=None, key=None):
      loss_fn(params, batch) -> the mean loss over the batch's leading axis; batch: a pytree
        of arrays that all have the leading batch axis. Needed whenever the optimizer needs
        per-example gradients (woodbury), K-FAC statistics (kfac), or an oracle (rho != 0
        with RENG / R-Kalman). mc_loss_fn(params, batch, key): the loss with labels sampled
        from the model, for fisher="mc". key: overrides the state's key for that sampling.

    Checkpoints: grng_jax.save(path, opt, state) / grng_jax.load(path, opt, like).
    """


def signature(name: str) -> inspect.Signature:
    """The factory's signature: the record's fields (``lr`` as ``learning_rate``), each with
    default None, then the keyword-only adapter options."""
    params = [p.replace(name=LR if p.name == "lr" else p.name, default=None,
                        annotation=inspect.Parameter.empty)
              for p in inspect.signature(CONFIGS[name]).parameters.values()]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
               for n, d in OPTIONS]
    return inspect.Signature(params, return_annotation=optax.GradientTransformationExtraArgs)


def docstring(name: str) -> str:
    cls = CONFIGS[name]
    defaults, docs = cls.defaults(), cls.docs()
    rows = []
    for field in inspect.signature(cls).parameters:  # the signature's order: positional first
        doc = docs[field]
        if field == "lr":
            doc += "; an optax schedule is called with the update count, 0 first"
        if field == "kl_clip":
            doc += " (here None keeps the default: pass float('inf') to turn it off)"
        rows.append(f"      {LR if field == 'lr' else field} ({defaults[field]!r}): {doc}")
    return (f"{SUMMARIES[name]}\n\n    Hyperparameters (grng_core.config.{cls.__name__}, the "
            f"core's {TITLES[name]}); None keeps\n    the default shown:\n" + "\n".join(rows)
            + "\n" + ADAPTER_DOC)


def make(name: str):
    """The factory ``grng_jax.<name>``."""
    sig = signature(name)

    def factory(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            hint = " (the learning rate is `learning_rate`, optax's name)" if "lr" in kwargs \
                else ""
            raise TypeError(f"grng_jax.{name}: {e}{hint}; its arguments: "
                            f"{', '.join(sig.parameters)}") from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        options = {n: arguments.pop(n) for n, _ in OPTIONS}
        arguments["lr"] = arguments.pop(LR)
        try:
            return transform(name, arguments, **options)
        except ValueError as e:  # the core's records call it lr
            if str(e).startswith("invalid lr="):
                raise ValueError(f"invalid {LR}=" + str(e)[len("invalid lr="):]) from None
            raise

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = "grng_jax"
    factory.__signature__ = sig  # type: ignore[attr-defined]
    factory.__doc__ = docstring(name)
    return factory


reng = make("reng")
ring = make("ring")
rkalman = make("rkalman")
