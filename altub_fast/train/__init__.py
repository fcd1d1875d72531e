"""Training with AltUB's alternating schedule (SPEC section 2), checkpoints, DDP, inference.

    from altub_fast.models import build_model
    from altub_fast.train import AltUBTrainer, predict

    model = build_model("fastflow", "wide_resnet50_2", image_size=256, altub=True)
    trainer = AltUBTrainer(model, train_dataset, epochs=500, batch_size=32, checkpoint_dir="runs/carpet")
    history = trainer.fit()                  # list of per-epoch dicts (also logged, optionally JSONL)
    result = predict(model, test_dataset)    # {"maps": (N, H, W), "scores": (N,), "labels", "masks", ...}

The schedule. Updates are numbered u = 1, 2, ... (one per image batch for FastFlow, one per fiber
batch for CFLOW-AD). With ``altub=True``, update u is *base-only* when u > warmup and u % k == 0
(``unit="step"``; with ``unit="epoch"`` the same rule applies to the 1-based epoch number and every
update of such an epoch is base-only). Ordinary updates step the flow optimiser (Adam; FastFlow lr
1e-3, weight decay 1e-5; CFLOW-AD lr 2e-4) on theta_flow and on theta_base, the latter in its own
parameter group with weight decay 0. Base-only updates run the flow without a graph, leave the flow
optimiser (and its state) untouched, clip the base gradients by value (100) and step a separate
base optimiser (SGD; or Adam) with lr = r * the flow optimiser's current lr (r = 5). These follow
the code of the AltUB paper's first author (``(epoch+1) % ALTUB_EPOCH == 0 and (epoch+1) >
SCHEDULER_T_0``); every constant is a knob. ``altub=False`` models train as the plain baselines.

The feature cache. The backbone is frozen and nothing is augmented, so by default
(``cache_features=True``) every training image goes through the backbone once and the flows train
on the cached features.

Data: a Dataset or DataLoader yielding image tensors, tuples whose first item is the image tensor,
or dicts with an ``"image"`` key (``altub_fast.data.MVTecAD``). A DataLoader's dataset, batch size,
workers and collate function are used; its sampler is replaced by the trainer's seeded sampler
(the permutation of epoch e depends only on (seed, e)), which makes resuming exact and shards the
data under DDP like DistributedSampler.

DDP: run under ``torchrun``; the trainer initialises torch.distributed from the environment (NCCL on
CUDA, gloo on CPU), wraps the trainable parts in DistributedDataParallel and shards the data. The
base is all-reduced like every other parameter on ordinary updates, and explicitly on base-only
updates; the schedule is the same on every rank.

Where things are: ``trainer.py`` (AltUBTrainer, train: the loop over the parts below),
``features.py`` (FeatureSource: training, held-out and NLL feature batches, cached or extracted),
``updates.py`` (FlowUpdate, BaseOnlyUpdate, NonFinitePolicy, NonFiniteLossError), ``store.py``
(CheckpointStore: checkpoint state, atomic save/load, the restored split, calibration of
last/best), ``schedule.py`` (AltUBSchedule, TrainConfig, make_config), ``batches.py`` (the seeded
sampler and loaders), ``cache.py`` (building, checking and reading the feature cache),
``stats.py`` (the epoch's tally, z statistics and the epoch line), ``checkpoint.py`` (atomic_save,
load_checkpoint_file, build_model_from_checkpoint, load_model, RNG states), ``distributed.py``
(DDP set-up and collectives), ``heldout.py`` (the held-out normal split), ``validation.py`` (what
the trainer checks of a model; the NLL), ``stopping.py`` (best epoch, when to stop).

``predict`` is ``altub_fast.inference.score_dataset`` (the layer above training), looked up when
first asked for, so that importing the trainer does not import inference.
"""
from .batches import dataset_of, epoch_batches, make_loader
from .cache import build_feature_cache, check_feature_cache
from .checkpoint import (CHECKPOINT_FORMAT, atomic_save, build_model_from_checkpoint, load_checkpoint_file,
                         load_model, rng_state, set_rng_state)
from .distributed import setup_distributed
from .heldout import HeldoutSplit, dataset_files, make_split, split_indices
from .schedule import NONFINITE_POLICIES, AltUBSchedule, TrainConfig, make_config
from .stats import ZStats, format_record, scale_stats
from .trainer import AltUBTrainer, NonFiniteLossError, train


def __getattr__(name: str):
    if name == "predict":   # scoring a dataset is inference's: altub_fast.inference.score_dataset
        from ..inference.scorer import score_dataset
        return score_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AltUBSchedule", "AltUBTrainer", "atomic_save", "build_feature_cache", "build_model_from_checkpoint",
    "check_feature_cache", "CHECKPOINT_FORMAT", "dataset_files", "dataset_of", "epoch_batches",
    "format_record", "HeldoutSplit", "load_checkpoint_file", "load_model", "make_config", "make_loader",
    "make_split", "NONFINITE_POLICIES", "NonFiniteLossError", "predict", "rng_state", "scale_stats",
    "set_rng_state", "setup_distributed", "split_indices", "train", "TrainConfig", "ZStats",
]
