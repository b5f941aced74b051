"""Conventions of the public API (as dm_pix's api_test)."""

import inspect

import roipool_jax


def test_all_names_exist_and_are_documented():
  for name in roipool_jax.__all__:
    fn = getattr(roipool_jax, name)
    doc = inspect.getdoc(fn)
    assert doc and "Args:" in doc and "Returns:" in doc and "Raises:" in doc, name


def test_options_are_keyword_only():
  for name in roipool_jax.__all__:
    params = list(inspect.signature(getattr(roipool_jax, name)).parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    size = "crop_size" if name == "crop_and_resize" else "output_size"
    arrays = (
      ["features", "boxes", "offsets"] if name == "deform_roi_pool" else ["features", "boxes"]
    )
    assert positional == [*arrays, size], (name, positional)
    assert all(p.kind is p.KEYWORD_ONLY for p in params[len(positional) :]), name
