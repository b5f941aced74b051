"""What every op does around its kernel, in one place.

An op validates its options, then calls :func:`run`, which

1. flattens either box form into ``[K, 4]`` (or rotated ``[K, 5]``) boxes in the compute dtype, with
   each box's image and validity (:func:`boxes.flatten_boxes`). Outside
   ``jit`` (concrete boxes and features) K is padded with invalid boxes to a
   bucket (:func:`boxes.bucket`, at most 25% more), so a notebook that
   changes K reuses the compiled kernel of its bucket;
2. returns zeros of the output shape without running a kernel when there is
   nothing to pool (``K = 0``, ``N = 0`` or ``C = 0``; the gradients are then
   zeros too);
3. calls the op's kernel ``kernel(features, flat, **options)``, with
   ``flat`` a :class:`boxes.FlatBoxes`; the options are static and passed
   by name. Flattening and
   the kernel are one jitted program, so an eager call compiles at most one
   program (none for a K whose bucket was seen);
4. gives the ``[K, ...]`` result the box form of the call.

bfloat16 and float16 features are never copied to float32: the kernels
widen each row they gather to float32 (:func:`dtypes.gather_rows`) and round
what they write back to 16 bits (:func:`dtypes.narrow`), so max pooling is
exact and averages are rounded once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import dtypes, validation


def run(
  kernel: Callable[..., jax.Array],
  features: jax.Array | Sequence[jax.Array],
  boxes: jax.typing.ArrayLike,
  box_indices: jax.typing.ArrayLike | None,
  output_size: tuple[int, int],
  out_channels: int | None = None,
  coords: int = 4,
  **options,
) -> jax.Array:
  """Runs ``kernel`` on validated ``features`` (a map, or a list of pyramid levels).

  ``out_channels`` is the kernel's output channel count when it is not the
  map's ``C`` (position-sensitive ops), ``coords`` the numbers per box (5 for
  rotated boxes); static ``options`` go to the kernel.

  Returns:
    ``[K, oh, ow, C]`` or ``[N, R, oh, ow, C]`` in the features' dtype.
  """
  levels = list(features) if isinstance(features, (list, tuple)) else [features]
  first = levels[0]
  eager = validation.is_concrete(levels, boxes, box_indices)
  args = boxes_lib.prepare_boxes(boxes, box_indices, first.shape[0], pad=eager, coords=coords)
  k = int(np.prod(args.batch_shape))
  n, _, _, c = first.shape
  if k == 0 or n == 0 or c == 0:  # nothing to pool (an empty map cannot be gathered from)
    channels = c if out_channels is None else out_channels
    return jnp.zeros(args.batch_shape + output_size + (channels,), first.dtype)
  out = _flatten_and_pool(
    features,
    args.boxes,
    args.box_indices,
    kernel=kernel,
    options=tuple(sorted(options.items())),
  )
  return boxes_lib.unpad(out, args.batch_shape)


# Flattening and the kernel compile as one program, once per shape and configuration.
@partial(jax.jit, static_argnames=("kernel", "options"))
def _flatten_and_pool(features, boxes, box_indices, *, kernel, options):
  levels = list(features) if isinstance(features, (list, tuple)) else [features]
  dtype = levels[0].dtype
  compute = dtypes.compute_dtype(dtype)
  flat = boxes_lib.flat_arrays(boxes, box_indices, num_images=levels[0].shape[0], dtype=compute)
  # No float32 copy of 16-bit maps: the kernels widen each row they gather
  # (dtypes.gather_rows) and narrow what they write (dtypes.narrow).
  maps = levels if isinstance(features, (list, tuple)) else levels[0]
  return dtypes.narrow(kernel(maps, flat, **dict(options)), dtype)
