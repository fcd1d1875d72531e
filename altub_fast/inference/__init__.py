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
:func:`read_images`, :class:`ImageBatch`, :func:`try_read_image`; normalisation an explicit choice, constants from
:mod:`altub_fast.imagenet`), ``scorer.py`` (:class:`Scorer`, the object a runtime backend would
replace, and :func:`score_dataset`, formerly ``altub_fast.train.predict``), ``exported.py``
(:class:`ExportedModel`: a file written by ``altub_fast.export`` run in onnxruntime, OpenVINO or
torch.jit; it takes un-normalised images), ``graph.py`` (the exportable module and the ONNX /
OpenVINO / TorchScript writers, shared by ``altub_fast.export`` and the runtime cache),
``runtime.py`` (which runtimes are installed, ``auto``'s measured order, the ``[export]`` extra's
one-line message), ``export_cache.py`` (exports cached beside the checkpoint, keyed and verified),
``runtime_scorer.py`` (:func:`make_scorer`, :class:`RuntimeScorer`: a Scorer running the cached
export, checked against PyTorch on the first batch), ``pipeline.py`` (:func:`read_ahead`: files
decoded on worker threads while the model scores).

    scorer = make_scorer(model, "auto", checkpoint="last.pt")    # onnxruntime / openvino / torch
"""
from .checkpoint import CheckpointError, load_model, open_checkpoint
from .exported import ExportedModel
from .images import ImageBatch, read_image, read_images
from .scorer import Scorer, score_dataset
from .pipeline import read_ahead
from .runtime import RuntimeUnavailable, resolve_runtime
from .runtime_scorer import RuntimeScorer, describe_runtime, make_scorer

__all__ = ["CheckpointError", "ExportedModel", "ImageBatch", "RuntimeScorer", "RuntimeUnavailable", "Scorer",
           "describe_runtime", "load_model", "make_scorer", "open_checkpoint", "read_ahead", "read_image",
           "read_images", "resolve_runtime", "score_dataset"]
