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


@pytest.mark.parametrize("slots", [1, 3, 4])
@pytest.mark.parametrize("split", [False, True])
def test_walk_grid_visits_each_point_of_each_bin_once_row_major(slots, split):
  # A tall bin (5 x 1), a wide one (1 x 7), a 3 x 3 one and two empty ones. With `split`,
  # pass 0 is grid_pass's and the walk starts at pass 1: together they visit the same.
  height = jnp.array([5, 1, 3, 0, 4], jnp.int32)
  width = jnp.array([1, 7, 3, 2, 0], jnp.int32)
  passes = []

  def visit(visits, a, b, used):
    passes.append(None)  # traced once per slot of the loop body
    return visits.at[jnp.arange(5), jnp.where(used, a * 8 + b, 63)].add(used.astype(jnp.int32))

  visits = jnp.zeros((5, 64), jnp.int32)
  if split:
    zero = jnp.zeros_like(height)
    visits = chunking.grid_pass(0, height * width, width, slots, visit, visits, zero, zero)[0]
  visits = chunking.walk_grid(height, width, slots, visit, visits, start=int(split))
  assert len(passes) == (2 if split else 1) * slots
  for k in range(5):
    want = np.zeros(64, np.int32)
    for a in range(int(height[k])):
      want[a * 8 : a * 8 + int(width[k])] = 1
    np.testing.assert_array_equal(np.asarray(visits[k]), want)
  # The bins cost their own points rounded up once: 9 points, not max(h) * max(w) = 35.
  np.testing.assert_array_equal(
    chunking.grid_passes(height * width, slots), -(-np.array([5, 7, 9, 0, 0]) // slots)
  )


def test_walk_grid_visits_in_row_major_order():
  # A 2 x 3 bin, 4 slots a pass: two passes; the slots past its 6 points are unused.
  def record(state, a, b, used):
    step, seen = state
    return step + 1, seen.at[step].set(jnp.where(used[0], a[0] * 10 + b[0], -1))

  height, width = jnp.array([2], jnp.int32), jnp.array([3], jnp.int32)
  _, seen = chunking.walk_grid(height, width, 4, record, (0, jnp.zeros(8, jnp.int32)))
  np.testing.assert_array_equal(np.asarray(seen), [0, 1, 2, 10, 11, 12, -1, -1])
  # Started at pass 1, the walk resumes at the bin's fifth point, (1, 1).
  _, seen = chunking.walk_grid(height, width, 4, record, (4, jnp.zeros(8, jnp.int32)), start=1)
  np.testing.assert_array_equal(np.asarray(seen), [0, 0, 0, 0, 11, 12, -1, -1])


@pytest.mark.parametrize("k", [1, 5, 13])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunks_see_each_box_with_its_own_row_widened(k, dtype):
  # Chunks of 4 (the last one padded), boxes visited in cost order: every box must get
  # its own row of `rows`, widened to float32, and the padding boxes zero rows.
  rng = np.random.default_rng(k)
  cost = jnp.asarray(rng.integers(0, 3, k), jnp.int32)
  ids = jnp.arange(k, dtype=jnp.int32)
  rows = jnp.asarray(rng.integers(1, 9, (k, 3)), dtype)  # never zero

  def per_chunk(data):
    box, row = data
    assert row.dtype == jnp.float32
    return box, row

  box, row = chunking.map_chunks(per_chunk, ids, cost, 4, rows)
  np.testing.assert_array_equal(np.asarray(box), np.arange(k))
  np.testing.assert_array_equal(np.asarray(row), np.asarray(rows, np.float32))

  def fold(carry, data):
    total, padding = carry
    box, row = data
    real = row[:, 0] > 0  # padding boxes (box id 0) see zero rows
    total = total.at[box].add(jnp.where(real[:, None], row, 0.0))
    return total, padding + jnp.sum(~real)

  total, padding = chunking.fold_chunks(fold, (jnp.zeros((k, 3)), 0), ids, cost, 4, rows)
  np.testing.assert_array_equal(np.asarray(total), np.asarray(rows, np.float32))
  assert int(padding) == -(-k // 4) * 4 - k


@pytest.mark.parametrize("k", [0, 1, 6, 13])
@pytest.mark.parametrize("done", [0, 1, 2])
def test_refine_chunks_updates_only_the_chunks_of_costly_boxes(k, done):
  # Each box's row holds its id; `fn` adds 100 and records that it saw the box. Boxes
  # costing more than `done` must all be updated with their own row; chunks holding
  # only cheaper boxes must never be visited.
  rng = np.random.default_rng([k, done])
  cost = rng.integers(0, 4, k).astype(np.int32)
  ids = jnp.arange(k, dtype=jnp.int32)
  out = jnp.arange(k, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))
  calls = []

  def fn(box, rows):
    calls.append(box.shape)  # traced once per loop body
    return rows + 100.0

  got = np.asarray(chunking.refine_chunks(fn, out, ids, jnp.asarray(cost), 4, done))
  order = np.argsort(cost, kind="stable")
  first_chunk = int(np.sum(cost <= done)) // 4
  visited = order[first_chunk * 4 :]  # whole chunks from the first holding a costly box
  want = np.asarray(out).copy()
  want[visited] += 100.0
  np.testing.assert_array_equal(got, want)
  assert np.all(got[cost > done] >= 100.0)
  assert calls == ([(4,)] if k else [])


@pytest.mark.parametrize("k", [0, 1, 6, 13])
@pytest.mark.parametrize("done", [None, 0, 1, 2])
def test_fold_chunks_with_done_skips_the_chunks_of_cheap_boxes(k, done):
  # Each visit adds the box's id + 1 to its slot; with `done`, the chunks holding only
  # boxes costing at most `done` (sorted first) are never folded.
  rng = np.random.default_rng([k, 3 if done is None else done])
  cost = rng.integers(0, 4, k).astype(np.int32)
  ids = jnp.arange(k, dtype=jnp.int32)

  def fold(total, box):
    return total.at[box].add(box + 1)  # padding boxes (id 0) add 1 to box 0's slot

  got = np.asarray(chunking.fold_chunks(fold, jnp.zeros(k + 1, jnp.int32), ids, cost, 4, done=done))
  order = np.argsort(cost, kind="stable")
  first_chunk = 0 if done is None else int(np.sum(cost <= done)) // 4
  want = np.zeros(k + 1, np.int32)
  for chunk in range(first_chunk, -(-k // 4)):
    boxes = order[chunk * 4 : chunk * 4 + 4]
    want[boxes] += boxes + 1
    want[0] += 4 - len(boxes)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k", [1, 6, 13, 40])
@pytest.mark.parametrize("done", [0, 1, 3])
def test_fold_in_two_chunk_sizes_visits_every_box_once_in_sorted_order(k, done):
  # Boxes costing at most `done` go in chunks of 8, the rest in chunks of 3: each box must
  # be folded exactly once, with its own row, and all of them in the (stable) cost order;
  # the boxes a chunk does not own look like padding (id 0, zero row).
  rng = np.random.default_rng([k, done])
  cost = rng.integers(0, 4, k).astype(np.int32)
  ids = jnp.arange(k, dtype=jnp.int32)
  rows = jnp.arange(1, k + 1, dtype=jnp.float32)[:, None]  # box b's row holds b + 1
  shapes = []

  def fold(carry, data):
    seen, count, wrong_rows = carry
    box, row = data
    shapes.append(box.shape)  # traced once per loop body
    real = row[:, 0] > 0
    place = jnp.where(real, count + jnp.cumsum(real) - 1, k)
    seen = seen.at[place].set(box, mode="drop")
    wrong_rows += jnp.sum(real & (row[:, 0] != box + 1))
    return seen, count + jnp.sum(real), wrong_rows

  zero = jnp.zeros((), jnp.int32)
  seen, count, wrong_rows = chunking.fold_chunks(
    fold, (jnp.full(k, -1, jnp.int32), zero, zero), ids, jnp.asarray(cost), 3, rows, done, 8
  )
  np.testing.assert_array_equal(np.asarray(seen), np.argsort(cost, kind="stable"))
  assert int(count) == k and int(wrong_rows) == 0
  assert set(shapes) == {(8,), (3,)}


@pytest.mark.parametrize("k", [1, 6, 13, 40])
@pytest.mark.parametrize("done", [0, 1, 3])
def test_fold_in_two_chunk_sizes_gives_the_cheap_chunks_to_cheap_fn(k, done):
  # Each fold marks the real boxes of its chunk: 1 from cheap_fn, 2 from fn. Every box
  # costing at most `done` must be marked by cheap_fn, every other one by fn.
  rng = np.random.default_rng([k, done, 1])
  cost = rng.integers(0, 4, k).astype(np.int32)
  ids = jnp.arange(k, dtype=jnp.int32)
  rows = jnp.ones((k, 1), jnp.float32)  # padding boxes get a zero row

  def mark(value):
    def fold(marks, data):
      box, row = data
      return marks.at[jnp.where(row[:, 0] > 0, box, k)].set(value, mode="drop")

    return fold

  marks = chunking.fold_chunks(
    mark(2), jnp.zeros(k, jnp.int32), ids, jnp.asarray(cost), 3, rows, done, 8, mark(1)
  )
  np.testing.assert_array_equal(np.asarray(marks), np.where(cost <= done, 1, 2))


def test_fold_chunks_rejects_cheap_fn_without_cheap_chunk():
  with pytest.raises(ValueError, match="cheap_fn"):
    chunking.fold_chunks(
      lambda c, _: c, 0, jnp.zeros(3), jnp.zeros(3, jnp.int32), 2, None, 1, None, lambda c, _: c
    )


def test_only_chunks_of_many_boxes_are_split_for_costly_boxes():
  assert chunking.costly_chunk(chunking.COSTLY_MIN_CHUNK - 1, 4) == chunking.COSTLY_MIN_CHUNK - 1
  assert chunking.costly_chunk(chunking.COSTLY_MIN_CHUNK, 4) == chunking.COSTLY_MIN_CHUNK // 4
  assert chunking.costly_chunk(chunking.COSTLY_MIN_CHUNK, 10**6) == 1
