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


def test_each_bin_visits_its_own_blocks_once_row_major():
  # A tall bin (4 x 1 blocks), a wide one (1 x 3), a 2 x 2 one and an empty one.
  passes_y = jnp.array([4, 1, 2, 0], jnp.int32)
  passes_x = jnp.array([1, 3, 2, 0], jnp.int32)
  passes = int(chunking.own_block_passes(passes_y, passes_x))
  assert passes == 4  # the costliest bin's blocks, not max(py) * max(px) = 12
  visits = [[] for _ in range(4)]
  for t in range(passes + 2):  # two passes past the end: nothing more is visited
    by, bx, in_use = (np.asarray(a) for a in chunking.own_block(t, passes_y, passes_x))
    for b in range(4):
      if in_use[b]:
        visits[b].append((int(by[b]), int(bx[b])))
      else:
        assert (by[b], bx[b]) == (0, 0)
  assert visits == [
    [(0, 0), (1, 0), (2, 0), (3, 0)],
    [(0, 0), (0, 1), (0, 2)],
    [(0, 0), (0, 1), (1, 0), (1, 1)],
    [],
  ]
  assert int(chunking.own_block_passes(passes_y[:0], passes_x[:0])) == 0
