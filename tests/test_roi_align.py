"""Tests of roipool_jax.roi_align: torchvision fixtures, NumPy reference, gradients."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roipool_jax import roi_align
from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import roi_align as roi_align_lib
from roipool_jax._src import sampling
from tests import fixtures_io, reference
from tests.quick import some

CASES = fixtures_io.load_cases("torchvision_roi_align.npz")


# ------------------------------------------------------------------ torchvision parity


@pytest.mark.parametrize("impl", ["gather", "einsum"])
@pytest.mark.parametrize("name", some(sorted(CASES), 3))
def test_matches_torchvision_forward_and_gradient(name, impl):
  c = CASES[name]
  kwargs = dict(
    spatial_scale=float(c["spatial_scale"]),
    sampling_ratio=int(c["sampling_ratio"]),
    aligned=bool(c["aligned"]),
    box_indices=c["box_indices"],
    impl=impl,
  )
  size = tuple(int(s) for s in c["output_size"])
  out, vjp = jax.vjp(lambda x: roi_align(x, c["boxes"], size, **kwargs), jnp.asarray(c["features"]))
  np.testing.assert_allclose(np.asarray(out), c["output"], rtol=1e-5, atol=1e-5)
  fixtures_io.assert_gradients_match(vjp, c["cotangent"], [c["grad"]])


# ------------------------------------------------------------------ NumPy reference

_MAPS = [(1, 5, 7, 2), (2, 6, 4, 3), (1, 1, 1, 1), (2, 9, 9, 1)]
_SIZES = [(1, 1), (2, 2), (3, 2)]
_SCALES = [1.0, 0.5, 0.25]


@st.composite
def _problems(draw):
  shape = draw(st.sampled_from(_MAPS))
  n, h, w, _ = shape
  size = draw(st.sampled_from(_SIZES))
  scale = draw(st.sampled_from(_SCALES))
  k = draw(st.sampled_from([1, 6]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  features = rng.standard_normal(shape).astype(np.float32)
  if draw(st.booleans()):  # ReLU-like: ties at zero
    features = np.maximum(features, 0)
  extent = np.array([w, h, w, h]) / scale
  boxes = rng.uniform(-0.4, 1.4, (k, 4)) * extent
  kinds = rng.integers(0, 8, k)
  boxes[kinds == 0] = boxes[kinds == 0][:, [2, 3, 0, 1]]  # inverted
  boxes[kinds == 1, 2:] = boxes[kinds == 1, :2]  # zero size
  boxes[kinds == 2, 1] = np.nan
  boxes[kinds == 3] *= 4  # huge / far
  indices = rng.integers(0, n, k).astype(np.int32)
  return features, boxes.astype(np.float32), indices, size, scale


@given(
  _problems(),
  st.sampled_from([-1, 1, 2, 3]),
  st.booleans(),
  st.sampled_from(["avg", "max"]),
)
def test_matches_numpy_reference(problem, ratio, aligned, mode):
  features, boxes, indices, size, scale = problem
  expected = reference.roi_align(features, boxes, indices, size, scale, ratio, aligned, mode)
  out = roi_align(
    features,
    boxes,
    size,
    spatial_scale=scale,
    sampling_ratio=ratio,
    aligned=aligned,
    box_indices=indices,
    mode=mode,
  )
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", ["gather", "einsum"])
@pytest.mark.parametrize("aligned", [False, True])
def test_scaled_box_edges_are_rounded_as_in_c(aligned, impl):
  """``x2 * s - x1 * s`` rounds both products, as the C kernels do.

  With ``s = 1/3`` a box from x = 44 to 56 spans 4.000001 cells in float32,
  so each of its 2 bins (2.0000005 cells) takes ceil = 3 samples. An FMA
  contraction of the subtraction (one rounding) gives 4.0 and 2 samples;
  with ``aligned`` (``x * s - 0.5``) the same happens from x = 7 to 25.
  """
  lo = np.tile(np.arange(0.0, 60.0), 2)
  hi = lo + np.repeat([12.0, 18.0], 60)
  boxes = np.stack([lo, lo[::-1], hi, lo[::-1] + 7], axis=1).astype(np.float32)
  features = np.random.default_rng(0).standard_normal((1, 24, 24, 2)).astype(np.float32)
  indices = np.zeros(len(boxes), np.int32)
  expected = reference.roi_align(features, boxes, indices, (3, 2), 1 / 3, -1, aligned, "avg")
  out = roi_align(
    features, boxes, (3, 2), spatial_scale=1 / 3, aligned=aligned, box_indices=indices, impl=impl
  )
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=2e-6)


def test_huge_boxes_adaptive_match_reference_and_stay_bounded():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((1, 8, 10, 2)).astype(np.float32)
  # 10x the map: an adaptive grid of ~12 x 15 samples per bin.
  boxes = np.array([[-40, -35, 60, 45], [-50, 2, 55, 6], [3, -70, 5, 80]], np.float32)
  for mode in ("avg", "max"):
    for aligned in (False, True):
      out = jax.jit(partial(roi_align, output_size=7, aligned=aligned, mode=mode))(features, boxes)
      expected = reference.roi_align(features, boxes, [0, 0, 0], (7, 7), 1.0, -1, aligned, mode)
      np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=2e-6)
  # The work per bin is bounded by the map, not by the grid (documented cost).
  flat = boxes_lib.flatten_boxes(boxes, None, 1)
  rows, cols = roi_align_lib.align_geometry(flat, (7, 7), 1.0, -1, False)
  assert int(jnp.max(rows.grid)) >= 11
  assert int(jnp.max(sampling.row_taps(rows, 7, 8).count)) <= 8
  assert int(jnp.max(sampling.row_taps(cols, 7, 10).count)) <= 10


# ------------------------------------------------------------------ gradients


def _grad_problem(seed, k=5, shape=(2, 7, 9, 3)):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal(shape).astype(np.float32)
  lo = rng.uniform(-2, 5, (k, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(2, 6, (k, 2))], 1).astype(np.float32)
  indices = rng.integers(0, shape[0], k).astype(np.int32)
  return jnp.asarray(features), jnp.asarray(boxes), indices


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", some([False, True]))
@pytest.mark.parametrize("ratio", some([1, 2, 3]))
def test_gradients_match_autodiff_of_dense_formulation(mode, aligned, ratio):
  features, boxes, indices = _grad_problem(ratio)
  size = (3, 2)

  def ours(f, b):
    return roi_align(
      f, b, size, sampling_ratio=ratio, aligned=aligned, box_indices=indices, mode=mode
    )

  def dense(f, b):
    return reference.dense_roi_align(f, b, indices, size, 1.0, ratio, aligned, mode)

  out, vjp = jax.vjp(jax.jit(ours), features, boxes)
  expected, vjp_dense = jax.vjp(jax.jit(dense), features, boxes)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  cot = jnp.asarray(np.random.default_rng(7).standard_normal(out.shape), jnp.float32)
  for got, want in zip(vjp(cot), vjp_dense(cot), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aligned", some([False, True]))
def test_adaptive_gradients_match_dense_formulation_with_the_same_grid(aligned):
  # Every box has bin sizes in (2, 3]: adaptive sampling uses a 3 x 3 grid.
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.standard_normal((1, 12, 14, 2)), jnp.float32)
  lo = rng.uniform(-3, 6, (6, 2))
  boxes = jnp.asarray(np.concatenate([lo, lo + rng.uniform(4.2, 5.8, (6, 2))], 1), jnp.float32)
  indices = np.zeros(6, np.int32)

  def ours(f, b):
    return roi_align(f, b, 2, sampling_ratio=-1, aligned=aligned)

  def dense(f, b):
    return reference.dense_roi_align(f, b, indices, (2, 2), 1.0, 3, aligned, "avg")

  out, vjp = jax.vjp(jax.jit(ours), features, boxes)
  expected, vjp_dense = jax.vjp(jax.jit(dense), features, boxes)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  cot = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  for got, want in zip(vjp(cot), vjp_dense(cot), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ratio", some([-1, 2]))
def test_box_gradient_matches_finite_differences(mode, ratio):
  rng = np.random.default_rng(11)
  features = jnp.asarray(rng.standard_normal((1, 8, 8, 2)), jnp.float32)
  # Samples stay off integer positions, and adaptive bin sizes off integers
  # (where the grid ceil(bin) jumps), under +-eps.
  boxes = jnp.asarray([[1.3, 0.7, 6.3, 5.7], [2.7, 1.3, 4.7, 6.5]], jnp.float32)
  cot = jnp.asarray(rng.standard_normal((2, 2, 3, 2)), jnp.float32)

  @jax.jit
  def loss(b):
    out = roi_align(features, b, (2, 3), sampling_ratio=ratio, aligned=True, mode=mode)
    return jnp.vdot(out, cot)

  numeric = reference.central_differences(loss, boxes, 1e-2)
  np.testing.assert_allclose(jax.grad(loss)(boxes), numeric, rtol=1e-3, atol=1e-3)


def test_gradients_are_bitwise_deterministic():
  features, boxes, indices = _grad_problem(0, k=40, shape=(2, 16, 16, 8))
  boxes = boxes * 3

  def loss(f, b):
    return jnp.sum(roi_align(f, b, 7, sampling_ratio=-1, box_indices=indices) ** 2)

  # Two separate compilations, each run twice: all four must agree bit for bit.
  compiled = [jax.jit(jax.grad(lambda f, b: loss(f, b), argnums=(0, 1))) for _ in range(2)]
  runs = [fn(features, boxes) for fn in compiled for _ in range(2)]
  for run in runs[1:]:
    for a, b in zip(runs[0], run, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ transformations


class JitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    features, boxes, indices = _grad_problem(1, k=7)

    @self.variant
    def f(x, b, i):
      return roi_align(x, b, (3, 4), spatial_scale=0.9, box_indices=i, aligned=True)

    expected = reference.roi_align(features, boxes, indices, (3, 4), 0.9, -1, True, "avg")
    np.testing.assert_allclose(f(features, boxes, indices), expected, rtol=1e-5, atol=1e-6)


def test_vmap_over_maps_equals_loop():
  features, boxes, _ = _grad_problem(2, k=4, shape=(3, 6, 7, 2))
  per_map = jnp.stack([boxes, boxes + 1.0, boxes * 0.5])

  @jax.jit
  def one(f, b):
    return roi_align(f[None], b, 2, sampling_ratio=2)

  out = jax.jit(jax.vmap(one))(features, per_map)
  for n in range(3):
    np.testing.assert_allclose(out[n], one(features[n], per_map[n]), rtol=1e-6, atol=1e-7)


def test_per_image_boxes_equal_flat_boxes():
  features, boxes, _ = _grad_problem(4, k=6, shape=(2, 6, 7, 2))
  per_image = boxes.reshape(2, 3, 4)
  flat = roi_align(features, boxes, 3, box_indices=np.repeat([0, 1], 3))
  np.testing.assert_array_equal(roi_align(features, per_image, 3).reshape(flat.shape), flat)


@pytest.mark.parametrize("dtype", some([jnp.bfloat16, jnp.float16]))
def test_low_precision_accumulates_in_float32(dtype):
  features, boxes, _ = _grad_problem(5, k=4, shape=(1, 9, 9, 4))
  low = features.astype(dtype)
  out = roi_align(low, boxes * 2, 2, sampling_ratio=-1)
  assert out.dtype == dtype
  expected = roi_align(low.astype(jnp.float32), boxes * 2, 2, sampling_ratio=-1)
  # Only the final rounding to the low dtype differs from a float32 accumulation.
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected.astype(dtype)))
  grad = jax.grad(lambda f: jnp.sum(roi_align(f, boxes, 2).astype(jnp.float32)))(low)
  assert grad.dtype == dtype


@pytest.mark.parametrize("box_dtype", some([jnp.bfloat16, jnp.float16]))
@pytest.mark.parametrize("map_dtype", [jnp.bfloat16, jnp.float32])
def test_boxes_are_read_exactly_as_given(box_dtype, map_dtype):
  """Low-precision boxes are computed from the values they hold (no second rounding), and
  float32 boxes keep their float32 precision with a low-precision map."""
  features = jnp.broadcast_to(jnp.arange(1100.0)[None, None, :, None], (1, 2, 1100, 1))
  low = jnp.asarray([[990.3, 0.0, 1000.3, 1.0]], box_dtype)
  out = roi_align(features.astype(map_dtype), low, 1, sampling_ratio=1)
  exact = roi_align(features.astype(jnp.float32), low.astype(jnp.float32), 1, sampling_ratio=1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(exact.astype(map_dtype)))
  (box_grad,) = jax.grad(
    lambda b: roi_align(features.astype(jnp.float32), b, 1, sampling_ratio=1).sum(), argnums=(0,)
  )(low)
  assert box_grad.dtype == box_dtype
  # float32 boxes: x = 995.3 is sampled at 995.3, not at a bfloat16-rounded coordinate.
  precise = roi_align(
    jnp.ones((1, 2, 1100, 1), map_dtype).at[..., 996, :].set(2),
    jnp.asarray([[990.3, 0.0, 1000.3, 1.0]], jnp.float32),
    1,
    sampling_ratio=1,
  )
  np.testing.assert_allclose(np.asarray(precise, np.float32).ravel(), [1.3], rtol=1e-2)


# ------------------------------------------------------------------ degenerate boxes


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", some([-1, 2]))
def test_inverted_boxes_give_zeros_and_no_gradient(ratio, aligned):
  features, _, _ = _grad_problem(6, shape=(1, 6, 6, 2))
  # Fully inverted, inverted in x only, then a normal box.
  boxes = jnp.asarray([[5.0, 5.0, 1.0, 1.0], [4.0, 1.0, 3.0, 4.0], [1.0, 1.0, 4.0, 4.0]])

  @jax.jit
  def f(x, b):
    return roi_align(x, b, 2, sampling_ratio=ratio, aligned=aligned)

  out = f(features, boxes)
  assert np.all(np.asarray(out[:2]) == 0) and np.any(np.asarray(out[2]) != 0)
  grad_f, grad_b = jax.grad(lambda x, b: jnp.sum(f(x, b)[:2]), argnums=(0, 1))(features, boxes)
  assert np.all(np.asarray(grad_f) == 0) and np.all(np.asarray(grad_b) == 0)


def test_bad_boxes_never_affect_other_boxes():
  features, boxes, _ = _grad_problem(8, k=3, shape=(1, 6, 6, 2))
  bad = jnp.asarray([[jnp.nan, 1, 2, 3], [1, 1, jnp.inf, 2], [1e30, -1e30, 1e30, 1e30]])
  mixed = jnp.concatenate([boxes, bad])

  def loss(x, b, rows):
    return jnp.sum(roi_align(x, b, 2, sampling_ratio=-1)[:rows] ** 2)

  out = roi_align(features, mixed, 2)
  np.testing.assert_array_equal(out[:3], roi_align(features, boxes, 2))
  assert np.all(np.asarray(out[3:5]) == 0) and np.all(np.isfinite(np.asarray(out)))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  g_mixed, g_clean = grad(features, mixed, 3), grad(features, boxes, 3)
  np.testing.assert_array_equal(g_mixed[0], g_clean[0])
  np.testing.assert_array_equal(g_mixed[1][:3], g_clean[1])
  assert np.all(np.isfinite(np.asarray(g_mixed[1])))


def test_nan_features_only_reach_bins_that_sample_them():
  features = jnp.zeros((1, 6, 6, 1)).at[0, 5, 5, 0].set(jnp.nan)
  boxes = jnp.asarray([[0.0, 0.0, 2.0, 2.0], [3.0, 3.0, 6.0, 6.0]])
  out = np.asarray(roi_align(features, boxes, 2, aligned=True))
  assert np.all(out[0] == 0) and np.isnan(out[1, 1, 1, 0])


def test_max_mode_nan_sample_wins_its_bin_and_a_bin_without_samples_is_zero():
  # aligned, adaptive: the 4 x 4 box samples every cell centre once; the zero-size box has
  # no sample (g = 0). mmcv's kernel would skip the NaN and give -FLT_MAX (documented).
  features = jnp.arange(16.0).reshape(1, 4, 4, 1).at[0, 1, 1, 0].set(jnp.nan)
  boxes = jnp.asarray([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 2.0, 2.0]])

  def pool(x):
    return roi_align(x, boxes, 2, aligned=True, mode="max")

  expected = [[[np.nan, 7.0], [13.0, 15.0]], [[0.0, 0.0], [0.0, 0.0]]]
  np.testing.assert_array_equal(np.asarray(pool(features))[..., 0], expected)
  # The NaN bin's cotangent is zeroed by nan_to_num; the others reach their arg-max cells.
  grad = jax.grad(lambda x: jnp.sum(jnp.nan_to_num(pool(x), nan=0.0)))(features)
  want = np.zeros((4, 4), np.float32)
  want[1, 3] = want[3, 1] = want[3, 3] = 1.0
  np.testing.assert_array_equal(np.asarray(grad)[0, :, :, 0], want)


def test_empty_box_list():
  features = jnp.ones((2, 4, 4, 3))
  assert roi_align(features, jnp.zeros((0, 4)), 2, box_indices=jnp.zeros(0, int)).shape == (
    0,
    2,
    2,
    3,
  )


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(sampling_ratio=2.0), TypeError, "sampling_ratio"),
    (dict(sampling_ratio=True), TypeError, "sampling_ratio"),
    (dict(aligned=1), TypeError, "aligned"),
    (dict(mode="mean"), ValueError, "mode"),
    (dict(spatial_scale=0.0), ValueError, "spatial_scale"),
    (dict(box_indices=np.array([0, 3])), ValueError, "box_indices"),
  ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    roi_align(jnp.ones((2, 4, 4, 1)), jnp.ones((2, 4)), 2, **kwargs)


def test_bad_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match=r"features.*rank 4"):
    roi_align(jnp.ones((4, 4, 1)), jnp.ones((1, 4)), 2)
  with pytest.raises(ValueError, match=r"boxes.*\(3, 5\)"):
    roi_align(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 5)), 2)
  with pytest.raises(TypeError, match="floating"):
    roi_align(jnp.ones((1, 4, 4, 1), jnp.int32), jnp.ones((1, 4)), 2)
  with pytest.raises(ValueError, match="output_size"):
    roi_align(jnp.ones((1, 4, 4, 1)), jnp.ones((1, 4)), (0, 2))
