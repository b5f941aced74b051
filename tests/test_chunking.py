"""Chunking helpers: the cost order every chunked kernel visits its units in."""

import jax.numpy as jnp
import numpy as np
import pytest

from roipool_jax._src import chunking


@pytest.mark.parametrize("k", [0, 1, 7, 1000])
def test_sort_order_is_a_stable_argsort(k):
  cost = np.random.default_rng(k).integers(0, 5, k).astype(np.int32)  # many ties
  order = np.asarray(chunking.sort_order(jnp.asarray(cost)))
  np.testing.assert_array_equal(order, np.argsort(cost, kind="stable"))


def test_sort_order_clips_huge_costs_but_stays_a_permutation():
  cost = np.array([5, 2**30, 3, 2**31 - 1, 0], np.int32)
  order = np.asarray(chunking.sort_order(jnp.asarray(cost)))
  np.testing.assert_array_equal(np.sort(order), np.arange(5))
  np.testing.assert_array_equal(order[:3], [4, 2, 0])  # the small costs keep their order
