"""Datasets: MVTec AD style folders, the MVTec AD download, and a synthetic carpet set.

``mvtec.py`` reads MVTec AD style folders (:class:`MVTecAD`, ``load_image``, ``load_mask``);
``download.py`` fetches the archive (resumable, checksummed); ``install.py`` extracts categories
and installs them atomically; ``synthetic.py`` generates the offline carpet set.
"""
from .download import (
    LICENSE_NOTICE,
    MVTEC_SHA256,
    MVTEC_URL,
    ChecksumError,
    DownloadError,
    download_category,
    download_file,
    download_mvtec,
)
from .install import COMPLETE_MARKER, UnsafeArchiveError, extract_categories, is_complete
from .mvtec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MVTEC_CATEGORIES,
    DatasetError,
    DatasetNotFoundError,
    MVTecAD,
    Sample,
    denormalize,
)
from .synthetic import SYNTHETIC_DEFECTS, SyntheticCarpet, make_synthetic_carpet, synthesize_image

__all__ = [
    "COMPLETE_MARKER",
    "ChecksumError",
    "DatasetError",
    "DatasetNotFoundError",
    "DownloadError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LICENSE_NOTICE",
    "MVTEC_CATEGORIES",
    "MVTEC_SHA256",
    "MVTEC_URL",
    "MVTecAD",
    "SYNTHETIC_DEFECTS",
    "Sample",
    "SyntheticCarpet",
    "UnsafeArchiveError",
    "denormalize",
    "download_category",
    "download_file",
    "download_mvtec",
    "extract_categories",
    "is_complete",
    "make_synthetic_carpet",
    "synthesize_image",
]
