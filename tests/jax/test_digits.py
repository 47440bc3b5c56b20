"""On scikit-learn's digits, an MLP trained with each optimizer reaches >= 95% test accuracy
within 20 epochs (grng_jax.examples: a jitted lax.scan epoch, float32, minibatches of 64)."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from grng_jax import examples

from tests import cases

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("algorithm", cases.OPTIMIZERS)
def test_jax_numpy_mlp_reaches_95_percent(algorithm):
    acc, epochs = examples.mlp_digits(algorithm, epochs=20, until=0.95)
    assert acc >= 0.95, f"{algorithm}: {acc:.3f} after {epochs} epochs"
    assert epochs <= 20


def test_flax_mlp_reaches_95_percent():
    pytest.importorskip("flax")
    acc, epochs = examples.flax_digits("ring", epochs=20, until=0.95)
    assert acc >= 0.95, f"flax ring: {acc:.3f} after {epochs} epochs"
