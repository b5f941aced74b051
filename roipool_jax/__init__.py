"""roipool_jax: RoI pooling ops for JAX (NHWC features, (x1, y1, x2, y2) boxes)."""

from roipool_jax._src.roi_pool import roi_pool

__version__ = "0.1.0"

__all__ = ("roi_pool",)
