"""The tuning constants of the kernels change speed, never results.

Blocks of taps (``tap_sum.SLOTS``), cells per pass (``bin_max.SLOTS``) and
the chunk budgets are swept to values the defaults never use: odd and
minimal blocks (which once split a sample's pair of taps in ``sample_max``),
and chunks of a single box. Every op must still match the NumPy reference,
and its gradients the ones with the default constants.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import roipool_jax
from roipool_jax._src import bin_max, cell_mean, chunking, dense, sample_max, sampling, tap_sum
from roipool_jax._src import roi_align as roi_align_lib
from tests import reference
from tests.quick import some

SETTINGS = {
  "minimal blocks, one box per chunk": dict(tap_slots=1, pool_slots=1, chunk=1),
  "odd blocks": dict(tap_slots=3, pool_slots=3, chunk=1 << 16),
  "large odd blocks, one box per chunk": dict(tap_slots=5, pool_slots=13, chunk=1),
}
CHUNK_BUDGETS = [
  (tap_sum, "_CHUNK_ELEMENTS"),
  (tap_sum, "_SCATTER_ELEMENTS"),
  (tap_sum, "_WEIGHT_GRAD_ELEMENTS"),
  (sample_max, "_CHUNK_ELEMENTS"),
  (bin_max, "_CHUNK_ELEMENTS"),
  (bin_max, "_ONE_PASS_CHUNK_ELEMENTS"),
  (dense, "_CHUNK_ELEMENTS"),
]


def _problem():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((2, 9, 11, 3)).astype(np.float32)
  lo = rng.uniform(-4, 9, (7, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.3, 14, (7, 2))], 1).astype(np.float32)
  boxes[0] = [-30, -25, 40, 35]  # larger than the map: many taps per bin
  return features, boxes, rng.integers(0, 2, 7).astype(np.int32)


def _align(mode, ratio, impl="gather"):
  def op(f, b, i):
    return roipool_jax.roi_align(
      f, b, (3, 2), sampling_ratio=ratio, mode=mode, box_indices=i, impl=impl
    )

  return op


OPS = {
  "avg adaptive": _align("avg", -1),
  "avg ratio 3": _align("avg", 3),
  "max adaptive": _align("max", -1),
  "max ratio 3": _align("max", 3),
  "einsum": _align("avg", 2, "einsum"),
  "roi_pool": lambda f, b, i: roipool_jax.roi_pool(f, b, (3, 2), box_indices=i),
  # Its forward's fused kernel needs each sample's taps in one block: with 1 slot it falls back.
  "roi_warp": lambda f, b, i: roipool_jax.roi_warp(f, b, (3, 2), box_indices=i),
}


def _expected(name, features, boxes, indices):
  if name == "roi_pool":
    return reference.roi_pool(features, boxes, indices, (3, 2), 1.0)[0]
  if name == "roi_warp":
    return reference.roi_warp(features, boxes, indices, (3, 2), (6, 4))
  mode, ratio = ("avg", 2) if name == "einsum" else (name.split()[0], -1)
  ratio = 3 if name.endswith("3") else ratio
  return reference.roi_align(features, boxes, indices, (3, 2), 1.0, ratio, False, mode)


def _grads(op, features, boxes, indices):
  cot = jnp.asarray(np.random.default_rng(1).standard_normal((7, 3, 2, 3)), jnp.float32)
  return jax.grad(lambda f, b: jnp.vdot(op(f, b, indices), cot), (0, 1))(features, boxes)


@functools.cache
def _default_grads(name):
  """The gradients of ``OPS[name]`` with the shipped constants, computed once per op (each
  test asks for them before it patches anything)."""
  return _grads(OPS[name], *_problem())


@pytest.fixture
def fresh_compilation():
  # The ops are jit-compiled once per configuration: recompile with the patched constants.
  jax.clear_caches()
  yield
  jax.clear_caches()


@pytest.mark.parametrize(
  "name",
  [*some(sorted(set(OPS) - {"roi_warp"}), 3), pytest.param("roi_warp", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("setting", some(["odd blocks", *sorted(set(SETTINGS) - {"odd blocks"})]))
def test_results_do_not_depend_on_tuning_constants(setting, name, monkeypatch, fresh_compilation):
  features, boxes, indices = _problem()
  op = OPS[name]
  default_grads = _default_grads(name)
  jax.clear_caches()
  s = SETTINGS[setting]
  monkeypatch.setattr(tap_sum, "SLOTS", s["tap_slots"])
  monkeypatch.setattr(bin_max, "SLOTS", s["pool_slots"])
  for module, budget in CHUNK_BUDGETS:
    monkeypatch.setattr(module, budget, s["chunk"])
  out = op(features, boxes, indices)
  np.testing.assert_allclose(out, _expected(name, features, boxes, indices), rtol=1e-5, atol=2e-6)
  for got, want in zip(_grads(op, features, boxes, indices), default_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("group", [1, 2])
def test_blocks_never_split_a_group_of_taps(slots, group, monkeypatch):
  monkeypatch.setattr(tap_sum, "SLOTS", slots)
  for taps in range(group, 24, group):
    (sy, sx), (ty, tx) = tap_sum.blocking(taps, taps + group, group)
    assert sy % group == 0 and sx % group == 0
    assert ty % sy == 0 and tx % sx == 0 and ty >= taps and tx >= taps + group
  with pytest.raises(ValueError, match="whole groups"):
    tap_sum.blocking(3, 4, 2)


def test_a_chunk_of_tall_and_wide_bins_loops_as_long_as_its_costliest_bin():
  # One tall and one wide box (adaptive, one bin each): 8 x 1 and 1 x 8 blocks of taps.
  # The chunk must make 8 passes, not max(passes_y) * max(passes_x) = 64, and still
  # visit every block of both bins.
  rng = np.random.default_rng(0)
  features = rng.standard_normal((1, 30, 30, 2)).astype(np.float32)
  boxes = np.array([[3.2, 0.4, 4.1, 27.5], [0.3, 2.6, 28.7, 3.4]], np.float32)
  indices = np.zeros(2, np.int32)
  flat_boxes = jnp.asarray(boxes)
  valid = jnp.ones(2, bool)
  rows = sampling.axis_geometry(flat_boxes[:, 1], flat_boxes[:, 3], valid, 1, 1.0, -1, False)
  cols = sampling.axis_geometry(flat_boxes[:, 0], flat_boxes[:, 2], valid, 1, 1.0, -1, False)
  ty, tx = sampling.row_taps(rows, 1, 30), sampling.row_taps(cols, 1, 30)
  plan = tap_sum.map_plan(jnp.asarray(indices), ty, tx, features.shape)
  table, (slots, _), _, _ = tap_sum.prepare(ty.weight, tx.weight, plan)
  units = tap_sum._units(table, slots)
  assert sorted(zip(units.passes_y.tolist(), units.passes_x.tolist(), strict=True)) == [
    (1, 8),
    (8, 1),
  ]
  assert int(tap_sum._unit_passes(units)) == 8
  out = roipool_jax.roi_align(features, boxes, 1, sampling_ratio=-1, box_indices=indices)
  want = reference.roi_align(features, boxes, indices, (1, 1), 1.0, -1, False, "avg")
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("longest_bin", [3.0, 40.0])
def test_short_bins_evaluate_fewer_taps_with_the_same_results(longest_bin, monkeypatch):
  # Adaptive taps of bins spanning at most sampling._SHORT_BINS cells are evaluated over
  # that many taps only (a lax.cond); a bin of 40 cells takes the full-length branch.
  # Either way the taps, the output and the feature gradient equal the full evaluation;
  # the box gradient sums the taps' derivatives over fewer zeros (last-bit differences).
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.standard_normal((2, 45, 50, 3)), jnp.float32)
  lo = rng.uniform(-5, 40, (9, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.2, 3 * 6, (9, 2))], 1).astype(np.float32)
  boxes[0] = [-3.0, 1.5, -3.0 + 6 * longest_bin, 1.5 + 6 * longest_bin]
  indices = rng.integers(0, 2, 9).astype(np.int32)
  valid = jnp.ones(9, bool)

  def taps(b):
    cols = sampling.axis_geometry(b[:, 0], b[:, 2], valid, 6, 1.0, -1, True)
    return sampling.row_taps(cols, 6, 50)

  def op(f, b):
    return roipool_jax.roi_align(f, b, 6, sampling_ratio=-1, aligned=True, box_indices=indices)

  cot = jnp.asarray(rng.standard_normal((9, 6, 6, 3)), jnp.float32)
  loss = jax.jit(jax.grad(lambda f, b: jnp.vdot(op(f, b), cot), (0, 1)))
  got = (jax.jit(taps)(jnp.asarray(boxes)), op(features, boxes), loss(features, boxes))
  assert (int(got[0].count.max()) <= sampling._SHORT_BINS) == (longest_bin < 10)
  jax.clear_caches()
  monkeypatch.setattr(sampling, "_SHORT_BINS", 50)  # = the map's width: always all taps
  want = (jax.jit(taps)(jnp.asarray(boxes)), op(features, boxes), loss(features, boxes))
  jax.clear_caches()
  for g, w in zip(
    jax.tree.leaves(got[:2] + got[2][:1]), jax.tree.leaves(want[:2] + want[2][:1]), strict=True
  ):
    np.testing.assert_array_equal(g, w)
  np.testing.assert_allclose(got[2][1], want[2][1], rtol=1e-6, atol=1e-6)
  expected = reference.roi_align(features, boxes, indices, (6, 6), 1.0, -1, True, "avg")
  np.testing.assert_allclose(got[1], expected, rtol=1e-5, atol=1e-6)


def test_a_chunk_of_tall_and_wide_boxes_takes_the_max_in_as_many_passes_as_its_costliest_box(
  monkeypatch,
):
  # roi_align(mode="max") chunks whole boxes. One tall and one wide box (adaptive
  # grids, 2 x 2 bins) use k x 1 and 1 x k blocks of samples: their chunk must make
  # k passes, not k * k, and give each box what it gives alone in a chunk.
  rng = np.random.default_rng(1)
  features = rng.standard_normal((1, 40, 40, 3)).astype(np.float32)
  boxes = np.array([[3.2, 0.4, 6.1, 38.5], [0.3, 2.6, 38.7, 5.4]], np.float32)
  indices = np.zeros(2, np.int32)
  flat_boxes, valid = jnp.asarray(boxes), jnp.ones(2, bool)
  rows = sampling.axis_geometry(flat_boxes[:, 1], flat_boxes[:, 3], valid, 2, 1.0, -1, False)
  cols = sampling.axis_geometry(flat_boxes[:, 0], flat_boxes[:, 2], valid, 2, 1.0, -1, False)
  ty, _ = sampling.sample_taps(rows, 2, 40, roi_align_lib._max_samples(-1, 40), False)
  tx, _ = sampling.sample_taps(cols, 2, 40, roi_align_lib._max_samples(-1, 40), False)
  plan = tap_sum.map_plan(jnp.asarray(indices), ty, tx, features.shape)
  table, (slots, _), single, _ = tap_sum.prepare(ty.weight, tx.weight, plan, group=2)
  passes_y, passes_x = (p.tolist() for p in tap_sum.box_passes(table, slots))
  assert not single and passes_y[0] > 1 and passes_x[1] > 1
  assert passes_x[0] == passes_y[1] == 1
  costliest = max(passes_y[0], passes_x[1])
  assert int(chunking.own_block_passes(*tap_sum.box_passes(table, slots))) == costliest

  def run():
    jax.clear_caches()
    op = lambda x, b: roipool_jax.roi_align(  # noqa: E731
      x, b, 2, sampling_ratio=-1, box_indices=indices, mode="max"
    )
    cot = np.linspace(-1, 1, 2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    out, pull = jax.vjp(op, jnp.asarray(features), jnp.asarray(boxes))
    return (out, *pull(jnp.asarray(cot)))

  together = run()
  want = reference.roi_align(features, boxes, indices, (2, 2), 1.0, -1, False, "max")
  np.testing.assert_allclose(together[0], want, rtol=1e-6, atol=1e-6)
  monkeypatch.setattr(sample_max, "_CHUNK_ELEMENTS", 1)  # one box per chunk
  for got, alone in zip(together, run(), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(alone))
  jax.clear_caches()


@pytest.mark.parametrize("one_bin_per_chunk", [False, True])
@pytest.mark.parametrize("name", ["avg adaptive", "avg ratio 3"])
def test_bfloat16_sums_round_once_whether_kept_or_recomputed(
  name, one_bin_per_chunk, monkeypatch, fresh_compilation
):
  # 16-bit outputs of multi-pass bins either keep their float32 sums (small outputs) or are
  # recomputed from pass 0 (large ones, chunking.WIDE_SUM_BYTES): both round the whole sum
  # once, so they agree to a bfloat16 ulp and match the reference to bfloat16 precision.
  # With one bin per chunk, the single-pass bins are never revisited: the recomputing first
  # pass must have skipped only the bins revisited after it.
  features, boxes, indices = _problem()
  features = jnp.asarray(features, jnp.bfloat16)
  monkeypatch.setattr(tap_sum, "SLOTS", 1)  # every bin of more than one tap is multi-pass
  if one_bin_per_chunk:
    monkeypatch.setattr(tap_sum, "_CHUNK_ELEMENTS", 1)
  outs = []
  for limit in (1 << 40, 0):
    monkeypatch.setattr(chunking, "WIDE_SUM_BYTES", limit)
    jax.clear_caches()
    outs.append(np.asarray(OPS[name](features, boxes, indices).astype(jnp.float32)))
  want = _expected(name, np.asarray(features, np.float32), boxes, indices)
  for out in outs:
    np.testing.assert_allclose(out, want, rtol=2**-8, atol=1e-6)
  np.testing.assert_allclose(outs[0], outs[1], rtol=2**-8, atol=0)


@pytest.mark.parametrize("name", ["avg adaptive", "avg ratio 3"])
def test_a_widened_bfloat16_table_gives_the_same_bits(name, monkeypatch, fresh_compilation):
  # The forward widens a small bfloat16 table to float32 once when its bins read it many
  # times over (tap_sum._widens_table; here always, or never). The values are the same and are
  # summed in the same order, so the outputs have the same bits, and so has the value under
  # grad, whose forward never widens.
  features, boxes, indices = _problem()
  features = jnp.asarray(features, jnp.bfloat16)
  op = OPS[name]
  programs, outs = [], []
  for reads in (0, 1 << 40):
    monkeypatch.setattr(tap_sum, "_WIDEN_READS", reads)
    jax.clear_caches()
    programs.append(jax.jit(op).lower(features, boxes, indices).as_text())
    outs.append(op(features, boxes, indices))
  monkeypatch.setattr(tap_sum, "_WIDEN_READS", 0)  # widen wherever allowed: not under grad
  jax.clear_caches()
  under_grad, _ = jax.vjp(lambda f: op(f, boxes, indices), features)
  table = f"tensor<{np.prod(features.shape[:3])}x{features.shape[3]}xf32>"
  assert [table in program for program in programs] == [True, False]  # widened, not widened
  grad_program = jax.jit(lambda f: jax.vjp(lambda f: op(f, boxes, indices), f)[0])
  assert table not in grad_program.lower(features).as_text()
  want = _expected(name, np.asarray(features, np.float32), boxes, indices)
  np.testing.assert_allclose(np.asarray(outs[0], np.float32), want, rtol=2**-8, atol=1e-6)
  for other in (outs[1], under_grad):
    np.testing.assert_array_equal(
      np.asarray(outs[0]).view(np.uint16), np.asarray(other).view(np.uint16)
    )
  half = jnp.asarray(features, jnp.float16)  # converted row by row as fast as float32: not widened
  assert table not in jax.jit(op).lower(half, boxes, indices).as_text()


def _ps_problem():
  rng = np.random.default_rng(2)
  features = rng.standard_normal((2, 9, 11, 2 * 3 * 2)).astype(np.float32)  # C_out = 2, 3 x 2
  lo = rng.uniform(-4, 9, (9, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.3, 14, (9, 2))], 1).astype(np.float32)
  boxes[0] = [-30, -25, 40, 35]  # larger than the map: many cells and taps per bin
  return features, boxes, rng.integers(0, 2, 9).astype(np.int32)


PS_OPS = {
  "ps_roi_pool": (
    lambda f, b, i: roipool_jax.ps_roi_pool(f, b, (3, 2), box_indices=i),
    lambda f, b, i: reference.ps_roi_pool(f, b, i, (3, 2), 1.0),
  ),
  "ps_roi_align": (
    lambda f, b, i: roipool_jax.ps_roi_align(f, b, (3, 2), sampling_ratio=-1, box_indices=i),
    lambda f, b, i: reference.ps_roi_align(f, b, i, (3, 2), 1.0, -1),
  ),
}


@pytest.mark.parametrize("name", sorted(PS_OPS))
def test_smaller_chunks_for_costly_bins_change_no_output(name, monkeypatch, fresh_compilation):
  # With one cell or tap block per pass and chunks of 4 bins, the bins need many passes and
  # the costly ones fill several chunks. Revisited in chunks of single bins
  # (chunking.costly_chunk on every chunk), each bin must still sum the same terms in the
  # same order: the same bits, the reference's values, and gradients that differ at most in
  # the order of their sums.
  features, boxes, indices = _ps_problem()
  op, expected = PS_OPS[name]
  monkeypatch.setattr(cell_mean, "SLOTS", 1)
  monkeypatch.setattr(tap_sum, "SLOTS", 1)
  for module, budget in [(cell_mean, "_CHUNK_ELEMENTS"), *CHUNK_BUDGETS[:2]]:
    monkeypatch.setattr(module, budget, 8)  # 4 bins of 2 channels
  for module in (cell_mean, tap_sum):
    monkeypatch.setattr(module, "_COSTLY_DIVISOR", 4)
  cot = jnp.asarray(np.random.default_rng(1).standard_normal((9, 3, 2, 2)), jnp.float32)
  results = []
  for min_chunk in (1 << 40, 1):  # chunks of 4 for every bin; chunks of 1 for costly bins
    monkeypatch.setattr(chunking, "COSTLY_MIN_CHUNK", min_chunk)
    jax.clear_caches()
    out, vjp = jax.vjp(lambda f: op(f, boxes, indices), features)
    results.append((np.asarray(out), np.asarray(vjp(cot)[0])))
  (out, grad), (small_out, small_grad) = results
  np.testing.assert_array_equal(small_out, out)
  np.testing.assert_allclose(out, expected(features, boxes, indices), rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(small_grad, grad, rtol=1e-6, atol=1e-6)
