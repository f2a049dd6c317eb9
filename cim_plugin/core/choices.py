"""The core's choices by name, and the compress-ratio rule, without torch.

The torch modules build on these (``masks.MASK_SOURCES`` maps each name to its class,
``bilevel.BilevelSettings`` checks its mode, ``codec`` uses ``downsample_factor``), and the
plugin's config (config.py) validates its keys with them. The module imports nothing but the
standard library, so config.py, and through it the ``cim-plugin`` command, never pays for
importing torch.
"""

from __future__ import annotations

import math
import numbers

#: Mask sources, i.e. how the full-resolution box of an exemplar is chosen (see masks.py), in the
#: order of the ablation's table (method.md §6): the whole image (nothing downsampled: a plain
#: exemplar in the plugin's memory), no box (the whole image downsampled), a random box, the CIL
#: model's CAM, CIM's PAU branch, the true object box (a diagnostic).
MASK_SOURCES: tuple[str, ...] = ("full", "uniform", "random", "cam", "pau", "oracle")

#: How the pixels of a stored exemplar are kept: as they are ("raw"), or entropy-coded as a JPEG,
#: WebP or PNG file (core/pixel_codec.py) — the box crop and the low-resolution rest separately.
PIXEL_CODECS: tuple[str, ...] = ("raw", "jpeg", "webp", "png")

#: What a path dataset's exemplar stores (pycil/data.py): the whole image squeezed to S×S with its
#: aspect kept, or PyCIL's centre test crop.
STORAGE_VIEWS: tuple[str, ...] = ("whole", "crop")

#: How the PAU branch's coefficients φ are trained (see bilevel.py): the paper's bilevel step,
#: without the inner step ("joint"), or not at all ("none": frozen at the ReLU fit).
BILEVEL_MODES: tuple[str, ...] = ("bilevel", "joint", "none")

#: What the memory keeps of an exemplar (key ``cim_memory``): its pixels (CIM's compressed image,
#: the default), its final feature vector (Iscen et al., ECCV 2020: core/feature_memory.py, adapted
#: to every new model by core/feature_adapter.py), or a stage's feature map as a per-image PCA code
#: (AnytimeCL; core/feature_pca.py the codec, core/pca_memory.py the memory).
MEMORY_KINDS: tuple[str, ...] = ("image", "features", "pca")

#: How a feature memory stores its vectors (numpy / torch dtype names; 2 or 4 bytes per value).
FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32")

#: The values ``compress_ratio`` may take, as error messages name them.
SQUARE_RATIOS = "the square of an integer >= 2 (4, 9, 16, 25, ...)"


def downsample_factor(compress_ratio: float, tol: float = 1e-9) -> int:
    """Integer factor per side ``s = sqrt(compress_ratio)``.

    compress_ratio must be the square of an integer >= 2 (4, 9, 16, ...) to within ``tol``; any
    other value (a bool, a string, NaN, ...) raises ValueError naming ``compress_ratio``.
    """
    is_number = isinstance(compress_ratio, numbers.Real) and not isinstance(compress_ratio, bool)
    ratio = float(compress_ratio) if is_number else math.nan
    s = round(math.sqrt(ratio)) if math.isfinite(ratio) and ratio >= 1.0 else 0
    if s < 2 or abs(s * s - ratio) > tol:
        raise ValueError(f"compress_ratio must be {SQUARE_RATIOS}, got {compress_ratio!r}")
    return s
