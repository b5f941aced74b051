"""Tests of roipool_jax.torchvision: the stored torchvision fixtures through the drop-in layer."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from roipool_jax import torchvision as tv
from tests import fixtures_io
from tests.quick import some

POOL = fixtures_io.load_cases("torchvision_roi_pool.npz")
ALIGN = fixtures_io.load_cases("torchvision_roi_align.npz")
MULTI = fixtures_io.load_cases("torchvision_multiscale.npz")


def nchw(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def rois(c):
  """torchvision's [K, 5] rois: the batch index as a float in column 0."""
  index = c["box_indices"].astype(c["boxes"].dtype)[:, None]
  return np.concatenate([index, c["boxes"]], axis=1)


def per_image(c):
  """torchvision's list of per-image boxes, and the fixture rows in the order it returns them."""
  n = c["features0"].shape[0] if "features0" in c else c["features"].shape[0]
  order = np.concatenate([np.flatnonzero(c["box_indices"] == i) for i in range(n)])
  return [c["boxes"][c["box_indices"] == i] for i in range(n)], order


def check(fn, features, c, order=None, rtol=1e-5):
  out, vjp = jax.vjp(fn, jnp.asarray(nchw(features)))
  expected = c["output"] if order is None else c["output"][order]
  cotangent = c["cotangent"] if order is None else c["cotangent"][order]
  np.testing.assert_allclose(np.asarray(out), nchw(expected), rtol=rtol, atol=rtol)
  fixtures_io.assert_gradients_match(vjp, nchw(cotangent), [nchw(c["grad"])], tol=rtol)


def size_of(c):
  return tuple(int(s) for s in np.broadcast_to(c["output_size"], (2,)))


@pytest.mark.parametrize("name", some(sorted(POOL), 2))
def test_roi_pool_with_rois(name):
  c = POOL[name]
  r, size, scale = rois(c), size_of(c), float(c["spatial_scale"])
  check(lambda x: tv.roi_pool(x, r, size, scale), c["features"], c, rtol=1e-6)


@pytest.mark.parametrize("name", some(sorted(POOL)))
def test_roi_pool_module_with_box_list(name):
  c = POOL[name]
  boxes, order = per_image(c)
  layer = tv.RoIPool(size_of(c), float(c["spatial_scale"]))
  check(lambda x: layer(x, boxes), c["features"], c, order, rtol=1e-6)


@pytest.mark.parametrize("name", some(sorted(ALIGN), 2))
def test_roi_align_with_positional_options(name):
  c = ALIGN[name]
  r = rois(c)
  args = (size_of(c), float(c["spatial_scale"]), int(c["sampling_ratio"]), bool(c["aligned"]))
  check(jax.jit(lambda x: tv.roi_align(x, r, *args)), c["features"], c)


@pytest.mark.parametrize("name", some(sorted(ALIGN)))
def test_roi_align_module_with_box_list(name):
  c = ALIGN[name]
  boxes, order = per_image(c)
  layer = tv.RoIAlign(
    size_of(c), float(c["spatial_scale"]), int(c["sampling_ratio"]), aligned=bool(c["aligned"])
  )
  check(lambda x: layer(x, boxes), c["features"], c, order)


@pytest.mark.parametrize("name", some(sorted(MULTI)))
def test_multi_scale_roi_align_takes_named_levels(name):
  c = MULTI[name]
  names = sorted(k for k in c if k.startswith("features"))
  boxes, order = per_image(c)
  height, width = (int(s) for s in c["image_size"])
  # torchvision takes the largest height and width over the images.
  image_shapes = [(height, width - 40), (height - 16, width)]
  pooler = tv.MultiScaleRoIAlign(
    [str(i) for i in range(len(names))], size_of(c), int(c["sampling_ratio"])
  )

  def f(*levels):
    x = collections.OrderedDict((str(i), level) for i, level in enumerate(levels))
    x["pool"] = levels[-1][:, :, ::2, ::2]  # torchvision's extra level: not in featmap_names
    return pooler(x, boxes, image_shapes)

  maps = [jnp.asarray(nchw(c[k])) for k in names]
  out, vjp = jax.vjp(f, *maps)
  np.testing.assert_allclose(np.asarray(out), nchw(c["output"][order]), rtol=1e-5, atol=1e-5)
  expected = [nchw(c[k.replace("features", "grad")]) for k in names]
  fixtures_io.assert_gradients_match(vjp, nchw(c["cotangent"][order]), expected)


def test_rois_and_box_list_agree_with_the_nhwc_api():
  import roipool_jax

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 10, 12)).astype(np.float32)
  boxes = [rng.uniform(0, 40, (3, 4)).astype(np.float32), np.zeros((0, 4), np.float32)]
  boxes[0][:, 2:] += boxes[0][:, :2]
  expected = roipool_jax.roi_align(
    x.transpose(0, 2, 3, 1), boxes[0], 4, spatial_scale=0.25, box_indices=np.zeros(3, np.int32)
  )
  out = tv.roi_align(x, boxes, 4, 0.25)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected).transpose(0, 3, 1, 2))


def test_batch_index_is_truncated_alike_eager_and_traced():
  # Column 0 of [K, 5] rois becomes an int32 as XLA converts floats: toward zero, NaN to 0.
  # Concrete rois are split on the host, traced ones in the program: the same images.
  x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
  boxes = np.array([[0.5, 0.5, 6.5, 5.5]] * 4, np.float32)
  index = np.array([1.9, -0.5, np.nan, 1.0], np.float32)
  rois = np.concatenate([index[:, None], boxes], axis=1)
  expected = tv.roi_align(x, np.concatenate([[[1.0], [0.0], [0.0], [1.0]], boxes], 1), 2)
  np.testing.assert_array_equal(tv.roi_align(x, rois, 2), expected)
  np.testing.assert_array_equal(jax.jit(lambda r: tv.roi_align(x, r, 2))(rois), expected)
  assert not np.array_equal(expected[0], expected[1])  # the two images differ
  _, pulled = tv.convert_boxes(np.array([[-3e9, 0, 0, 1, 1], [3e9, 0, 0, 1, 1]]))
  np.testing.assert_array_equal(pulled, [-(2**31), 2**31 - 1])  # saturated, as XLA converts
  with pytest.raises(ValueError, match="box_indices"):  # concrete: out of range is an error
    tv.roi_align(x, np.array([[2.0, 0, 0, 1, 1]], np.float32), 2)


@pytest.mark.parametrize("op", [tv.roi_pool, tv.roi_align])
def test_empty_inputs_and_float64(op):
  # K = 0 rois, and N = 0 images with an empty per-image list: empty outputs, zero gradients.
  for x, boxes in [
    (jnp.ones((2, 3, 6, 6)), jnp.zeros((0, 5))),
    (jnp.ones((0, 3, 6, 6)), jnp.zeros((0, 5))),
    (jnp.ones((1, 3, 6, 6)), [jnp.zeros((0, 4))]),
  ]:
    out, vjp = jax.vjp(lambda f, b=boxes: op(f, b, 2), x)
    assert out.shape == (0, 3, 2, 2)
    np.testing.assert_array_equal(vjp(out)[0], np.zeros(x.shape))
  with jax.enable_x64(True):
    x = jnp.full((1, 2, 5, 5), 1 + 1e-12, jnp.float64)
    rois = jnp.asarray([[0.0, 0.5, 0.5, 3.5, 3.5]], jnp.float64)
    out = op(x, rois, 2)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), 1 + 1e-12, rtol=1e-15)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 5, 5)))  # no ties
    check_grads(lambda f: op(f, rois, 2), (x,), 1, modes=("rev",), eps=1e-6)


def test_errors_speak_of_torchvision_layouts():
  x = jnp.ones((1, 3, 8, 8))
  # Box shapes: a ValueError, and the AssertionError that torchvision raises.
  for error in (ValueError, AssertionError):
    with pytest.raises(error, match=r"rois \[K, 5\].*got shape \(2, 4\)"):
      tv.roi_align(x, jnp.ones((2, 4)), 2)
    with pytest.raises(error, match=r"`boxes\[1\]` must be \[L, 4\]"):
      tv.roi_pool(x, [jnp.ones((2, 4)), jnp.ones((2, 5))], 2)
    with pytest.raises(error, match=r"`boxes\[0\]` must be \[L, 4\]"):
      tv.RoIAlign(2, 1.0, 2)(x, [jnp.ones((1, 3))])
  # Position-sensitive channels: a ValueError, and torchvision's RuntimeError (TORCH_CHECK),
  # naming the NCHW shape given.
  for error in (ValueError, RuntimeError):
    with pytest.raises(error, match=r"multiple of oh \* ow = 2 \* 3 = 6.*\(1, 3, 8, 8\) \(NCHW\)"):
      tv.ps_roi_pool(x, jnp.zeros((1, 5)), (2, 3))
    with pytest.raises(error, match=r"multiple of oh \* ow = 2 \* 2 = 4"):
      tv.PSRoIAlign(2, 1.0, 2)(x, [jnp.ones((1, 4))])
  with pytest.raises(ValueError, match=r"`input` must be NCHW"):
    tv.roi_pool(jnp.ones((3, 8, 8)), jnp.ones((2, 5)), 2)
  pooler = tv.MultiScaleRoIAlign(["p2"], 7, 2)
  with pytest.raises(ValueError, match=r"no level named \['p2'\]"):
    pooler({"0": x}, [jnp.ones((1, 4))], [(32, 32)])
  with pytest.raises(TypeError, match="`x` must map level names"):
    pooler([x], [jnp.ones((1, 4))], [(32, 32)])


def test_nhwc_api_errors_point_to_this_layer():
  import roipool_jax

  with pytest.raises(ValueError, match=r"roipool_jax\.torchvision"):
    roipool_jax.roi_align(jnp.ones((1, 8, 8, 3)), jnp.ones((2, 5)), 2)


def test_module_reprs_are_torchvision_s():
  # As torchvision prints them (MultiScaleRoIAlign keeps an int output_size as a pair).
  assert repr(tv.RoIAlign((7, 7), 0.25, 2)) == (
    "RoIAlign(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=False)"
  )
  assert repr(tv.RoIPool(7, 0.25)) == "RoIPool(output_size=7, spatial_scale=0.25)"
  assert repr(tv.PSRoIAlign(7, 0.25, 2)) == (
    "PSRoIAlign(output_size=7, spatial_scale=0.25, sampling_ratio=2)"
  )
  assert repr(tv.PSRoIPool(7, 0.25)) == "PSRoIPool(output_size=7, spatial_scale=0.25)"
  for size in (7, np.int64(7), (7, 7), [7, 7]):
    pooler = tv.MultiScaleRoIAlign(["0"], size, 2, canonical_scale=112)
    assert pooler.output_size == (7, 7)
    assert repr(pooler) == (
      "MultiScaleRoIAlign(featmap_names=['0'], output_size=(7, 7), sampling_ratio=2)"
    )
