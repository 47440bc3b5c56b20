"""`grng_core.structures.rows.shared_by_batch`: which layer calls give no per-example K-FAC
rows (ALGORITHMS.md §2.1, "This project": an input the batch shares, its output broadcast)."""

from __future__ import annotations

import pytest

from grng_core.structures.rows import shared_by_batch

B, T, D = 8, 16, 32


@pytest.mark.parametrize("shape,features", [
    ((1, T), 0),  # GPT-2's / BERT's position ids
    ((1, T, D), 1),  # a Linear on a (1, T, d) tensor broadcast afterwards
    ((1, 3, 3, 9), 1),  # convolution patches of one image
])
def test_shared_inputs_are_recognised(shape, features):
    why = shared_by_batch(shape, B, features=features)
    assert why is not None and f"shape {shape}" in why and f"batch of {B} examples" in why


def test_one_row_of_features_is_one_examples():
    """A (1, d) input to a dense layer: a mixture of experts' token routed alone to its expert
    (or one selected example) as likely as a learned query shared by the batch; taken as one
    example's row, so a routed expert keeps refreshing (a shared (1, d) query then has its
    examples' output gradients summed in its one row: its S factor, not its gradient, is
    off). Position-indexed inputs (1, T, d) and ids (1, T) are still shared."""
    assert shared_by_batch((1, D), B) is None
    assert shared_by_batch((1, T, D), B) is not None


@pytest.mark.parametrize("shape", [
    (B, T),  # token ids
    (B * T,),  # flattened token ids
    (B, T, D),
    (B * T, D),  # flattened positions
    (T, B, D),  # sequence first
    (B, D),
    (T, 1),  # sequence-first position ids: not told from a batch of one (README)
    (4,), (D,),  # one example's vector (a model that loops over its examples)
])
def test_per_example_or_unrecognisable_inputs_are_not(shape):
    assert shared_by_batch(shape, B) is None


@pytest.mark.parametrize("examples", [None, 0, 1])
def test_a_call_of_one_example_or_an_unknown_batch_shares_nothing(examples):
    assert shared_by_batch((1, T), examples) is None


@pytest.mark.parametrize("shape,features,shared", [
    ((T, 1), 0, True),  # sequence-first position ids
    ((T, 1, D), 1, True),  # their embedding output through a Linear
    ((T, B, D), 1, False),
    ((B, 1), 1, False),  # a Linear of one input feature: axis 1 is its features
    ((B, D), 1, False),  # a head after pooling over the sequence
    ((B, 1), 0, False),  # per-example conditioning ids, batch-first inside the model
])
def test_a_sequence_first_batch_axis(shape, features, shared):
    assert (shared_by_batch(shape, B, axis=1, features=features) is not None) == shared


@pytest.mark.parametrize("shape,features,shared", [
    ((T,), 0, True),  # nanoGPT's position ids arange(T) for token ids (B, T)
    ((T, D), 1, False),  # dense: also a sequence-first (B, d) head read with axis 0
    ((B, T), 0, False),  # the token ids themselves
    ((B * T,), 0, False),  # flattened token ids
    ((B, T, D), 1, False),
    ((B, D), 1, False),  # a head after pooling
    ((D,), 1, False),  # one vector (no axis before the features): a per-example loop's
])
def test_an_input_of_one_examples_shape(shape, features, shared):
    """The model call's inputs are (B, T): an input shaped like one example is shared."""
    got = shared_by_batch(shape, B, features=features, example_shapes=((T,),))
    assert (got is not None) == shared


def test_one_examples_shape_equal_to_the_batch_size_is_not_recognised():
    """T = B: arange(T) cannot be told from a batch of B ids; an MLP's input (B, D) with
    D = B is one example's shape only by coincidence: neither is taken for shared."""
    assert shared_by_batch((B,), B, features=0, example_shapes=((B,),)) is None
    assert shared_by_batch((B, B), B, features=1, example_shapes=((B,),)) is None


def test_ids_as_long_as_the_batch_are_ambiguous():
    from grng_core.structures.rows import ambiguous_ids

    assert ambiguous_ids((B,), B, example_shapes=((B,),))
    assert not ambiguous_ids((T,), B, example_shapes=((T,),))  # recognised as shared instead
    assert not ambiguous_ids((B,), B, example_shapes=((T,),))  # not one example's shape
    assert not ambiguous_ids((1,), 1, example_shapes=((1,),))  # one example: nothing shared


@pytest.mark.parametrize("shape,examples_shapes,shared", [
    ((T, T), ((T,),), True),  # T5's relative-position buckets for inputs (B, T)
    ((T, 12), ((T,), (12,)), True),  # encoder-decoder: query and key lengths of two inputs
    ((B * 4, T), ((4, T),), False),  # multiple choice: (B, C, T) flattened to (B·C, T)
    ((B, T), ((T,),), False),  # the token ids themselves
    ((T, B), ((T,),), False),  # sequence-first ids: they hold the examples
    ((T, 7), ((T,),), False),  # an axis that is no example's
    ((B, B), ((B,),), False),  # T = B: not told apart
])
def test_pairwise_position_ids(shape, examples_shapes, shared):
    """Ids of two or more axes, none of them the examples', each an axis of one example: the
    pairwise positions of T5's relative attention bias, broadcast over the batch."""
    got = shared_by_batch(shape, B, features=0, example_shapes=examples_shapes)
    assert (got is not None) == shared
