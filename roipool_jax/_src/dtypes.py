"""The dtype rule shared by every op.

* The *compute dtype* is float64 when the features are float64 (possible only
  with ``jax_enable_x64``), and float32 otherwise: float32 stays float32, and
  bfloat16/float16 features are accumulated in float32.
* Box geometry (scaled coordinates, bin sizes, sample positions, bilinear
  weights), every accumulation, and the backward pass run in the compute
  dtype. Boxes are cast to it first.
* Outputs and feature gradients have the dtype of the features; box gradients
  the dtype of the boxes.

So float64 inputs are computed in float64 end to end (``jax.test_util.check_grads``
and torch-style ``gradcheck`` work), and float32 results match the float32 C
kernels of torchvision bit for bit where their arithmetic is the same.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def compute_dtype(features_dtype) -> np.dtype:
  """float64 for float64 features, float32 for every other dtype (the module docstring)."""
  if jnp.dtype(features_dtype) == jnp.float64:
    return np.dtype(np.float64)
  return np.dtype(np.float32)
