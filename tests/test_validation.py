"""Every option of every function and module is checked at trace time, by one rule.

A value of the wrong type raises ``TypeError``, a value of the right type that
is out of range raises ``ValueError``; both name the argument and show the
value seen. The table below is checked to cover every option of every public
function, so an option added later without a row fails here.
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import roipool_jax
from roipool_jax import linen as roi_linen
from roipool_jax import nnx as roi_nnx

FEATURES = jnp.ones((2, 8, 8, 3))
BOXES = jnp.asarray([[1.0, 1.0, 6.0, 6.0], [0.0, 2.0, 4.0, 7.0]])
INDICES = jnp.asarray([0, 1])
PYRAMID = [jnp.ones((2, 8, 8, 3)), jnp.ones((2, 4, 4, 3))]
BEZIER = jnp.asarray([[1.0, 1, 2, 0, 4, 0, 6, 1, 6, 6, 4, 7, 2, 7, 1, 6]] * 2)
ROTATED = jnp.asarray([[3.0, 3.0, 4.0, 2.0, 30.0], [4.0, 4.0, 5.0, 5.0, -10.0]])
PS_FEATURES = jnp.ones((2, 8, 8, 12))  # C = 3 * 2 * 2: position-sensitive with 2x2 bins
RI_FEATURES = jnp.ones((2, 8, 8, 8))  # C = 1 * 8: one group of 8 orientation channels

# Per function: the positional call and its module name.
CALLS = {
  "roi_pool": (lambda **o: roipool_jax.roi_pool(FEATURES, BOXES, 2, box_indices=INDICES, **o)),
  "roi_align": (lambda **o: roipool_jax.roi_align(FEATURES, BOXES, 2, box_indices=INDICES, **o)),
  "crop_and_resize": (
    lambda **o: roipool_jax.crop_and_resize(FEATURES, BOXES, 2, box_indices=INDICES, **o)
  ),
  "roi_warp": (lambda **o: roipool_jax.roi_warp(FEATURES, BOXES, 2, box_indices=INDICES, **o)),
  "multi_scale_roi_align": (
    lambda **o: roipool_jax.multi_scale_roi_align(
      PYRAMID, BOXES, 2, box_indices=INDICES, **{"image_size": (8, 8), **o}
    )
  ),
  "roi_align_rotated": (
    lambda **o: roipool_jax.roi_align_rotated(FEATURES, ROTATED, 2, box_indices=INDICES, **o)
  ),
  "bezier_align": (
    lambda **o: roipool_jax.bezier_align(FEATURES, BEZIER, 2, box_indices=INDICES, **o)
  ),
  "riroi_align_rotated": (
    lambda **o: roipool_jax.riroi_align_rotated(RI_FEATURES, ROTATED, 2, box_indices=INDICES, **o)
  ),
  "ps_roi_pool": (
    lambda **o: roipool_jax.ps_roi_pool(PS_FEATURES, BOXES, 2, box_indices=INDICES, **o)
  ),
  "ps_roi_align": (
    lambda **o: roipool_jax.ps_roi_align(PS_FEATURES, BOXES, 2, box_indices=INDICES, **o)
  ),
  "precise_roi_pool": (
    lambda **o: roipool_jax.precise_roi_pool(FEATURES, BOXES, 2, box_indices=INDICES, **o)
  ),
  "deform_roi_pool": (
    lambda **o: roipool_jax.deform_roi_pool(FEATURES, BOXES, None, 2, box_indices=INDICES, **o)
  ),
}
MODULES = {
  "roi_pool": ("RoIPool", dict(output_size=2)),
  "roi_align": ("RoIAlign", dict(output_size=2)),
  "crop_and_resize": ("CropAndResize", dict(crop_size=2)),
  "roi_warp": ("RoIWarp", dict(output_size=2)),
  "multi_scale_roi_align": ("MultiScaleRoIAlign", dict(output_size=2, image_size=(8, 8))),
  "roi_align_rotated": ("RoIAlignRotated", dict(output_size=2)),
  "riroi_align_rotated": ("RiRoIAlignRotated", dict(output_size=2)),
  "bezier_align": ("BezierAlign", dict(output_size=2)),
  "ps_roi_pool": ("PSRoIPool", dict(output_size=2)),
  "ps_roi_align": ("PSRoIAlign", dict(output_size=2)),
  "precise_roi_pool": ("PreciseRoIPool", dict(output_size=2)),
}  # deform_roi_pool's modules have parameters: tests/test_deform_modules.py

# Bad values by kind of option: (wrong types, wrong values).
SIZE = ([2.0, "7", None, (2, 2.5), (True, 2), jnp.asarray(2)], [0, -3, (2, 0), (2, 2, 2)])
POSITIVE = (["1", None, True, jnp.asarray(0.5), 1j], [0.0, -1.0, math.inf, math.nan])
INT = ([2.0, True, "2", None], [])
BOOL = ([1, "yes", None, np.array(True)], [])
REAL_OR_NONE = (["0", True, jnp.asarray(0.0)], [])


def choice(*valid):
  return ([1, None, valid[0].encode()], ["bogus", valid[0].upper()])


OPTIONS = {
  "output_size": SIZE,
  "crop_size": SIZE,
  "spatial_scale": POSITIVE,
  "sampling_ratio": INT,
  "aligned": BOOL,
  "clockwise": BOOL,
  "quantization": choice("round", "floor"),
  "mode": choice("avg", "max"),
  "impl": choice("auto", "gather", "einsum"),
  "channel_order": choice("channel_major", "bin_major"),
  "box_format": choice("xyxy", "tf"),
  "method": choice("bilinear", "nearest"),
  "extrapolation_value": REAL_OR_NONE,
  "warp_size": ([2.5, "4", (4, 4.0)], [0, 3, (4, 5), (4, 4, 4)]),
  "image_size": ([(8.0, 8.0), "8", None], [(0, 8), (8, 8, 3)]),
  "canonical_scale": POSITIVE,
  "canonical_level": ([4.5, True, "4", None], []),
  "num_orientations": (INT[0], [0, -8]),
  "gamma": (["0.1", None, True, jnp.asarray(0.1)], [math.inf, math.nan]),
}
# Array arguments, checked by the per-op tests and below.
ARRAYS = {"features", "boxes", "box_indices", "offsets"}


def _cases():
  for fn in CALLS:
    for name in inspect.signature(getattr(roipool_jax, fn)).parameters:
      if name in ARRAYS or name not in OPTIONS:
        continue
      types, values = OPTIONS[name]
      for value in types:
        yield pytest.param(fn, name, value, TypeError, id=f"{fn}-{name}-{value!r}-type")
      for value in values:
        yield pytest.param(fn, name, value, ValueError, id=f"{fn}-{name}-{value!r}-value")


def test_the_table_covers_every_option_of_every_function():
  assert set(CALLS) == set(roipool_jax.__all__)
  for fn in CALLS:
    for name in inspect.signature(getattr(roipool_jax, fn)).parameters:
      assert name in ARRAYS or name in OPTIONS, (fn, name)


def _call(fn, name, value):
  if name in ("output_size", "crop_size"):  # positional in the functions
    size = value
    return lambda: _positional(fn, size)
  return lambda: CALLS[fn](**{name: value})


def _positional(fn, size):
  f = getattr(roipool_jax, fn)
  if fn == "multi_scale_roi_align":
    return f(PYRAMID, BOXES, size, image_size=(8, 8), box_indices=INDICES)
  if fn == "deform_roi_pool":
    return f(FEATURES, BOXES, None, size, box_indices=INDICES)
  return f(_features(fn), _boxes(fn), size, box_indices=INDICES)


def _boxes(fn):
  if fn == "bezier_align":
    return BEZIER
  return ROTATED if fn.endswith("roi_align_rotated") else BOXES


def _features(fn):
  if fn == "riroi_align_rotated":
    return RI_FEATURES
  return PS_FEATURES if fn.startswith("ps_") else FEATURES


@pytest.mark.parametrize("fn, name, value, error", list(_cases()))
def test_function_options(fn, name, value, error):
  with pytest.raises(error, match=f"`{name}`") as info:
    _call(fn, name, value)()
  shown = "an array of shape" if isinstance(value, (jax.Array, np.ndarray)) else repr(value)[:20]
  assert shown in str(info.value), str(info.value)
  # The same error under jit: the options are static, so it is raised while tracing.
  with pytest.raises(error, match=f"`{name}`"):
    jax.jit(lambda f: _call(fn, name, value)()).lower(FEATURES)


def _module_cases():
  for fn, name, value, error in (p.values for p in _cases()):
    if fn not in MODULES:
      continue
    yield pytest.param(fn, name, value, error, id=f"{MODULES[fn][0]}-{name}-{value!r}")


@pytest.mark.parametrize("fn, name, value, error", list(_module_cases()))
def test_module_options(fn, name, value, error):
  cls_name, required = MODULES[fn]
  options = {**required, name: value}
  inputs = (PYRAMID if fn == "multi_scale_roi_align" else _features(fn), _boxes(fn), INDICES)
  with pytest.raises(error, match=f"`{name}`"):
    getattr(roi_linen, cls_name)(**options).apply({}, *inputs)
  with pytest.raises(error, match=f"`{name}`"):
    getattr(roi_nnx, cls_name)(**options)(*inputs)


@pytest.mark.parametrize("fn", sorted(MODULES))
def test_module_defaults_are_the_function_defaults(fn):
  cls_name, required = MODULES[fn]
  signature = inspect.signature(getattr(roipool_jax, fn))
  for module in (getattr(roi_linen, cls_name), getattr(roi_nnx, cls_name)):
    fields = {
      f.name: f for f in module.__dataclass_fields__.values() if f.name in signature.parameters
    }
    options = [p for p in signature.parameters.values() if p.name not in ARRAYS]
    assert {p.name for p in options} == set(fields), module
    for p in options:
      if p.default is not inspect.Parameter.empty:
        assert fields[p.name].default == p.default, (module, p.name)


# ------------------------------------------------------------------ arrays and torchvision habits


@pytest.mark.parametrize("fn", sorted(CALLS))
def test_torchvision_rois_name_the_fix(fn):
  # torchvision's [K, 5] (detectron2's [K, 6] for rotated boxes)
  rois = jnp.concatenate([INDICES[:, None].astype(jnp.float32), _boxes(fn)], axis=1)
  f = getattr(roipool_jax, fn)
  first = PYRAMID if fn == "multi_scale_roi_align" else _features(fn)
  extra = dict(image_size=(8, 8)) if fn == "multi_scale_roi_align" else {}
  arrays = (first, rois, None) if fn == "deform_roi_pool" else (first, rois)
  with pytest.raises(ValueError, match=r"boxes=rois\[:, 1:\].*box_indices=rois\[:, 0\]"):
    f(*arrays, 2, **extra)


def test_float_batch_column_as_box_indices_names_the_fix():
  with pytest.raises(TypeError, match=r"integer dtype.*astype\(jnp.int32\)"):
    roipool_jax.roi_align(FEATURES, BOXES, 2, box_indices=INDICES.astype(jnp.float32))


def test_boxes_as_lists():
  # A nested list of numbers is an array; a ragged per-image list names the fix.
  expected = roipool_jax.roi_align(FEATURES[:1], BOXES, 2)
  np.testing.assert_array_equal(roipool_jax.roi_align(FEATURES[:1], BOXES.tolist(), 2), expected)
  with pytest.raises(TypeError, match="`boxes`.*ragged.*per-image"):
    roipool_jax.roi_align(FEATURES, [[[1.0, 1.0, 5.0, 5.0]], []], 2)


def test_nchw_pyramid_and_named_levels_name_the_fix():
  nchw = [jnp.ones((2, 3, 8, 8)), jnp.ones((2, 3, 4, 4))]
  with pytest.raises(ValueError, match=r"transpose\(0, 2, 3, 1\)"):
    roipool_jax.multi_scale_roi_align(nchw, BOXES, 2, image_size=(8, 8), box_indices=INDICES)
  with pytest.raises(TypeError, match=r"list\(features.values\(\)\)"):
    named = {"0": PYRAMID[0], "1": PYRAMID[1]}
    roipool_jax.multi_scale_roi_align(named, BOXES, 2, image_size=(8, 8), box_indices=INDICES)


@pytest.mark.parametrize(
  "features, error, match",
  [
    (jnp.ones((8, 8, 3)), ValueError, r"`features` must have rank 4.*\(8, 8, 3\)"),
    (jnp.ones((1, 8, 8, 3), jnp.int32), TypeError, r"`features` must have a floating dtype"),
    (jnp.ones((1, 0, 8, 3)), ValueError, r"`features` must have H >= 1"),
    ("features", TypeError, r"`features` must be an array"),
  ],
)
def test_bad_features(features, error, match):
  with pytest.raises(error, match=match):
    roipool_jax.roi_align(features, BOXES, 2)
