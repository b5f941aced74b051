"""cell_mean (ps_roi_pool's kernel): summation order, cost tuning, gradient, unused slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roipool_jax._src import cell_mean
from tests.quick import some

COL_STRIDE = 3
ROW_STRIDE = 40
STRIDES = (ROW_STRIDE, COL_STRIDE)


def _problem(seed=0):
  """A ``[M, 5]`` table read as 3 interleaved ``12 x 13`` maps, and rectangles on it."""
  rng = np.random.default_rng(seed)
  table = rng.standard_normal((ROW_STRIDE * 12, 5)).astype(np.float32)
  table[:, 0] *= 1e4  # large and small values: the order of the additions shows
  sizes = [(1, 1), (1, 7), (7, 1), (3, 5), (0, 4), (4, 0), (12, 13), (2, 2), (5, 3)]
  origin, height, width = [], [], []
  for h, w in sizes:
    y, x = rng.integers(0, 13 - h), rng.integers(0, 14 - w)
    origin.append(y * ROW_STRIDE + x * COL_STRIDE + rng.integers(0, COL_STRIDE))
    height.append(h)
    width.append(w)
  rects = cell_mean.Rects(*(jnp.asarray(np.array(v, np.int32)) for v in (origin, height, width)))
  return table, rects


def _cells(rects, k):
  o, h, w = (int(np.asarray(v)[k]) for v in rects)
  return [o + dy * ROW_STRIDE + dx * COL_STRIDE for dy in range(h) for dx in range(w)]


def _sequential_mean(table, rects):
  """One float32 addition per cell, row-major, then one division (torchvision's loop)."""
  out = np.zeros((rects.origin.shape[0], table.shape[1]), np.float32)
  for k in range(out.shape[0]):
    cells = _cells(rects, k)
    total = np.zeros(table.shape[1], np.float32)
    for cell in cells:
      total = total + table[cell]
    if cells:
      out[k] = total / np.float32(len(cells))
  return out


@pytest.mark.parametrize("slots,budget", some([(4, None), (1, 1), (3, 64), (5, None), (2, 1)], 2))
def test_each_bin_adds_its_cells_one_at_a_time_in_row_major_order(slots, budget, monkeypatch):
  # Bitwise: the order of the additions does not depend on the slots or the chunks.
  table, rects = _problem()
  monkeypatch.setattr(cell_mean, "SLOTS", slots)
  if budget is not None:
    monkeypatch.setattr(cell_mean, "_CHUNK_ELEMENTS", budget)
  got = jax.jit(cell_mean.cell_mean, static_argnums=2)(jnp.asarray(table), rects, STRIDES)
  np.testing.assert_array_equal(np.asarray(got), _sequential_mean(table, rects))


def test_gradient_spreads_each_cotangent_evenly_over_its_cells():
  table, rects = _problem(1)
  cot = np.random.default_rng(2).standard_normal((rects.origin.shape[0], 5)).astype(np.float32)
  want = np.zeros(table.shape, np.float64)
  for k in range(cot.shape[0]):
    cells = _cells(rects, k)
    for cell in cells:
      want[cell] += cot[k] / len(cells)
  _, pull = jax.vjp(lambda t: cell_mean.cell_mean(t, rects, STRIDES), jnp.asarray(table))
  np.testing.assert_allclose(pull(jnp.asarray(cot))[0], want, rtol=1e-6, atol=1e-7)


def test_unused_slots_read_nothing_even_where_the_table_is_not_finite():
  # Slots past a bin's cells point at row 0: inf and NaN there must not leak into bins
  # that do not cover it, forward or backward.
  table, rects = _problem(4)
  table[0] = [np.inf, np.nan, -np.inf, np.nan, 1.0]
  covers_row_0 = [0 in _cells(rects, k) for k in range(rects.origin.shape[0])]
  out, pull = jax.vjp(lambda t: cell_mean.cell_mean(t, rects, STRIDES), jnp.asarray(table))
  assert not any(covers_row_0) and np.all(np.isfinite(out))
  (grad,) = pull(jnp.ones_like(out))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(out), _sequential_mean(table, rects))
