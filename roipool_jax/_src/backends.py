"""Choosing an implementation: ``impl="auto" | "gather" | "einsum"``.

* ``"gather"``: per-box gathers of contiguous ``C`` vectors, visiting only
  the cells each bin samples. Its backward pass is a scatter-add. It is the
  fastest on CPU, deterministic there, and works everywhere.
* ``"einsum"``: dense separable interpolation matrices applied with matmuls
  (:mod:`roipool_jax._src.dense`). It has no gather and no scatter in the
  forward or backward HLO, and its gradients are deterministic on every
  backend. It is the formulation TPUs run well. Its cost is dense in the map.
  Supported by the averaging ops (``roi_align`` with ``mode="avg"``,
  ``crop_and_resize``, ``roi_warp``, ``multi_scale_roi_align``) and by
  ``roi_pool`` (masked separable maxima, :mod:`roipool_jax._src.dense_max`).
* ``"auto"``: ``"einsum"`` on TPU and GPU (where a gather/scatter backward
  is slow or non-deterministic) when the op supports it, else ``"gather"``.
  ``roi_pool`` picks ``"einsum"`` on TPU only: its dense form costs a factor
  ``W * ow`` per box more than its gather form, which GPUs run well.

The choice is made at trace time from ``jax.default_backend()``. Where the
fastest layout of the same computation depends on the CPU, the op asks
:func:`cpu_vendor` (``ps_roi_pool`` on channel-major maps).
"""

from __future__ import annotations

import functools

import jax

from roipool_jax._src import dense, tap_sum, validation
from roipool_jax._src.sampling import Taps

IMPLS = ("auto", "gather", "einsum")
_DENSE_BACKENDS = ("tpu", "gpu", "cuda", "rocm")


def resolve(
  impl: str, einsum_supported: bool = True, why: str = "", dense_backends=_DENSE_BACKENDS
) -> str:
  """The concrete implementation for ``impl`` on the default backend.

  Args:
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``.
    einsum_supported: whether the calling op and options have an einsum path.
    why: what rules the einsum path out, for the error message.
    dense_backends: where ``"auto"`` picks ``"einsum"`` (``roi_pool``: TPU only).

  Raises:
    ValueError: an unknown ``impl``, or ``"einsum"`` where it is not supported.
  """
  validation.check_choice("impl", impl, IMPLS)
  if impl == "einsum" and not einsum_supported:
    raise ValueError(f'`impl="einsum"` is not available {why}; use impl="gather" or "auto".')
  if impl == "auto":
    dense = jax.default_backend() in dense_backends and einsum_supported
    return "einsum" if dense else "gather"
  return impl


def sum_taps(
  features: jax.Array,
  ty: Taps,
  tx: Taps,
  image_index: jax.Array,
  impl: str,
) -> jax.Array:
  """``sum_a sum_b wy[a] wx[b] F[n, row_a, col_b]`` per bin, ``[K, oh, ow, C]``, with a resolved
  ``impl``: :func:`tap_sum.tap_sum` (gather) or :func:`dense.separable_sum` (einsum) of the
  taps turned into dense interpolation matrices."""
  if impl == "einsum":
    height, width = features.shape[1:3]
    wy = dense.interpolation_matrix(ty, height)
    wx = dense.interpolation_matrix(tx, width)
    return dense.separable_sum(features, wy, wx, image_index)
  plan = tap_sum.map_plan(image_index, ty, tx, features.shape)
  table = features.reshape(-1, features.shape[3])
  return tap_sum.tap_sum(table, ty.weight, tx.weight, plan)


@functools.cache
def cpu_vendor() -> str:
  """``vendor_id`` of ``/proc/cpuinfo`` (``"GenuineIntel"``, ``"AuthenticAMD"``), "" if unknown."""
  try:
    with open("/proc/cpuinfo") as info:
      for line in info:
        if line.startswith("vendor_id"):
          return line.partition(":")[2].strip()
  except OSError:
    pass
  return ""
