"""roi_align_rotated: mmcv's published values, the NumPy reference, geometry, gradients."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import roipool_jax
from tests import reference
from tests.quick import examples

# mmcv's tests/test_ops/test_roi_align_rotated.py: NCHW input, rois (batch, cx, cy, w, h,
# theta in radians), output and input gradient (cotangent of ones) for a 2x2 output,
# spatial_scale 1, sampling_ratio 2, aligned=True.
MMCV = [
  (
    [[[[1.0, 2.0], [3.0, 4.0]]]],
    [[0.0, 0.5, 0.5, 1.0, 1.0, 0]],
    [[[[1.0, 1.25], [1.5, 1.75]]]],
    [[[[3.0625, 0.4375], [0.4375, 0.0625]]]],
  ),
  (
    [[[[1.0, 2.0], [3.0, 4.0]]]],
    [[0.0, 0.5, 0.5, 1.0, 1.0, np.pi / 2]],
    [[[[1.5, 1], [1.75, 1.25]]]],
    [[[[3.0625, 0.4375], [0.4375, 0.0625]]]],
  ),
  (
    [[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 1.0]]]],
    [[0.0, 0.5, 0.5, 1.0, 1.0, 0]],
    [[[[1.0, 1.25], [1.5, 1.75]], [[4.0, 3.75], [3.5, 3.25]]]],
    [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]],
  ),
  (
    [[[[1, 2, 5, 6], [3, 4, 7, 8], [9, 10, 13, 14], [11, 12, 15, 16.0]]]],
    [[0.0, 1.5, 1.5, 3.0, 3.0, 0]],
    [[[[1.9375, 4.75], [7.5625, 10.375]]]],
    [
      [
        [
          [0.47265625, 0.42968750, 0.42968750, 0.04296875],
          [0.42968750, 0.39062500, 0.39062500, 0.03906250],
          [0.42968750, 0.39062500, 0.39062500, 0.03906250],
          [0.04296875, 0.03906250, 0.03906250, 0.00390625],
        ]
      ]
    ],
  ),
  (
    [[[[1, 2, 5, 6], [3, 4, 7, 8], [9, 10, 13, 14], [11, 12, 15, 16.0]]]],
    [[0.0, 1.5, 1.5, 3.0, 3.0, np.pi / 2]],
    [[[[7.5625, 1.9375], [10.375, 4.75]]]],
    [
      [
        [
          [0.47265625, 0.42968750, 0.42968750, 0.04296875],
          [0.42968750, 0.39062500, 0.39062500, 0.03906250],
          [0.42968750, 0.39062500, 0.39062500, 0.03906250],
          [0.04296875, 0.03906250, 0.03906250, 0.00390625],
        ]
      ]
    ],
  ),
]


def nhwc(x):
  return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("case", range(len(MMCV)))
def test_mmcv_published_values(case):
  x, rois, expected, expected_grad = MMCV[case]
  rois = np.asarray(rois, np.float32)
  boxes = rois[:, 1:].copy()
  boxes[:, 4] = np.degrees(boxes[:, 4])  # mmcv's radians to degrees
  indices = rois[:, 0].astype(np.int32)

  def op(f):
    return roipool_jax.roi_align_rotated(f, boxes, 2, sampling_ratio=2, box_indices=indices)

  out, vjp = jax.vjp(op, jnp.asarray(nhwc(x)))
  np.testing.assert_allclose(out, nhwc(expected), atol=1e-5)
  (grad,) = vjp(jnp.ones_like(out))
  np.testing.assert_allclose(grad, nhwc(expected_grad), atol=1e-5)


@st.composite
def problems(draw, degenerate=True):
  n = draw(st.sampled_from([1, 2]))
  height, width = draw(st.sampled_from([(1, 1), (5, 7), (9, 6)]))
  scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
  k = draw(st.sampled_from([1, 6]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  features = rng.standard_normal((n, height, width, 2)).astype(np.float32)
  extent = np.array([width, height]) / scale
  centre = rng.uniform(-0.3, 1.3, (k, 2)) * extent
  size = rng.uniform(0.0, 1.2, (k, 2)) * extent
  angle = rng.uniform(-400, 400, (k, 1))
  boxes = np.concatenate([centre, size, angle], 1)
  if degenerate and k > 1:
    boxes[0, 2] = 0.0  # zero width
    boxes[1, 3] = -boxes[1, 3]  # negative height
    boxes[2, 4] = draw(st.sampled_from([0.0, 90.0, -180.0, 45.0]))
  indices = rng.integers(0, n, k).astype(np.int32)
  return features, boxes.astype(np.float32), indices, scale


@hypothesis.given(
  problems(),
  st.sampled_from([-1, 1, 2]),
  st.sampled_from([(1, 1), (2, 3)]),
  st.booleans(),
  st.booleans(),
)
def test_matches_the_reference(problem, ratio, size, aligned, clockwise):
  features, boxes, indices, scale = problem
  out = roipool_jax.roi_align_rotated(
    features,
    boxes,
    size,
    spatial_scale=scale,
    sampling_ratio=ratio,
    aligned=aligned,
    clockwise=clockwise,
    box_indices=indices,
  )
  expected = reference.roi_align_rotated(
    features, boxes, indices, size, scale, ratio, aligned, clockwise
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


@hypothesis.settings(max_examples=examples(3))  # both sides of the identity compile
@hypothesis.given(problems(degenerate=False), st.sampled_from([-1, 2]), st.booleans())
def test_angle_zero_is_roi_align_of_the_same_box(problem, ratio, aligned):
  features, boxes, indices, scale = problem
  boxes[:, 4] = 0.0
  if not aligned:  # roi_align's minimum size keeps x1, the rotated one keeps the centre
    boxes[:, 2:4] = np.maximum(boxes[:, 2:4], 1.0 / scale)
  centre, half = boxes[:, :2], boxes[:, 2:4] / 2
  corners = np.concatenate([centre - half, centre + half], 1)
  options = dict(spatial_scale=scale, sampling_ratio=ratio, aligned=aligned, box_indices=indices)
  out = roipool_jax.roi_align_rotated(features, boxes, (2, 3), **options)
  expected = roipool_jax.roi_align(features, corners, (2, 3), **options)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@hypothesis.settings(max_examples=examples(3))  # both sides of the identity compile
@hypothesis.given(problems(degenerate=False), st.sampled_from([-1, 2]))
def test_half_a_turn_reverses_the_bins_and_clockwise_negates_the_angle(problem, ratio):
  features, boxes, indices, scale = problem
  options = dict(spatial_scale=scale, sampling_ratio=ratio, box_indices=indices)
  out = roipool_jax.roi_align_rotated(features, boxes, (2, 3), **options)
  turned = boxes.copy()
  turned[:, 4] += 180.0
  half_turn = roipool_jax.roi_align_rotated(features, turned, (2, 3), **options)
  np.testing.assert_allclose(half_turn, out[:, ::-1, ::-1], rtol=1e-4, atol=1e-4)
  mirrored = boxes.copy()
  mirrored[:, 4] = -mirrored[:, 4]
  clockwise = roipool_jax.roi_align_rotated(features, mirrored, (2, 3), clockwise=True, **options)
  np.testing.assert_array_equal(clockwise, out)


def test_a_box_much_larger_than_the_map_matches_the_reference():
  """Adaptive grids of 100+ samples per bin axis; only those near the map are visited."""
  rng = np.random.default_rng(5)
  features = rng.standard_normal((1, 4, 5, 3)).astype(np.float32)
  boxes = np.array([[2.5, 2.0, 150.0, 120.0, 30.0], [2.0, 2.0, 60.0, 8.0, -75.0]], np.float32)
  indices = np.zeros(2, np.int32)
  out = roipool_jax.roi_align_rotated(features, boxes, 2, box_indices=indices)
  expected = reference.roi_align_rotated(features, boxes, indices, (2, 2), 1.0, -1, True, False)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


BOXES = np.array(
  [
    [4.3, 3.7, 5.1, 3.3, 17.0],
    [5.2, 4.1, 7.3, 5.9, -63.0],
    [2.1, 6.3, 9.7, 4.4, 131.0],
    [6.6, 2.4, 3.1, 8.2, 250.0],
  ]
)
INDICES = np.array([0, 1, 1, 0], np.int32)


def _features(seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((2, 9, 10, 3)).astype(dtype)


@pytest.mark.parametrize("ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_float64_gradients_pass_check_grads(ratio, aligned):
  with jax.enable_x64(True):
    features = jnp.asarray(_features(1, np.float64))

    def op(f, b):
      return roipool_jax.roi_align_rotated(
        f, b, (2, 3), sampling_ratio=ratio, aligned=aligned, box_indices=INDICES
      )

    assert op(features, BOXES).dtype == jnp.float64
    check_grads(op, (features, jnp.asarray(BOXES)), order=1, modes=("rev",))
    check_grads(op, (features, jnp.asarray(BOXES)), order=1, modes=("rev",), eps=1e-6)


def test_box_gradients_match_central_differences_on_all_five_parameters():
  with jax.enable_x64(True):
    features = jnp.asarray(_features(2, np.float64))
    cot = np.random.default_rng(3).standard_normal((4, 2, 3, 3))

    def loss(b):
      return jnp.vdot(roipool_jax.roi_align_rotated(features, b, (2, 3), box_indices=INDICES), cot)

    numeric = reference.central_differences(loss, jnp.asarray(BOXES), 1e-6)
    grad = jax.grad(loss)(jnp.asarray(BOXES))
    assert np.all(np.abs(grad[:, 4]) > 0)  # the angle has a gradient
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-8)


def test_jit_vmap_and_per_image_boxes_agree():
  features = _features()
  boxes = BOXES.astype(np.float32)

  def op(f, b, i):
    return roipool_jax.roi_align_rotated(f, b, (2, 3), box_indices=i)

  eager = op(features, boxes, INDICES)
  np.testing.assert_array_equal(jax.jit(op)(features, boxes, INDICES), eager)
  mapped = jax.vmap(op, in_axes=(None, 0, None))(features, np.stack([boxes, boxes[::-1]]), INDICES)
  np.testing.assert_array_equal(mapped[0], eager)
  per_image = np.stack([boxes[[0, 3]], boxes[[1, 2]]])
  out = op(features, per_image, None)
  flat = op(features, per_image.reshape(4, 5), np.array([0, 0, 1, 1], np.int32))
  np.testing.assert_array_equal(out.reshape(flat.shape), flat)


def test_degenerate_boxes_give_zeros_and_do_not_touch_other_boxes():
  features = _features()
  boxes = BOXES.astype(np.float32)
  bad = np.array(
    [
      [np.nan, 1, 5, 5, 0],
      [1, 1, 5, 5, np.inf],
      [4, 4, -3, 5, 10],  # negative width
      [4, 4, 0, 0, 10],  # zero size (adaptive: no sample)
      [1e30, 1e30, 5, 5, 10],  # far outside
      [4, 4, 1e30, 1e30, 1e30],  # huge
    ],
    np.float32,
  )
  mixed = np.concatenate([boxes, bad])
  indices = np.concatenate([INDICES, np.zeros(len(bad), np.int32)])

  def op(f, b):
    return roipool_jax.roi_align_rotated(f, b, (2, 3), box_indices=indices)

  out = op(features, mixed)
  assert np.all(np.isfinite(out))
  alone = roipool_jax.roi_align_rotated(features, boxes, (2, 3), box_indices=INDICES)
  np.testing.assert_array_equal(out[:4], alone)
  np.testing.assert_array_equal(out[4:9], 0.0)

  def loss(f, b, rows):
    return jnp.sum(op(f, b)[rows] ** 2)

  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, np.arange(4))
  clean = jax.grad(
    lambda f: jnp.sum(roipool_jax.roi_align_rotated(f, boxes, (2, 3), box_indices=INDICES) ** 2)
  )(features)
  np.testing.assert_allclose(grad_f, clean, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad_b[4:], 0.0)
  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, np.arange(4, 10))
  assert np.all(np.isfinite(grad_f)) and np.all(np.isfinite(grad_b))
  np.testing.assert_array_equal(grad_b[:9], 0.0)


def test_empty_inputs_work_forward_and_backward():
  features = _features()
  none = np.zeros((0, 5), np.float32)

  def op(f):
    return roipool_jax.roi_align_rotated(f, none, 2, box_indices=np.zeros(0, np.int32))

  assert op(features).shape == (0, 2, 2, 3)
  np.testing.assert_array_equal(jax.grad(lambda f: jnp.sum(op(f)))(features), 0.0)
  out = roipool_jax.roi_align_rotated(features[:0], np.zeros((0, 2, 5), np.float32), 2)
  assert out.shape == (0, 2, 2, 2, 3)


def test_feature_gradient_is_bitwise_reproducible():
  features = _features(4)
  boxes = np.concatenate([BOXES] * 8).astype(np.float32)
  indices = np.concatenate([INDICES] * 8)
  grad = jax.jit(
    jax.grad(
      lambda f: jnp.sum(roipool_jax.roi_align_rotated(f, boxes, 3, box_indices=indices) ** 2)
    )
  )
  np.testing.assert_array_equal(grad(features), grad(features))


def test_bf16_features_keep_their_dtype():
  features = _features()
  out = roipool_jax.roi_align_rotated(features.astype(jnp.bfloat16), BOXES, 2, box_indices=INDICES)
  assert out.dtype == jnp.bfloat16
  expected = roipool_jax.roi_align_rotated(features, BOXES, 2, box_indices=INDICES)
  np.testing.assert_allclose(out.astype(np.float32), expected, rtol=2e-2, atol=2e-2)


def test_rotated_rois_name_the_fix():
  rois = np.concatenate([INDICES[:, None], BOXES], 1)  # detectron2's [K, 6]
  with pytest.raises(ValueError, match=r"boxes=rois\[:, 1:\]"):
    roipool_jax.roi_align_rotated(_features(), rois, 2)
  with pytest.raises(ValueError, match=r"\[K, 5\]"):
    roipool_jax.roi_align_rotated(_features(), BOXES[:, :4], 2, box_indices=INDICES)
