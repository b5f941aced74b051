"""Tests of roipool_jax.roi_pool against torchvision fixtures and the NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import roipool_jax
from roipool_jax import roi_pool
from roipool_jax._src import bin_max
from tests import fixtures_io, reference
from tests.quick import some

CASES = fixtures_io.load_cases("torchvision_roi_pool.npz")


# ------------------------------------------------------------------ torchvision parity


@pytest.mark.parametrize("name", some(sorted(CASES), 4))
def test_matches_torchvision_forward_and_gradient(name):
  c = CASES[name]
  size = tuple(int(s) for s in np.broadcast_to(c["output_size"], (2,)))

  def f(x):
    return roi_pool(
      x, c["boxes"], size, spatial_scale=float(c["spatial_scale"]), box_indices=c["box_indices"]
    )

  out, vjp = jax.vjp(f, jnp.asarray(c["features"]))
  np.testing.assert_array_equal(np.asarray(out), c["output"])
  fixtures_io.assert_gradients_match(vjp, c["cotangent"], [c["grad"]], tol=1e-6)


# ------------------------------------------------------------------ NumPy reference

_MAPS = [(1, 5, 7, 2), (2, 6, 4, 3), (1, 1, 1, 1), (3, 9, 9, 1)]
_SIZES = [(1, 1), (2, 2), (3, 2), (4, 5)]
_SCALES = [1.0, 0.5, 0.25, 1 / 3]


@st.composite
def _problems(draw):
  shape = draw(st.sampled_from(_MAPS))
  n, h, w, _ = shape
  size = draw(st.sampled_from(_SIZES))
  scale = draw(st.sampled_from(_SCALES))
  k = draw(st.sampled_from([1, 4, 9]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  # Integer-valued features create ties; the float part keeps some distinct.
  features = rng.integers(-2, 3, shape).astype(np.float32)
  if draw(st.booleans()):
    features += rng.standard_normal(shape).astype(np.float32)
  extent = np.array([w, h, w, h]) / scale
  boxes = rng.uniform(-0.3, 1.3, (k, 4)) * extent
  # Snap some corners to half-pixels (rounding traps) and make some boxes degenerate.
  snap = rng.random((k, 4)) < 0.3
  boxes = np.where(snap, np.round(boxes * 2) / 2, boxes).astype(np.float32)
  kinds = rng.integers(0, 8, k)
  boxes[kinds == 0] = boxes[kinds == 0][:, [2, 3, 0, 1]]  # inverted
  boxes[kinds == 1, 2:] = boxes[kinds == 1, :2]  # zero size
  boxes[kinds == 2, 0] = np.nan
  boxes[kinds == 3] += 3 * extent  # fully outside
  indices = rng.integers(0, n, k).astype(np.int32)
  quantization = draw(st.sampled_from(["round", "floor"]))
  return features, boxes, indices, size, scale, quantization


@given(_problems())
def test_matches_numpy_reference(problem):
  features, boxes, indices, size, scale, quantization = problem
  want, argmax = reference.roi_pool(features, boxes, indices, size, scale, quantization)

  def f(x):
    return roi_pool(
      x, boxes, size, spatial_scale=scale, box_indices=indices, quantization=quantization
    )

  out, vjp = jax.vjp(f, jnp.asarray(features))
  np.testing.assert_array_equal(np.asarray(out), want)
  cotangent = np.random.default_rng(0).standard_normal(want.shape).astype(np.float32)
  want_grad = reference.roi_pool_grad(features.shape, indices, argmax, cotangent)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(cotangent))[0]), want_grad, atol=1e-5)


@pytest.mark.parametrize("divisor", [1, 3, 7, 14, 49, 224, 4095, 2**22 - 3, 2**22])
def test_bin_sizes_are_correctly_rounded_float32_quotients(divisor):
  # Bin edges flip when roi / P is one ulp off, so boxes.exact_div must round as IEEE does
  # (NumPy's float32 division). Whole cells, random values, and random bit patterns (every
  # exponent; inf and NaN pass through, subnormal results are not produced by boxes).
  from roipool_jax._src.boxes import exact_div

  rng = np.random.default_rng(divisor)
  bits = rng.integers(0, 2**32, 50000, dtype=np.uint64).astype(np.uint32).view(np.float32)
  x = np.concatenate(
    [
      rng.integers(1, 2**24, 50000).astype(np.float32),
      rng.uniform(-1e4, 1e4, 50000).astype(np.float32),
      bits,
      np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0]),
    ]
  )
  with np.errstate(all="ignore"):
    expected = x / np.float32(divisor)
  normal = np.isfinite(x) & (np.abs(expected) >= np.finfo(np.float32).tiny)
  got = np.asarray(exact_div(jnp.asarray(x), divisor))
  np.testing.assert_array_equal(got[normal], expected[normal])
  np.testing.assert_array_equal(got[~np.isfinite(x)], x[~np.isfinite(x)])


def test_article_floor_scheme_bins():
  # The article: RoI at (x=296, y=192), w=200, h=145 on a 16x16 map (scale 1/32),
  # quantized to x=9, y=6, w=6, h=4; 3x3 pooling gives 1x2 bins; row 6+3=9 is lost.
  features = jnp.arange(16 * 16, dtype=jnp.float32).reshape(1, 16, 16, 1)
  box = jnp.array([[296.0, 192.0, 496.0, 337.0]])
  out = roi_pool(features, box, 3, spatial_scale=1 / 32, quantization="floor")
  # The max of each 1x2 bin is its bottom-right cell: row 6 + i, column 9 + 2j + 1.
  want = np.array([[(6 + i) * 16 + 9 + 2 * j + 1 for j in range(3)] for i in range(3)])
  np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], want)


# ------------------------------------------------------------------ transformations


def _fixed_problem():
  rng = np.random.default_rng(7)
  features = rng.standard_normal((2, 10, 12, 3)).astype(np.float32)
  boxes = np.array(
    [[0, 0, 90, 70], [10, 20, 30, 40], [-20, 5, 200, 300], [50, 50, 40, 40], [3, 3, 3, 3]],
    np.float32,
  )
  indices = np.array([0, 1, 1, 0, 1], np.int32)
  return features, boxes, indices


class JitConsistencyTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_agree_with_reference(self):
    features, boxes, indices = _fixed_problem()

    @self.variant
    def f(x, b, i):
      return roi_pool(x, b, (3, 4), spatial_scale=1 / 8, box_indices=i)

    want, _ = reference.roi_pool(features, boxes, indices, (3, 4), 1 / 8)
    out = f(features, boxes, indices)
    chex.assert_shape(out, (5, 3, 4, 3))
    np.testing.assert_array_equal(np.asarray(out), want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_jit_and_no_jit(self):
    features, boxes, indices = _fixed_problem()

    @self.variant
    def g(x):
      return jax.grad(lambda y: jnp.sum(roi_pool(y, boxes, 2, box_indices=indices) ** 2))(x)

    out = roi_pool(features, boxes, 2, box_indices=indices)
    _, argmax = reference.roi_pool(features, boxes, indices, (2, 2), 1.0)
    want = reference.roi_pool_grad(features.shape, indices, argmax, 2 * np.asarray(out))
    np.testing.assert_allclose(np.asarray(g(features)), want, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])  # bfloat16: order keys
def test_vmap_over_a_batch_of_maps_matches_loop(dtype):
  features, boxes, indices = _fixed_problem()
  stacked = jnp.asarray(np.stack([features, features[::-1] * 2.0, -features]), dtype)
  f = lambda x: roi_pool(x, boxes, (2, 3), spatial_scale=0.25, box_indices=indices)  # noqa: E731
  loss = lambda x: f(x).astype(jnp.float32).sum()  # noqa: E731
  as32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  batched = jax.vmap(f)(stacked)
  grads = jax.vmap(jax.grad(loss))(stacked)
  for i in range(3):
    np.testing.assert_array_equal(as32(batched[i]), as32(f(stacked[i])))
    np.testing.assert_array_equal(as32(grads[i]), as32(jax.grad(loss)(stacked[i])))


def test_vmap_over_boxes_matches_flat_call():
  features, boxes, _ = _fixed_problem()
  features = features[:1]
  per_box = jax.vmap(lambda b: roi_pool(features, b[None], 3)[0])(boxes)
  np.testing.assert_array_equal(np.asarray(per_box), np.asarray(roi_pool(features, boxes, 3)))


def test_traced_boxes_and_indices_under_jit():
  features, boxes, indices = _fixed_problem()
  f = jax.jit(lambda x, b, i: roi_pool(x, b, 2, box_indices=i))
  np.testing.assert_array_equal(
    np.asarray(f(features, boxes, indices)),
    reference.roi_pool(features, boxes, indices, (2, 2), 1.0)[0],
  )


def test_per_image_boxes_equal_flat_boxes():
  features, _, _ = _fixed_problem()
  rng = np.random.default_rng(3)
  per_image = rng.uniform(-10, 120, (2, 6, 4)).astype(np.float32)
  out = roi_pool(features, per_image, 2, spatial_scale=0.1)
  chex.assert_shape(out, (2, 6, 2, 2, 3))
  flat = roi_pool(
    features,
    per_image.reshape(-1, 4),
    2,
    spatial_scale=0.1,
    box_indices=np.repeat(np.arange(2, dtype=np.int32), 6),
  )
  np.testing.assert_array_equal(np.asarray(out).reshape(flat.shape), np.asarray(flat))


# ------------------------------------------------------------------ dtypes, gradients


@pytest.mark.parametrize("dtype", some([jnp.bfloat16, jnp.float16, jnp.float32], 2))
def test_dtype_is_preserved_and_values_exact(dtype):
  features, boxes, indices = _fixed_problem()
  x = jnp.asarray(features, dtype)
  out = roi_pool(x, boxes, 3, box_indices=indices)
  assert out.dtype == dtype
  want, argmax = reference.roi_pool(np.asarray(x, np.float32), boxes, indices, (3, 3), 1.0)
  np.testing.assert_array_equal(np.asarray(out, np.float32), want)
  grad = jax.grad(lambda y: roi_pool(y, boxes, 3, box_indices=indices).astype(jnp.float32).sum())(x)
  assert grad.dtype == dtype
  # The backward finds each arg-max against the forward's (narrowed) output: the same
  # cells as in float32, and small integer sums, exact in every dtype.
  ones = np.ones(argmax.shape, np.float32)
  want_grad = reference.roi_pool_grad(features.shape, indices, argmax, ones)
  np.testing.assert_array_equal(np.asarray(grad, np.float32), want_grad)


def test_box_gradient_is_zero_and_finite():
  features, boxes, indices = _fixed_problem()
  g = jax.grad(lambda b: roi_pool(features, b, 2, box_indices=indices).sum())(jnp.asarray(boxes))
  np.testing.assert_array_equal(np.asarray(g), np.zeros_like(boxes))


def test_gradient_is_bitwise_deterministic():
  rng = np.random.default_rng(0)
  features = rng.integers(0, 2, (1, 16, 16, 8)).astype(np.float32)  # many ties
  boxes = rng.uniform(0, 16, (64, 4)).astype(np.float32)
  g = jax.jit(jax.grad(lambda x: (roi_pool(x, boxes, 3) * jnp.arange(8.0)[None, None, None]).sum()))
  first = np.asarray(g(features))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(g(features)), first)


@pytest.mark.parametrize("rank_limit", [2**20, 0], ids=["float-ranks", "integer-ranks"])
@pytest.mark.parametrize("flat_limit", [2**31, 0], ids=["flat-index", "cell-channel-pairs"])
def test_both_backward_paths_send_ties_to_the_first_cell(flat_limit, rank_limit, monkeypatch):
  # Bins of 1 to ~100 cells; integer features tie everywhere, integer
  # cotangents make every sum exact, so both scatters (flat element index, and
  # the (cell, channel) pairs of maps too large for it) must equal the reference,
  # whether cells are enumerated with float32 or integer division.
  monkeypatch.setattr(bin_max, "FLAT_INDEX_LIMIT", flat_limit)
  monkeypatch.setattr(bin_max, "FLOAT_RANK_LIMIT", rank_limit)
  jax.clear_caches()
  rng = np.random.default_rng(3)
  features = rng.integers(-2, 3, (2, 20, 24, 5)).astype(np.float32)
  features[0, 3, 4, 1] = -np.inf
  lo = rng.uniform(-5, 20, (40, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0, 30, (40, 2))], 1).astype(np.float32)
  indices = rng.integers(0, 2, 40).astype(np.int32)
  _, argmax = reference.roi_pool(features, boxes, indices, (3, 2), 1.0)
  cot = rng.integers(-3, 4, argmax.shape).astype(np.float32)
  op = lambda x: roi_pool(x, boxes, (3, 2), box_indices=indices)  # noqa: E731
  got = jax.vjp(op, jnp.asarray(features))[1](jnp.asarray(cot))[0]
  want = reference.roi_pool_grad(features.shape, indices, argmax, cot)
  np.testing.assert_array_equal(np.asarray(got), want)
  jax.clear_caches()


def test_float_rank_split_is_exact_up_to_its_limit():
  # Where a float32 quotient could round across an integer: the ranks just
  # below and at every multiple of the bin width, up to the largest rank allowed.
  limit = bin_max.FLOAT_RANK_LIMIT
  widths = np.array([1, 2, 3, 5, 7, 10, 31, 97, 127, 255, 1000, 1023, 1025, 4093, 65521, limit])
  for cols in widths:
    multiples = np.arange(1, limit // cols + 1, dtype=np.int64) * cols
    rank = np.unique(np.concatenate([multiples - 1, multiples, [0, limit - 1]]))
    rank = rank[rank < limit].astype(np.int32)
    c = np.full_like(rank, cols)
    row, col = jax.jit(bin_max._row_col)(rank, c, 1.0 / c.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(row), rank // cols, err_msg=f"cols={cols}")
    np.testing.assert_array_equal(np.asarray(col), rank % cols, err_msg=f"cols={cols}")


# ------------------------------------------------------------------ degenerate boxes


def test_invalid_boxes_do_not_affect_others():
  features, boxes, indices = _fixed_problem()
  bad = np.array(
    [[np.nan, 0, 5, 5], [0, 0, np.inf, 4], [-np.inf, -np.inf, np.inf, np.inf]], np.float32
  )
  mixed = np.concatenate([boxes, bad])
  mixed_idx = np.concatenate([indices, np.zeros(3, np.int32)])

  def loss(x, b, i):
    return (roi_pool(x, b, 2, box_indices=i) ** 2).sum()

  out = roi_pool(features, mixed, 2, box_indices=mixed_idx)
  np.testing.assert_array_equal(np.asarray(out[5:]), 0.0)
  np.testing.assert_array_equal(
    np.asarray(out[:5]), np.asarray(roi_pool(features, boxes, 2, box_indices=indices))
  )
  g_mixed = jax.grad(loss)(features, mixed, mixed_idx)
  g_clean = jax.grad(loss)(features, boxes, indices)
  np.testing.assert_array_equal(np.asarray(g_mixed), np.asarray(g_clean))
  assert np.all(np.isfinite(np.asarray(jax.grad(loss, argnums=1)(features, mixed, mixed_idx))))


def test_traced_out_of_range_box_indices_give_zeros():
  features, boxes, _ = _fixed_problem()
  f = jax.jit(lambda i: roi_pool(features, boxes[:3], 2, box_indices=i))
  out = np.asarray(f(jnp.array([0, 7, -1], jnp.int32)))
  assert np.any(out[0] != 0)
  np.testing.assert_array_equal(out[1:], 0.0)


def test_huge_coordinates_are_finite_and_match_reference():
  features, _, _ = _fixed_problem()
  boxes = np.array([[-1e30, -1e30, 1e30, 1e30], [-3e9, 2, 5, 3e9]], np.float32)
  out = roi_pool(features[:1], boxes, 2)
  assert np.all(np.isfinite(np.asarray(out)))
  # Past the clamp, every bin of the first box contains the whole map or nothing.
  np.testing.assert_array_equal(
    np.asarray(out[1]), reference.roi_pool(features[:1], boxes[1:], [0], (2, 2), 1.0)[0][0]
  )


@pytest.mark.parametrize("per_image", [False, True])
def test_zero_boxes(per_image):
  features, _, _ = _fixed_problem()
  if per_image:
    boxes, kwargs, shape = np.zeros((2, 0, 4), np.float32), {}, (2, 0, 2, 2, 3)
  else:
    boxes, kwargs, shape = (
      np.zeros((0, 4), np.float32),
      {"box_indices": np.zeros(0, np.int32)},
      (0, 2, 2, 3),
    )
  out = jax.jit(lambda x: roi_pool(x, boxes, 2, **kwargs))(features)
  chex.assert_shape(out, shape)
  g = jax.grad(lambda x: roi_pool(x, boxes, 2, **kwargs).sum())(features)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


# ------------------------------------------------------------------ bad input


_GOOD = dict(features=np.zeros((2, 4, 4, 1), np.float32), boxes=np.zeros((3, 4), np.float32))


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (
      dict(features=np.zeros((4, 4, 1), np.float32)),
      ValueError,
      r"`features` must have rank 4.*\(4, 4, 1\)",
    ),
    (
      dict(features=np.zeros((2, 4, 4, 1), np.int32)),
      TypeError,
      r"`features` must have a floating dtype; got int32",
    ),
    (dict(features=np.zeros((2, 0, 4, 1), np.float32)), ValueError, r"H >= 1 and W >= 1"),
    (dict(boxes=np.zeros((3, 5), np.float32)), ValueError, r"`boxes` must be \[K, 4\].*\(3, 5\)"),
    (dict(boxes=np.zeros((3,), np.float32)), ValueError, r"`boxes` must be.*\(3,\)"),
    (dict(boxes=np.zeros((3, 4), bool)), TypeError, r"`boxes` must have a floating.*bool"),
    (
      dict(boxes=np.zeros((3, 2, 4), np.float32), box_indices=None),
      ValueError,
      r"N = features.shape\[0\] = 2",
    ),
    (dict(box_indices=None), ValueError, r"`box_indices` \[K\] is required.*N = 2"),
    (
      dict(box_indices=np.zeros(2, np.int32)),
      ValueError,
      r"`box_indices` must have shape \[K\] = \(3,\).*\(2,\)",
    ),
    (
      dict(box_indices=np.zeros(3, np.float32)),
      TypeError,
      r"`box_indices` must have an integer dtype; got float32",
    ),
    (dict(box_indices=np.array([0, 2, 1], np.int32)), ValueError, r"\[0, 2\).*\[0, 2\]"),
    (dict(output_size=0), ValueError, r"`output_size` must be positive; got 0"),
    (dict(output_size=(2, -1)), ValueError, r"`output_size` must be positive"),
    (dict(output_size=(2, 2, 2)), ValueError, r"`output_size` must be an int or a pair"),
    (dict(output_size=2.0), TypeError, r"`output_size` must be a static positive int"),
    (dict(spatial_scale=0.0), ValueError, r"`spatial_scale` must be positive and finite; got 0.0"),
    (dict(spatial_scale=float("nan")), ValueError, r"`spatial_scale` must be positive and finite"),
    (
      dict(spatial_scale=jnp.float32(0.5) + jnp.zeros(())),
      TypeError,
      r"`spatial_scale` must be a static",
    ),
    (
      dict(quantization="ceil"),
      ValueError,
      r"`quantization` must be one of \('round', 'floor'\); got 'ceil'",
    ),
  ],
)
def test_bad_input_raises_clear_error(kwargs, error, match):
  args = dict(_GOOD, output_size=2, box_indices=np.zeros(3, np.int32))
  args.update(kwargs)
  features, boxes, size = args.pop("features"), args.pop("boxes"), args.pop("output_size")
  with pytest.raises(error, match=match):
    roi_pool(features, boxes, size, **args)


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="rank 4"):
    jax.jit(lambda x: roi_pool(x, jnp.zeros((1, 4)), 2)).lower(jnp.zeros((4, 4, 1)))


def test_public_api():
  assert "roi_pool" in roipool_jax.__all__
  assert roipool_jax.roi_pool is roi_pool


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("nan", [np.nan, -np.nan], ids=["nan", "negative-nan"])
def test_nan_feature_gives_nan_bin_without_gradient_and_spares_other_boxes(dtype, nan):
  x = np.ones((1, 4, 4, 1), np.float32)
  x[0, 0, 0, 0] = nan
  x[0, 0, 1, 0] = np.inf  # the NaN wins over +inf, also in 16-bit order keys
  x[0, 1, 0, 0] = -2.0
  x = jnp.asarray(x, dtype)
  boxes = np.array([[0, 0, 1, 1], [2, 2, 3, 3]], np.float32)
  out = np.asarray(roi_pool(x, boxes, 1), np.float32)
  assert np.isnan(out[0, 0, 0, 0]) and out[1, 0, 0, 0] == 1.0
  loss = lambda y: jnp.nansum(roi_pool(y, boxes, 1).astype(jnp.float32))  # noqa: E731
  grad = np.asarray(jax.grad(loss)(x), np.float32)[0, :, :, 0]
  want = np.zeros((4, 4), np.float32)
  want[2, 2] = 1.0  # first maximal cell of the second box only
  np.testing.assert_array_equal(grad, want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_maps_rank_signs_infinities_and_zeros_as_float32(dtype):
  # 16-bit maps are searched by integer order keys (dtypes.order_keys), not by value:
  # negative values, subnormals, infinities and ties between -0 and +0 must give the
  # maxima and first arg-maxima of float32, in bins of 1 to ~200 cells.
  rng = np.random.default_rng(11)
  tiny = 2.0**-20  # subnormal in float16
  levels = np.float32([-np.inf, -3.5, -1.0, -tiny, -0.0, 0.0, tiny, 0.5, 2.0, np.inf])
  features = rng.choice(levels, (2, 16, 18, 6))
  features[1] = -np.abs(features[1])  # an image where every maximum is negative or zero
  lo = rng.uniform(-4, 16, (48, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0, 24, (48, 2))], 1).astype(np.float32)
  indices = rng.integers(0, 2, 48).astype(np.int32)
  x = jnp.asarray(features, dtype)
  op = lambda y: roi_pool(y, boxes, (3, 2), box_indices=indices)  # noqa: E731
  out, vjp = jax.vjp(op, x)
  want, argmax = reference.roi_pool(features, boxes, indices, (3, 2), 1.0)
  np.testing.assert_array_equal(np.asarray(out, np.float32), want)
  cot = rng.integers(-3, 4, argmax.shape).astype(np.float32)
  grad = np.asarray(vjp(jnp.asarray(cot, dtype))[0], np.float32)
  want_grad = reference.roi_pool_grad(features.shape, indices, argmax, cot)
  np.testing.assert_array_equal(grad, want_grad)
