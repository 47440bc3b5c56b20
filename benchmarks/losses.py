"""The training loss of the tasks: mean cross-entropy, for torch models and for the JAX twin."""

from __future__ import annotations


def task_loss(task):
    """Mean cross-entropy; targets of a sequence task are flattened like the logits."""
    import torch.nn.functional as F

    if task.seq_len:
        return lambda out, y: F.cross_entropy(out, y.reshape(-1))
    return F.cross_entropy


def jax_xent(logits, y):
    """Mean cross-entropy of JAX logits (B, C) against integer targets (B,)."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
