"""The inference layer: open a checkpoint, read images for a model, score batches and datasets.

    from altub_fast.inference import Scorer, open_checkpoint, read_images, score_dataset

    model, ck = open_checkpoint("runs/carpet-fastflow/checkpoints/altub_fast/last.pt", device="cpu")
    scorer = Scorer(model)
    images, ok, bad = scorer.read(["a.png", "b.png"])       # resized, normalised as the scorer takes them
    maps, scores = scorer.score(images)                      # (B, H, W), (B,)
    result = score_dataset(model, test_dataset)              # {"maps", "scores", "labels", "masks", ...}
    raw = read_images(["a.png"], model.image_size, normalise=False).images   # RGB in [0, 1]

eval, predict and export all go through this package; it sits above ``train`` (it wraps the
trainer's checkpoint loading) and below the command-line tools.

Where things are: ``checkpoint.py`` (:class:`CheckpointError`, :func:`open_checkpoint`: which
error a missing, truncated or old checkpoint gives), ``images.py`` (:func:`read_image`,
:func:`read_images`, :class:`ImageBatch`; normalisation an explicit choice, constants from
:mod:`altub_fast.imagenet`), ``scorer.py`` (:class:`Scorer`, the object a runtime backend would
replace, and :func:`score_dataset`, formerly ``altub_fast.train.predict``), ``exported.py``
(:class:`ExportedModel`: a file written by ``altub_fast.export`` run in onnxruntime, OpenVINO or
torch.jit; it takes un-normalised images).
"""
from .checkpoint import CheckpointError, load_model, open_checkpoint
from .exported import ExportedModel
from .images import ImageBatch, read_image, read_images
from .scorer import Scorer, score_dataset

__all__ = ["CheckpointError", "ExportedModel", "ImageBatch", "Scorer", "load_model", "open_checkpoint", "read_image",
           "read_images", "score_dataset"]
