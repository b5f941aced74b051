"""roipool_jax: RoI pooling ops for JAX (NHWC features, (x1, y1, x2, y2) boxes)."""

from roipool_jax._src.bezier_align import bezier_align
from roipool_jax._src.crop_and_resize import crop_and_resize
from roipool_jax._src.deform_roi_pool import deform_roi_pool
from roipool_jax._src.multiscale import multi_scale_roi_align
from roipool_jax._src.precise_roi_pool import precise_roi_pool
from roipool_jax._src.ps_roi_align import ps_roi_align
from roipool_jax._src.ps_roi_pool import ps_roi_pool
from roipool_jax._src.riroi_align_rotated import riroi_align_rotated
from roipool_jax._src.roi_align import roi_align
from roipool_jax._src.roi_align_rotated import roi_align_rotated
from roipool_jax._src.roi_pool import roi_pool
from roipool_jax._src.roi_warp import roi_warp

# The single source of the version: pyproject.toml reads it from here.
__version__ = "0.3.0"

__all__ = (
  "bezier_align",
  "crop_and_resize",
  "deform_roi_pool",
  "multi_scale_roi_align",
  "precise_roi_pool",
  "ps_roi_align",
  "ps_roi_pool",
  "riroi_align_rotated",
  "roi_align",
  "roi_align_rotated",
  "roi_pool",
  "roi_warp",
)
