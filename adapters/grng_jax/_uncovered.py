"""How a covered layer type called in a configuration K-FAC does not cover is named (the
layer hooks of flax.linen, flax.nnx and equinox record it; `_collect._check_calls` reads it)."""

#: How `Collector.used_otherwise` names a call whose layer configuration K-FAC does not cover.
UNCOVERED = "an uncovered configuration: "
#: How `Collector.used_otherwise` names a registered layer called inside a nested transformation.
NESTED_USE = "a call inside "


def uncovered(layer: str, why: str) -> str:
    """`used_otherwise`'s `how` for a covered layer type called in a configuration K-FAC does
    not cover (a grouped convolution, circular padding): `_check_calls` then advises leaving
    it to the diagonal, not calling it through a covered layer."""
    return f"{UNCOVERED}{layer} with {why}"
