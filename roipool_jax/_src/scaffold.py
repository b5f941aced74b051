"""What every op does around its kernel, in one place.

An op validates its options, then calls :func:`run`, which

1. flattens either box form into ``[K, 4]`` boxes in the compute dtype, with
   each box's image and validity (:func:`boxes.flatten_boxes`);
2. returns zeros of the output shape without running a kernel when there is
   nothing to pool (``K = 0``, ``N = 0`` or ``C = 0``; the gradients are then
   zeros too);
3. calls the op's jitted kernel ``kernel(features, boxes, image_index, valid,
   **options)``, whose options are static and passed by name;
4. gives the ``[K, ...]`` result the box form of the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import dtypes


def run(
  kernel: Callable[..., jax.Array],
  features: jax.Array | Sequence[jax.Array],
  boxes: jax.typing.ArrayLike,
  box_indices: jax.typing.ArrayLike | None,
  output_size: tuple[int, int],
  **options,
) -> jax.Array:
  """Runs ``kernel`` on validated ``features`` (a map, or a list of pyramid levels).

  Returns:
    ``[K, oh, ow, C]`` or ``[N, R, oh, ow, C]`` in the features' dtype.
  """
  first = features[0] if isinstance(features, (list, tuple)) else features
  flat = boxes_lib.flatten_boxes(
    boxes, box_indices, first.shape[0], dtypes.compute_dtype(first.dtype)
  )
  if not boxes_lib.has_work(first.shape, flat):
    return jnp.zeros(flat.batch_shape + output_size + first.shape[3:], first.dtype)
  out = kernel(features, flat.boxes, flat.image_index, flat.valid, **options)
  return out.reshape(flat.batch_shape + out.shape[1:])
