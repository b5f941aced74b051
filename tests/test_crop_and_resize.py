"""Tests of crop_and_resize: TensorFlow's published cases and formula, pixel boxes, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roipool_jax import crop_and_resize, roi_align
from tests import fixtures_io, reference
from tests.quick import some

# ------------------------------------------------------------------ TensorFlow's own cases
# The expected arrays of tensorflow/core/kernels/image/crop_and_resize_op_test.cc, written out.

IMAGE_2X2 = np.array([1, 2, 3, 4], np.float32).reshape(1, 2, 2, 1)
IMAGE_3X3 = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)


def _tf(image, boxes, crop, method="bilinear", extrapolation_value=0.0, box_indices=None):
  boxes = np.asarray(boxes, np.float32)
  if box_indices is None:
    box_indices = np.zeros(len(boxes), np.int32)
  out = crop_and_resize(
    image,
    boxes,
    crop,
    box_indices=box_indices,
    box_format="tf",
    method=method,
    extrapolation_value=extrapolation_value,
  )
  return np.asarray(out)[..., 0]


TF_CASES = [
  # (name, image, boxes, crop, method, expected [K, ch, cw])
  ("2x2 to 1x1", IMAGE_2X2, [[0, 0, 1, 1]], 1, "bilinear", [[[2.5]]]),
  ("2x2 to 1x1 nearest", IMAGE_2X2, [[0, 0, 1, 1]], 1, "nearest", [[[4.0]]]),
  ("2x2 to 1x1 flipped", IMAGE_2X2, [[1, 1, 0, 0]], 1, "bilinear", [[[2.5]]]),
  ("2x2 to 1x1 flipped nearest", IMAGE_2X2, [[1, 1, 0, 0]], 1, "nearest", [[[4.0]]]),
  (
    "2x2 to 3x3",
    IMAGE_2X2,
    [[0, 0, 1, 1]],
    3,
    "bilinear",
    [[[1, 1.5, 2], [2, 2.5, 3], [3, 3.5, 4]]],
  ),
  (
    "2x2 to 3x3 nearest",
    IMAGE_2X2,
    [[0, 0, 1, 1]],
    3,
    "nearest",
    [[[1, 2, 2], [3, 4, 4], [3, 4, 4]]],
  ),
  (
    "2x2 to 3x3 flipped",
    IMAGE_2X2,
    [[1, 1, 0, 0]],
    3,
    "bilinear",
    [[[4, 3.5, 3], [3, 2.5, 2], [2, 1.5, 1]]],
  ),
  (
    "2x2 to 3x3 flipped nearest",
    IMAGE_2X2,
    [[1, 1, 0, 0]],
    3,
    "nearest",
    [[[4, 4, 3], [4, 4, 3], [2, 2, 1]]],
  ),
  (
    "3x3 to 2x2",
    IMAGE_3X3,
    [[0, 0, 1, 1], [0, 0, 0.5, 0.5]],
    2,
    "bilinear",
    [[[1, 3], [7, 9]], [[1, 2], [4, 5]]],
  ),
  (
    "3x3 to 2x2 nearest",
    IMAGE_3X3,
    [[0, 0, 1, 1], [0, 0, 0.5, 0.5]],
    2,
    "nearest",
    [[[1, 3], [7, 9]], [[1, 2], [4, 5]]],
  ),
  (
    "3x3 to 2x2 flipped",
    IMAGE_3X3,
    [[1, 1, 0, 0], [0.5, 0.5, 0, 0]],
    2,
    "bilinear",
    [[[9, 7], [3, 1]], [[5, 4], [2, 1]]],
  ),
  (
    "3x3 to 2x2 flipped nearest",
    IMAGE_3X3,
    [[1, 1, 0, 0], [0.5, 0.5, 0, 0]],
    2,
    "nearest",
    [[[9, 7], [3, 1]], [[5, 4], [2, 1]]],
  ),
]


@pytest.mark.parametrize("impl", some(["gather", "einsum"]))
@pytest.mark.parametrize("name, image, boxes, crop, method, expected", TF_CASES)
def test_tensorflow_published_cases(name, image, boxes, crop, method, expected, impl):
  out = crop_and_resize(
    image,
    np.asarray(boxes, np.float32),
    crop,
    box_indices=np.zeros(len(boxes), np.int32),
    box_format="tf",
    method=method,
    impl=impl,
  )
  np.testing.assert_array_equal(np.asarray(out)[..., 0], np.asarray(expected, np.float32))


def test_tensorflow_extrapolated_case():
  # "2x2 to 3x3 extrapolated": the box starts one image outside, value -1 there.
  v = -1.0
  expected = [[[v, v, v], [v, 1, 2], [v, 3, 4]]]
  np.testing.assert_array_equal(
    _tf(IMAGE_2X2, [[-1, -1, 1, 1]], 3, extrapolation_value=v), expected
  )


@pytest.mark.parametrize("dtype", some([np.uint8, np.uint16, np.int8, np.int16, np.int32], 2))
@pytest.mark.parametrize("method, expected", [("bilinear", 2.5), ("nearest", 4.0)])
def test_tensorflow_integer_images_give_float32(dtype, method, expected):
  out = crop_and_resize(
    IMAGE_2X2.astype(dtype), np.array([[0, 0, 1, 1]], np.float32), 1, box_format="tf", method=method
  )
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out).ravel(), [expected])


def test_tensorflow_no_boxes_and_bad_box_index():
  out = crop_and_resize(IMAGE_2X2, np.zeros((0, 4), np.float32), 3, box_format="tf")
  assert out.shape == (0, 3, 3, 1)
  with pytest.raises(ValueError, match=r"box_indices.*\[0, 1\)"):
    crop_and_resize(IMAGE_2X2, np.zeros((1, 4), np.float32), 3, box_indices=np.array([1]))


def test_tensorflow_large_image_halves():
  # "WithSharding": a 999 x 999 ramp cropped into its two 500 x 500 halves.
  length, half = 999, 500
  image = np.tile(np.arange(length, dtype=np.float32), (length, 1)).reshape(1, length, length, 1)
  out = _tf(image, [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], half)
  np.testing.assert_array_equal(out[0], np.tile(np.arange(half, dtype=np.float32), (half, 1)))
  np.testing.assert_array_equal(out[1], np.tile(np.arange(499, 999, dtype=np.float32), (half, 1)))


# ------------------------------------------------------------------ TensorFlow's formula


@st.composite
def _tf_problems(draw):
  n, h, w, c = draw(st.sampled_from([(1, 5, 7, 2), (2, 4, 4, 1), (1, 1, 3, 1)]))
  crop = draw(st.sampled_from([(1, 1), (3, 2), (4, 5)]))
  k = draw(st.sampled_from([1, 5]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  image = rng.standard_normal((n, h, w, c)).astype(np.float32)
  boxes = rng.uniform(-0.5, 1.5, (k, 4)).astype(np.float32)  # flips and extrapolation included
  snap = rng.random((k, 4)) < 0.3  # exact cell positions and half positions (nearest ties)
  boxes = np.where(snap, np.round(boxes * 4) / 4, boxes).astype(np.float32)
  return image, boxes, rng.integers(0, n, k).astype(np.int32), crop


@given(
  _tf_problems(),
  st.sampled_from(["bilinear", "nearest"]),
  st.sampled_from([0.0, -1.5]),
  st.sampled_from(["gather", "einsum"]),
)
def test_tensorflow_formula(problem, method, extrapolation, impl):
  image, boxes, indices, crop = problem
  out = crop_and_resize(
    image,
    boxes,
    crop,
    box_indices=indices,
    box_format="tf",
    method=method,
    extrapolation_value=extrapolation,
    impl=impl,
  )
  expected = reference.tf_crop_and_resize(image, boxes, indices, crop, method, extrapolation)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


TF_FIXTURES = fixtures_io.load_cases("tensorflow_crop_and_resize.npz")


@pytest.mark.parametrize(
  "name, impl",
  some([(name, ("gather", "einsum")[i % 2]) for i, name in enumerate(sorted(TF_FIXTURES))], 4),
)
def test_matches_tensorflow_fixtures(name, impl):
  # Drawn by tools/tensorflow_parity.py: output, image and box gradients of
  # tf.image.crop_and_resize, on whole-cell, flipped, zero-size and huge boxes too.
  # Each case runs on one backend, alternately (each compiles its own programs).
  c = TF_FIXTURES[name]

  def crop(image, boxes):
    return crop_and_resize(
      image,
      boxes,
      tuple(int(s) for s in c["crop_size"]),
      box_indices=c["box_indices"],
      box_format="tf",
      method=str(c["method"]),
      extrapolation_value=float(c["extrapolation_value"]),
      impl=impl,
    )

  image, boxes = jnp.asarray(c["image"]), jnp.asarray(c["boxes"])
  out = jax.jit(crop)(image, boxes)
  np.testing.assert_allclose(np.asarray(out), c["output"], rtol=1e-5, atol=1e-5)
  if "grad_image" not in c:  # integer image: no gradient
    return
  vjp = jax.jit(lambda cot: jax.vjp(crop, image, boxes)[1](cot))
  fixtures_io.assert_gradients_match(lambda cot: vjp(cot)[:1], c["cotangent"], [c["grad_image"]])
  grad_boxes = np.asarray(vjp(jnp.asarray(c["cotangent"]))[1])
  if c["method"] == "nearest":  # piecewise constant (TensorFlow: its bilinear box gradient)
    np.testing.assert_array_equal(grad_boxes, np.zeros_like(grad_boxes))
    return
  # Boxes where TensorFlow's box-gradient kernel puts a point on other cells than its
  # forward kernel does are left out (see crop_and_resize's docstring).
  compared = c["box_gradient_compared"]
  want = c["grad_boxes"][compared]
  np.testing.assert_allclose(
    grad_boxes[compared], want, rtol=1e-5, atol=1e-5 * (1 + np.abs(want).max(initial=0))
  )


def test_tensorflow_gradients_match_autodiff_of_its_formula():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.standard_normal((2, 6, 7, 3)), jnp.float32)
  boxes = jnp.asarray(rng.uniform(-0.3, 1.3, (6, 4)), jnp.float32)
  indices = np.array([0, 1, 1, 0, 1, 0], np.int32)
  cot = jnp.asarray(rng.standard_normal((6, 4, 5, 3)), jnp.float32)

  def ours(f, b):
    return jnp.vdot(crop_and_resize(f, b, (4, 5), box_indices=indices, box_format="tf"), cot)

  def dense(f, b):
    return jnp.vdot(reference.dense_tf_crop_and_resize(f, b, indices, (4, 5)), cot)

  got, want = jax.grad(ours, (0, 1))(image, boxes), jax.grad(dense, (0, 1))(image, boxes)
  for name, a, b in zip(("features", "boxes"), got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_tensorflow_box_gradient_at_whole_cells_is_its_kernels():
  # Points on whole cells: TensorFlow's kernel reads rows floor(y) and ceil(y), the
  # same row there, so such a point adds nothing to the box gradient along y (and
  # likewise along x). [0, 0, 1, 1] on a 3 x 5 image puts every point of a 3 x 5
  # crop on a cell; the other boxes mix whole and fractional points.
  image = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 5, 2)), jnp.float32)
  boxes = jnp.array([[0, 0, 1, 1], [0, 0.3, 1, 0.8], [0.5, 0.25, 0.75, 1], [1, 1, 0, 0]])
  indices = np.zeros(4, np.int32)
  cot = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3, 5, 2)), jnp.float32)

  def ours(f, b):
    return jnp.vdot(crop_and_resize(f, b, (3, 5), box_indices=indices, box_format="tf"), cot)

  def dense(f, b):
    return jnp.vdot(reference.dense_tf_crop_and_resize(f, b, indices, (3, 5)), cot)

  got, want = jax.grad(ours, (0, 1))(image, boxes), jax.grad(dense, (0, 1))(image, boxes)
  np.testing.assert_array_equal(got[1][0], np.zeros(4))  # every point on a cell
  for name, a, b in zip(("features", "boxes"), got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ pixel boxes


def _pixel_problem(seed, k=7, shape=(2, 7, 9, 3), inverted=True):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal(shape).astype(np.float32)
  lo = rng.uniform(-4, 8, (k, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.3, 9, (k, 2))], 1).astype(np.float32)
  if inverted:
    boxes[0] = boxes[0, [2, 3, 0, 1]]  # flipped both ways
    boxes[1] = boxes[1, [2, 1, 0, 3]]  # flipped left-right
  return features, boxes, rng.integers(0, shape[0], k).astype(np.int32)


@pytest.mark.parametrize("aligned", some([False, True]))
@pytest.mark.parametrize("method", ["bilinear", "nearest"])
@pytest.mark.parametrize("extrapolation", some([None, 0.0, 7.0], 2))
def test_pixel_boxes_match_reference(aligned, method, extrapolation):
  features, boxes, indices = _pixel_problem(0)
  out = crop_and_resize(
    features,
    boxes * 2,
    (3, 5),
    spatial_scale=0.5,
    aligned=aligned,
    box_indices=indices,
    method=method,
    extrapolation_value=extrapolation,
  )
  expected = reference.crop_and_resize(
    features, boxes * 2, indices, (3, 5), 0.5, aligned, method, extrapolation
  )
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aligned", [False, True])
def test_pixel_boxes_are_roi_align_with_one_sample(aligned):
  features, boxes, indices = _pixel_problem(3, inverted=False)
  a = crop_and_resize(features, boxes, 4, aligned=aligned, box_indices=indices)
  b = roi_align(features, boxes, 4, sampling_ratio=1, aligned=aligned, box_indices=indices)
  # The same points and weights; the two kernels may round their sums differently (1 ulp).
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3e-7, atol=3e-7)


def test_inverted_pixel_box_is_the_mirrored_crop():
  features, boxes, indices = _pixel_problem(4, inverted=False)
  flipped = boxes[:, [2, 3, 0, 1]]
  out = crop_and_resize(features, flipped, (4, 6), box_indices=indices)
  expected = crop_and_resize(features, boxes, (4, 6), box_indices=indices)[:, ::-1, ::-1]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_pixel_box_gradients_match_finite_differences():
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.standard_normal((1, 8, 8, 2)), jnp.float32)
  # One normal and one flipped box, with samples off integer positions under +-eps.
  boxes = jnp.asarray([[1.3, 0.7, 6.0, 5.6], [4.6, 7.4, 0.2, 2.6]], jnp.float32)
  cot = jnp.asarray(rng.standard_normal((2, 3, 4, 2)), jnp.float32)

  @jax.jit
  def loss(b):
    return jnp.vdot(crop_and_resize(features, b, (3, 4)), cot)

  numeric = reference.central_differences(loss, boxes, 1e-2)
  np.testing.assert_allclose(jax.grad(loss)(boxes), numeric, rtol=1e-3, atol=1e-3)


def test_nearest_sends_the_whole_cotangent_to_the_chosen_cell_and_nothing_to_the_box():
  features = jnp.asarray(np.arange(20.0).reshape(1, 4, 5, 1), jnp.float32)
  boxes = jnp.asarray([[0.0, 0.0, 1.0, 1.0]])  # the whole map: rows 0, 3 and columns 0, 2, 4

  def f(x, b):
    return crop_and_resize(x, b, (2, 3), box_format="tf", method="nearest").sum()

  grad_f, grad_b = jax.grad(f, (0, 1))(features, boxes)
  # Rows 0 and 3; columns 0, 2 and 4: one cotangent each.
  expected = np.zeros((4, 5))
  expected[np.ix_([0, 3], [0, 2, 4])] = 1
  np.testing.assert_array_equal(np.asarray(grad_f)[0, :, :, 0], expected)
  np.testing.assert_array_equal(np.asarray(grad_b), 0)


def test_bad_options_raise():
  image, boxes = IMAGE_2X2, np.zeros((1, 4), np.float32)
  with pytest.raises(ValueError, match="box_format"):
    crop_and_resize(image, boxes, 2, box_format="yxyx")
  with pytest.raises(ValueError, match="method"):
    crop_and_resize(image, boxes, 2, method="bicubic")
  with pytest.raises(TypeError, match="extrapolation_value"):
    crop_and_resize(image, boxes, 2, extrapolation_value="0")
  with pytest.raises(ValueError, match="pixel boxes only"):
    crop_and_resize(image, boxes, 2, box_format="tf", spatial_scale=0.5)
  with pytest.raises(ValueError, match="pixel boxes only"):
    crop_and_resize(image, boxes, 2, box_format="tf", aligned=False)


def test_box_shape_errors_name_the_format_s_coordinates():
  image = IMAGE_2X2
  with pytest.raises(ValueError, match=r"\(y1, x1, y2, x2\) normalized.*got shape \(2, 5\)\.$"):
    crop_and_resize(image, np.zeros((2, 5), np.float32), 2, box_format="tf")
  with pytest.raises(ValueError, match=r"as \(x1, y1, x2, y2\);.*torchvision's rois"):
    crop_and_resize(image, np.zeros((2, 5), np.float32), 2)
