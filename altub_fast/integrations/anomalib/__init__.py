"""AltUB inside anomalib: ``AltUBFastflow`` and ``AltUBCflow`` (``pip install "altub_fast[anomalib]"``).

Both are anomalib models (``AnomalibModule`` subclasses of anomalib's ``Fastflow`` / ``Cflow``) with
anomalib's constructor arguments plus AltUB's: ``altub`` (a learnable base N(mu, diag(sigma^2)) per
scale, :class:`altub_fast.LearnableGaussian`), ``k``, ``r``, ``base_lr``, ``warmup`` and ``schedule``
(:class:`altub_fast.train.schedule.AltUBSchedule`: which updates are base-only). Their flows are built
from altub_fast's ``AllInOneBlock`` (fused kernels on CUDA). They train with anomalib's
``Engine().fit``, score with ``Engine().test/predict`` and export with ``Engine().export`` (ONNX,
OpenVINO, Torch). See ``docs/anomalib.md``.

    from anomalib.engine import Engine
    from altub_fast.integrations.anomalib import AltUBFastflow
    Engine(max_epochs=20).fit(AltUBFastflow(backbone="efficientnet_lite0"), datamodule=datamodule)

Tested against anomalib 2.7 (the ``[anomalib]`` extra pins ``anomalib>=2.7,<2.8``); another anomalib
line imports with a warning.
"""
from __future__ import annotations

import warnings

EXTRA_HINT = 'pip install "altub_fast[anomalib]"'
TESTED_LINE = "2.7"

try:
    import anomalib as _anomalib
    import lightning as _lightning  # noqa: F401  (anomalib's Engine runs on it)
except ImportError as _e:  # one clear error naming the extra, whatever piece is missing
    raise ImportError(f"altub_fast.integrations.anomalib needs anomalib {TESTED_LINE} and Lightning, which are "
                      f"not installed ({_e}). Install the extra: {EXTRA_HINT}") from _e

ANOMALIB_VERSION = str(getattr(_anomalib, "__version__", "unknown"))
if not ANOMALIB_VERSION.startswith(TESTED_LINE + "."):
    warnings.warn(f"altub_fast.integrations.anomalib is tested with anomalib {TESTED_LINE}.x, found "
                  f"{ANOMALIB_VERSION}; {EXTRA_HINT} installs the tested line", stacklevel=2)

from .cflow import AltUBCflow, AltUBCflowModel  # noqa: E402
from .fastflow import AltUBFastflow, AltUBFastflowModel  # noqa: E402
from .training import resolve_schedule  # noqa: E402

__all__ = ["AltUBFastflow", "AltUBFastflowModel", "AltUBCflow", "AltUBCflowModel", "resolve_schedule",
           "ANOMALIB_VERSION", "EXTRA_HINT"]
