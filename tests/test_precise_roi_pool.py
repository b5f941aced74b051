"""Tests of roipool_jax.precise_roi_pool: mmcv's published values, two NumPy references
(closed form and Gauss-Legendre quadrature), exact gradients, degenerate boxes."""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st
from jax.test_util import check_grads

import roipool_jax
from roipool_jax import precise_roi_pool
from tests import reference
from tests.quick import some

IMPLS = ["gather", "einsum"]

# mmcv's tests/test_ops/test_prroi_pool.py: NCHW input, rois (index, x1, y1, x2, y2),
# 2x2 output; expected output, input gradient and rois gradient of out.sum().
MMCV_CASES = [
  (
    [[[[1.0, 2.0], [3.0, 4.0]]]],
    [0.0, 0.0, 1.0, 1.0],
    [[[[1.75, 2.25], [2.75, 3.25]]]],
    [[[[1.0, 1.0], [1.0, 1.0]]]],
    [2.0, 4.0, 2.0, 4.0],
  ),
  (
    [[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 1.0]]]],
    [0.0, 0.0, 1.0, 1.0],
    [[[[1.75, 2.25], [2.75, 3.25]], [[3.25, 2.75], [2.25, 1.75]]]],
    [[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]],
    [0.0, 0.0, 0.0, 0.0],
  ),
  (
    [[[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0], [9.0, 10.0, 13.0, 14.0], [11, 12, 15, 16]]]],
    [0.0, 0.0, 3.0, 3.0],
    [[[[3.75, 6.91666651], [10.08333302, 13.25]]]],
    [
      [
        [
          [0.11111111, 0.22222224, 0.22222222, 0.11111111],
          [0.22222224, 0.444444448, 0.44444448, 0.22222224],
          [0.22222224, 0.44444448, 0.44444448, 0.22222224],
          [0.11111111, 0.22222224, 0.22222224, 0.11111111],
        ]
      ]
    ],
    [3.33333302, 6.66666603, 3.33333349, 6.66666698],
  ),
]


def nhwc(x):
  return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(len(MMCV_CASES)))
def test_mmcv_published_values(case, impl):
  features, box, expected, feature_grad, box_grad = MMCV_CASES[case]
  boxes = np.array([box], np.float32)

  def loss(f, b):
    return jnp.sum(precise_roi_pool(f, b, 2, impl=impl))

  out = precise_roi_pool(nhwc(features), boxes, 2, impl=impl)
  np.testing.assert_allclose(out, nhwc(expected), rtol=1e-6)
  grad_f, grad_b = jax.grad(loss, (0, 1))(nhwc(features), boxes)
  np.testing.assert_allclose(grad_f, nhwc(feature_grad), rtol=1e-6)
  np.testing.assert_allclose(grad_b[0], box_grad, rtol=1e-6, atol=1e-6)


@st.composite
def problems(draw, degenerate=True):
  n = draw(st.sampled_from([1, 2]))
  height, width = draw(st.sampled_from([(1, 1), (5, 7), (9, 6)]))
  scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
  k = draw(st.sampled_from([1, 7]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  features = rng.standard_normal((n, height, width, 2)).astype(np.float32)
  extent = np.array([width, height]) / scale
  lo = rng.uniform(-0.4, 1.2, (k, 2)) * extent
  boxes = np.concatenate([lo, lo + rng.uniform(0.0, 1.0, (k, 2)) * extent], 1)
  snap = rng.random((k, 4)) < 0.3  # edges on cell lines
  boxes = np.where(snap, np.round(boxes * scale) / scale, boxes)
  if degenerate and k > 1:
    boxes[0, 2] = boxes[0, 0]  # zero width
    boxes[1, [1, 3]] = boxes[1, [3, 1]]  # inverted
    boxes[2] = [-50, -50, -20, -20]  # outside
  return features, boxes.astype(np.float32), rng.integers(0, n, k).astype(np.int32), scale


@hypothesis.settings(max_examples=min(8, hypothesis.settings().max_examples))
@hypothesis.given(problems(), st.sampled_from([(1, 1), (2, 3), (4, 4)]), st.sampled_from(IMPLS))
def test_matches_both_references(problem, size, impl):
  features, boxes, indices, scale = problem
  out = precise_roi_pool(features, boxes, size, spatial_scale=scale, box_indices=indices, impl=impl)
  closed = reference.precise_roi_pool(features, boxes, indices, size, scale)
  quadrature = reference.precise_roi_pool_quadrature(features, boxes, indices, size, scale)
  np.testing.assert_allclose(closed, quadrature, rtol=1e-9, atol=1e-12)  # the references agree
  np.testing.assert_allclose(out, closed, rtol=2e-5, atol=2e-6)


@hypothesis.settings(max_examples=min(8, hypothesis.settings().max_examples))
@hypothesis.given(st.integers(0, 2**16), st.sampled_from([(1, 1), (3, 2)]))
def test_bins_over_whole_cells_of_a_constant_map_return_the_constant(seed, size):
  # Inside [0, H - 1] x [0, W - 1] the interpolated map of a constant map is that constant.
  rng = np.random.default_rng(seed)
  value = rng.uniform(-3, 3)
  features = np.full((1, 8, 9, 2), value, np.float32)
  lo = rng.integers(0, 4, 2)
  hi = lo + rng.integers(1, 5, 2) * np.array(size[::-1])
  boxes = np.concatenate([lo, np.minimum(hi, [8, 7])])[None].astype(np.float32)
  hypothesis.assume(np.all(boxes[0, 2:] > boxes[0, :2]))
  out = precise_roi_pool(features, boxes, size)
  np.testing.assert_allclose(out, value, rtol=1e-6)


def _problem64():
  rng = np.random.default_rng(7)
  features = rng.standard_normal((2, 8, 9, 3))
  boxes = np.array([[0.3, 1.2, 6.6, 5.9], [2.1, -0.7, 9.4, 4.2], [1.5, 1.5, 3.25, 7.75]])
  return features, boxes, np.array([0, 1, 0], np.int32)


@pytest.mark.parametrize("impl", some(IMPLS))
def test_float64_gradients_pass_check_grads(impl):
  features, boxes, indices = _problem64()
  with jax.enable_x64(True):

    def op(f, b):
      return precise_roi_pool(f, b, (2, 3), box_indices=indices, impl=impl)

    assert op(jnp.asarray(features), jnp.asarray(boxes)).dtype == jnp.float64
    args = (jnp.asarray(features), jnp.asarray(boxes))
    check_grads(op, args, order=1, modes=("rev",))
    check_grads(op, args, order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("impl", some(IMPLS, 1))
def test_box_gradient_matches_central_differences_of_the_numpy_reference(impl):
  features, boxes, indices = _problem64()
  cot = np.random.default_rng(3).standard_normal((3, 2, 3, 3))

  def reference_loss(b):
    return np.vdot(reference.precise_roi_pool(features, np.asarray(b), indices, (2, 3), 0.5), cot)

  with jax.enable_x64(True):
    numeric = reference.central_differences(reference_loss, jnp.asarray(boxes), 1e-6)

    def loss(b):
      out = precise_roi_pool(features, b, (2, 3), spatial_scale=0.5, box_indices=indices, impl=impl)
      return jnp.vdot(out, cot)

    grad = jax.grad(loss)(jnp.asarray(boxes))
    value = loss(jnp.asarray(boxes))
  np.testing.assert_allclose(value, reference_loss(boxes), rtol=1e-12)
  assert np.all(np.abs(grad) > 1e-3)  # every coordinate moves the output
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_float64_resolves_what_float32_cannot():
  with jax.enable_x64(True):
    features = jnp.full((1, 6, 6, 1), 1.0 + 1e-12, jnp.float64)
    out = precise_roi_pool(features, jnp.array([[1.0, 1.0, 4.0, 4.0]]), 3)
    np.testing.assert_allclose(np.asarray(out) - 1.0, 1e-12, rtol=1e-3)


def test_box_gradient_is_what_roi_pool_lacks():
  features = np.random.default_rng(0).standard_normal((1, 10, 10, 2)).astype(np.float32)
  box = np.array([[2.3, 2.7, 7.1, 6.4]], np.float32)
  grad = jax.grad(lambda b: jnp.sum(precise_roi_pool(features, b, 3) ** 2))(box)
  flat = jax.grad(lambda b: jnp.sum(roipool_jax.roi_pool(features, b, 3) ** 2))(box)
  assert np.all(grad != 0.0) and np.all(flat == 0.0)


@pytest.mark.parametrize("impl", some(IMPLS, 1, start=1))
def test_degenerate_boxes_are_finite_and_do_not_touch_other_boxes(impl):
  features, boxes, indices = _problem64()
  features, boxes = features.astype(np.float32), boxes.astype(np.float32)
  bad = np.array(
    [
      [np.nan, 1, 5, 5],
      [1, 1, np.inf, 5],
      [5, 5, 1, 1],  # inverted
      [3, 3, 3, 6],  # zero width
      [1e30, 1e30, 2e30, 2e30],  # far outside
      [-1e30, -1e30, 1e30, 1e30],  # huge: the mean of the map over its area
    ],
    np.float32,
  )
  mixed = np.concatenate([boxes, bad])
  mixed_indices = np.concatenate([indices, np.zeros(len(bad), np.int32)])

  def op(f, b):
    return precise_roi_pool(f, b, (2, 3), box_indices=mixed_indices, impl=impl)

  out = op(features, mixed)
  assert np.all(np.isfinite(out))
  alone = precise_roi_pool(features, boxes, (2, 3), box_indices=indices, impl=impl)
  np.testing.assert_array_equal(out[:3], alone)
  np.testing.assert_array_equal(out[3:8], 0.0)

  def loss(f, b, rows):
    return jnp.sum(op(f, b)[rows] ** 2)

  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, np.arange(3))
  clean_f = jax.grad(
    lambda f: jnp.sum(precise_roi_pool(f, boxes, (2, 3), box_indices=indices, impl=impl) ** 2)
  )(features)
  np.testing.assert_allclose(grad_f, clean_f, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad_b[3:], 0.0)
  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, np.arange(3, 9))
  assert np.all(np.isfinite(grad_f)) and np.all(np.isfinite(grad_b))
  np.testing.assert_array_equal(grad_b[:8], 0.0)


def test_jit_vmap_and_per_image_boxes_agree():
  features, boxes, indices = _problem64()
  features, boxes = features.astype(np.float32), boxes.astype(np.float32)

  def op(f, b, i):
    return precise_roi_pool(f, b, (2, 3), box_indices=i)

  eager = op(features, boxes, indices)
  np.testing.assert_array_equal(jax.jit(op)(features, boxes, indices), eager)
  mapped = jax.vmap(op, in_axes=(None, 0, None))(features, np.stack([boxes, boxes[::-1]]), indices)
  np.testing.assert_array_equal(mapped[0], eager)
  per_image = np.stack([boxes[[0, 2]], boxes[[1, 1]]])
  out = op(features, per_image, None)
  flat = op(features, per_image.reshape(4, 4), np.array([0, 0, 1, 1], np.int32))
  np.testing.assert_array_equal(out.reshape(flat.shape), flat)


def test_einsum_has_no_gather_or_scatter_and_matches_gather():
  features, boxes, indices = _problem64()
  features, boxes = features.astype(np.float32), boxes.astype(np.float32)

  def loss(f, b, impl):
    return jnp.sum(precise_roi_pool(f, b, (2, 3), box_indices=indices, impl=impl) ** 2)

  texts = {}
  for impl in IMPLS:
    fn = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    texts[impl] = fn.lower(features, boxes, impl).compile().as_text()
  for op in ("gather(", "scatter("):
    assert op in texts["gather"]  # the check can fail
    assert op not in texts["einsum"]
  g_gather = jax.grad(loss, (0, 1))(features, boxes, "gather")
  g_einsum = jax.grad(loss, (0, 1))(features, boxes, "einsum")
  for a, b in zip(g_gather, g_einsum, strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_feature_gradient_is_bitwise_reproducible():
  features, boxes, indices = _problem64()
  boxes = np.concatenate([boxes] * 8).astype(np.float32)
  indices = np.concatenate([indices] * 8)
  grad = jax.jit(
    jax.grad(lambda f: jnp.sum(precise_roi_pool(f, boxes, 3, box_indices=indices) ** 2))
  )
  features = features.astype(np.float32)
  np.testing.assert_array_equal(grad(features), grad(features))


def test_bf16_features_keep_their_dtype():
  features, boxes, indices = _problem64()
  out = precise_roi_pool(features.astype(jnp.bfloat16), boxes, 2, box_indices=indices)
  assert out.dtype == jnp.bfloat16
  want = precise_roi_pool(
    features.astype(jnp.bfloat16).astype(np.float32), boxes, 2, box_indices=indices
  )
  np.testing.assert_allclose(out.astype(np.float32), want, rtol=1e-2, atol=1e-2)
