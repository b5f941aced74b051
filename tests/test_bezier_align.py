"""bezier_align: mmcv's published values, the NumPy reference, straight regions, gradients."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import roipool_jax
from tests import reference

# mmcv's tests/test_ops/test_bezier_align.py: an NCHW map, rois (batch, 16 coordinates),
# a 4x4 output with sampling_ratio 1 and aligned=False, its output and the input gradient
# for a cotangent of ones.
MMCV_INPUT = [[[[1.0, 2, 5, 6], [3, 4, 7, 8], [9, 10, 13, 14], [11, 12, 15, 16]]]]
MMCV_ROIS = [[0.0, 0, 0, 1, 0, 2, 0, 3, 0, 3, 3, 2, 3, 1, 3, 0, 3]]
MMCV_OUTPUT = [
  [[[1.0, 1.75, 3.5, 5.25], [2.5, 3.25, 5, 6.75], [6, 6.75, 8.5, 10.25], [9.5, 10.25, 12, 13.75]]]
]
MMCV_GRAD = [
  [
    [
      [1.5625, 1.5625, 1.5625, 0.3125],
      [1.5625, 1.5625, 1.5625, 0.3125],
      [1.5625, 1.5625, 1.5625, 0.3125],
      [0.3125, 0.3125, 0.3125, 0.0625],
    ]
  ]
]


def nhwc(x, dtype=np.float32):
  return np.asarray(x, dtype).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_mmcv_published_values(dtype):
  rois = np.asarray(MMCV_ROIS)
  with jax.enable_x64(dtype == np.float64):
    boxes, indices = jnp.asarray(rois[:, 1:], dtype), rois[:, 0].astype(np.int32)

    def op(f):
      return roipool_jax.bezier_align(
        f, boxes, 4, sampling_ratio=1, aligned=False, box_indices=indices
      )

    out, vjp = jax.vjp(op, jnp.asarray(nhwc(MMCV_INPUT, dtype)))
    assert out.dtype == dtype
    np.testing.assert_allclose(
      np.asarray(out, np.float64), nhwc(MMCV_OUTPUT, np.float64), atol=1e-3
    )
    (grad,) = vjp(jnp.ones_like(out))
    np.testing.assert_allclose(np.asarray(grad, np.float64), nhwc(MMCV_GRAD, np.float64), atol=1e-3)


def beziers(rng, k, extent, bend, inside=False):
  """``[k, 16]`` Bezier boxes over a map of ``extent`` pixels: corners of a random box, edges
  bent by up to ``bend`` of its size (0: straight edges, control points at thirds); boxes
  ``inside`` the map lie in its middle."""
  lo = (rng.uniform(0.1, 0.4, (k, 2)) if inside else rng.uniform(-0.3, 1.0, (k, 2))) * extent
  hi = lo + (rng.uniform(0.3, 0.5, (k, 2)) if inside else rng.uniform(0.0, 1.0, (k, 2))) * extent
  t = np.array([0, 1 / 3, 2 / 3, 1])
  xs = lo[:, :1] + t * (hi[:, :1] - lo[:, :1])  # [k, 4], left to right
  size = (hi - lo)[:, 1:]
  top_y = lo[:, 1:] + rng.uniform(-bend, bend, (k, 4)) * size
  bottom_y = hi[:, 1:] + rng.uniform(-bend, bend, (k, 4)) * size
  top = np.stack([xs, top_y], -1)
  bottom = np.stack([xs, bottom_y], -1)[:, ::-1]  # stored right to left
  return np.concatenate([top, bottom], 1).reshape(k, 16)


@st.composite
def problems(draw):
  n = draw(st.sampled_from([1, 2]))
  height, width = draw(st.sampled_from([(1, 1), (5, 7), (9, 6)]))
  scale = draw(st.sampled_from([1.0, 0.5]))
  k = draw(st.sampled_from([1, 5]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  features = rng.standard_normal((n, height, width, 2)).astype(np.float32)
  boxes = beziers(rng, k, np.array([width, height]) / scale, draw(st.sampled_from([0.0, 0.3])))
  if k > 1 and draw(st.booleans()):
    boxes[0, 8:] = boxes[0, :8][[6, 7, 4, 5, 2, 3, 0, 1]]  # zero height: bottom = top
  indices = rng.integers(0, n, k).astype(np.int32)
  return features, boxes.astype(np.float32), indices, scale


@hypothesis.given(
  problems(), st.sampled_from([0, 1, 2]), st.sampled_from([(1, 1), (2, 3)]), st.booleans()
)
def test_matches_the_reference(problem, ratio, size, aligned):
  features, boxes, indices, scale = problem
  out = roipool_jax.bezier_align(
    features,
    boxes,
    size,
    spatial_scale=scale,
    sampling_ratio=ratio,
    aligned=aligned,
    box_indices=indices,
  )
  expected = reference.bezier_align(features, boxes, indices, size, scale, ratio, aligned)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


def test_bins_sit_at_region_points_and_their_size_is_the_curves_own_extent():
  # As mmcv: bin (i, j) is centred at the point (u, v) = (j / ow, i / oh) of the region
  # (not at a bin centre), and roi_h is the vertical extent of each curve's end points,
  # not the distance between the curves: a horizontal region has roi_h = 0.
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)  # x[0, h, w, 0] = 4 h + w
  flat = [0.0, 0, 2 / 3, 0, 4 / 3, 0, 2, 0, 2, 2, 4 / 3, 2, 2 / 3, 2, 0, 2]  # y = 0 to 2, x 0 to 2
  box = np.array([flat], np.float32)
  # Not aligned: roi_h = max(0, 1) = 1, bin_h = 1/2, one sample per bin at its point.
  out = roipool_jax.bezier_align(x, box, 2, aligned=False)[0, :, :, 0]
  np.testing.assert_allclose(out, [[0, 1], [4, 5]], atol=1e-6)
  # Aligned: roi_h = 0 gives no adaptive sample; a fixed grid samples the points (- 0.5).
  np.testing.assert_array_equal(roipool_jax.bezier_align(x, box, 2), 0.0)
  out = roipool_jax.bezier_align(x, box + 0.5, 2, sampling_ratio=2)[0, :, :, 0]
  # x: j -+ 0.25 (bin_w = 1), y: every sample on row i; at j = 0, x = -0.25 reads column 0.
  np.testing.assert_allclose(out, [[0.125, 1], [4.125, 5]], atol=1e-6)
  # A tilted top curve, from (0, 0) to (2, 1): roi_h = 1, bin_h = 1/2, the top row of
  # bins follows it (y = 0 and 0.5 at u = 0 and 1/2).
  tilted = box.copy()
  tilted[0, 1:8:2] = [0, 1 / 3, 2 / 3, 1]
  out = roipool_jax.bezier_align(x, tilted, 2, sampling_ratio=1, aligned=False)[0, :, :, 0]
  # centres: (0, 0), (1, 0.5) on the top row; (0, 1), (1, 1.25) below (v = 1/2).
  np.testing.assert_allclose(out, [[0, 3], [4, 6]], atol=1e-5)


BOXES = beziers(np.random.default_rng(11), 4, np.array([10.0, 9.0]), 0.25, inside=True)
INDICES = np.array([0, 1, 1, 0], np.int32)


def _features(seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((2, 9, 10, 3)).astype(dtype)


def _op(features, boxes, indices=INDICES, **options):
  return roipool_jax.bezier_align(features, boxes, (2, 3), box_indices=indices, **options)


@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_float64_gradients_pass_check_grads(ratio, aligned):
  with jax.enable_x64(True):
    features = jnp.asarray(_features(1, np.float64))

    def op(f, b):
      return _op(f, b, sampling_ratio=ratio, aligned=aligned)

    assert op(features, BOXES).dtype == jnp.float64
    check_grads(op, (features, jnp.asarray(BOXES)), order=1, modes=("rev",), eps=1e-6)


def test_box_gradients_match_central_differences_on_all_sixteen_coordinates():
  with jax.enable_x64(True):
    features = jnp.asarray(_features(2, np.float64))
    cot = np.random.default_rng(3).standard_normal((4, 2, 3, 3))

    def loss(b):
      return jnp.vdot(_op(features, b), cot)

    numeric = reference.central_differences(loss, jnp.asarray(BOXES), 1e-6)
    grad = jax.grad(loss)(jnp.asarray(BOXES))
    assert np.count_nonzero(grad) > 0.9 * grad.size  # every coordinate moves samples
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-8)


def test_jit_vmap_and_per_image_boxes_agree():
  features = _features()
  boxes = BOXES.astype(np.float32)
  eager = _op(features, boxes)
  np.testing.assert_array_equal(jax.jit(_op)(features, boxes, INDICES), eager)
  mapped = jax.vmap(_op, in_axes=(None, 0, None))(features, np.stack([boxes, boxes[::-1]]), INDICES)
  # vmap compiles another program; XLA:CPU may contract its multiply-adds into FMAs
  # differently there, so the two agree to a few ulps rather than bit for bit.
  np.testing.assert_allclose(mapped[0], eager, rtol=4e-6, atol=1e-6)
  per_image = np.stack([boxes[[0, 3]], boxes[[1, 2]]])
  out = _op(features, per_image, None)
  flat = _op(features, per_image.reshape(4, 16), np.array([0, 0, 1, 1], np.int32))
  np.testing.assert_array_equal(out.reshape(flat.shape), flat)


def test_degenerate_boxes_give_zeros_and_do_not_touch_other_boxes():
  features = _features()
  boxes = BOXES.astype(np.float32)
  bad = np.tile(boxes[:1], (4, 1))
  bad[0, 3] = np.nan
  bad[1, 12] = -np.inf
  bad[2] += 1e30  # far outside
  bad[3, :8] = 0.0  # zero size with aligned=True: no adaptive sample
  bad[3, 8:] = 0.0
  mixed = np.concatenate([boxes, bad])
  indices = np.concatenate([INDICES, np.zeros(len(bad), np.int32)])
  out = _op(features, mixed, indices)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:4], _op(features, boxes))
  np.testing.assert_array_equal(out[4:], 0.0)

  def loss(f, b, rows):
    return jnp.sum(_op(f, b, indices)[rows] ** 2)

  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, np.arange(4))
  clean = jax.grad(lambda f: jnp.sum(_op(f, boxes) ** 2))(features)
  np.testing.assert_allclose(grad_f, clean, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad_b[4:], 0.0)
  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, np.arange(4, 8))
  assert np.all(np.isfinite(grad_f)) and np.all(np.isfinite(grad_b))
  np.testing.assert_array_equal(grad_f, 0.0)
  np.testing.assert_array_equal(grad_b, 0.0)


def test_empty_inputs_work_forward_and_backward():
  features = _features()
  none = np.zeros((0, 16), np.float32)

  def op(f):
    return _op(f, none, np.zeros(0, np.int32))

  assert op(features).shape == (0, 2, 3, 3)
  np.testing.assert_array_equal(jax.grad(lambda f: jnp.sum(op(f)))(features), 0.0)
  out = roipool_jax.bezier_align(features[:0], np.zeros((0, 2, 16), np.float32), 2)
  assert out.shape == (0, 2, 2, 2, 3)


def test_bf16_features_keep_their_dtype():
  features = _features()
  out = _op(features.astype(jnp.bfloat16), BOXES)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), _op(features, BOXES), rtol=2e-2, atol=2e-2)


def test_mmcv_rois_name_the_fix():
  rois = np.concatenate([INDICES[:, None], BOXES], 1)  # mmcv's [K, 17]
  with pytest.raises(ValueError, match=r"Bezier rois \[K, 17\].*boxes=rois\[:, 1:\]"):
    roipool_jax.bezier_align(_features(), rois, 2)
