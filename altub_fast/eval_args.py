"""eval's command line: its options, the checks on them, and where the data comes from.

:func:`build_parser` declares the options (in four groups: data, model, training, run);
:func:`check_args` fills the defaults that depend on other options and says what is wrong with the
rest; :func:`data_root` says which folder holds the category and why that one. A problem is a
:class:`UsageError`, which ``eval.main`` prints and answers with exit status 2.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Tuple

DEFAULT_MVTEC_ROOT = "./data/mvtec"
SYNTHETIC_CATEGORY = "carpet_synthetic"
DEFAULT_MAX_EPOCHS = 100
SYNTHETIC_MAX_EPOCHS = 10    # keeps the offline main job within ~3 minutes on a 2-core CPU


class UsageError(Exception):
    """A bad option or missing data: the message is printed after ``error:`` (``plain``: as it is)."""

    def __init__(self, message: str, plain: bool = False):
        super().__init__(message)
        self.plain = plain


def _cache_dir() -> Path:
    return Path(os.environ.get("ALTUB_FAST_CACHE", Path.home() / ".cache" / "altub_fast"))


def _epochs(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--epochs takes a number or 'auto', not {text!r}") from None


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,10, got {text!r}") from None


def build_parser(description: str) -> argparse.ArgumentParser:
    """eval's parser; ``description``: the first paragraph of eval's docstring."""
    p = argparse.ArgumentParser(prog="python -m altub_fast.eval", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_options(p.add_argument_group("data"))
    _model_options(p.add_argument_group("model"))
    _training_options(p.add_argument_group("training"))
    _run_options(p.add_argument_group("run"))
    return p


def _data_options(d) -> None:
    d.add_argument("--category", default=None, help="MVTec AD category (e.g. carpet), or any folder name under "
                   "the data root in MVTec AD layout (default: carpet; carpet_synthetic with --synthetic)")
    d.add_argument("--data-root", default=None, help=f"folder holding <category>/ (default: $MVTEC_ROOT or "
                   f"{DEFAULT_MVTEC_ROOT}; with --synthetic: $ALTUB_FAST_CACHE/synthetic)")
    d.add_argument("--download", action="store_true", help="download the MVTec AD category first (about 4.9 GB "
                   "archive; licence CC BY-NC-SA 4.0, non-commercial)")
    d.add_argument("--synthetic", action="store_true", help="use the synthetic carpet generated from --seed "
                   "(no download; efficientnet_lite0 backbone by default)")
    d.add_argument("--image-size", type=int, default=256)


def _model_options(m) -> None:
    m.add_argument("--model", choices=("fastflow", "cflow"), default="fastflow")
    m.add_argument("--backbone", default=None, help="timm backbone or efficientnet_lite0 (default: "
                   "wide_resnet50_2; efficientnet_lite0 with --synthetic)")
    m.add_argument("--weights", default=None, help="local backbone state_dict file, for machines without network")
    m.add_argument("--no-pretrained", action="store_true", help="random backbone weights (for testing only)")
    m.add_argument("--no-altub", action="store_true", help="baseline: fixed N(0, I) base instead of AltUB's")
    m.add_argument("--flow-steps", type=int, default=None, help="blocks per flow (default: the model's)")
    m.add_argument("--checkpoint", default=None, help="load a trained checkpoint instead of training")
    m.add_argument("--score", choices=("loglik", "fastflow", "cflow"), default=None,
                   help="anomaly map: loglik (full log-likelihood standardised on held-out normals), fastflow "
                        "(the FastFlow paper's), cflow (CFLOW-AD's) (default: loglik for FastFlow, cflow for "
                        "CFLOW-AD, chosen by the worst data set in docs/results.md; a --checkpoint keeps its own; "
                        "fastflow for both runs of --compare-reference with FrEIA's block, which has no per-pixel "
                        "log-det)")
    m.add_argument("--image-score", default=None, help="image score: [MAP/]max, [MAP/]topk or [MAP/]topk:F (the "
                   "mean of the top fraction F of pixels of MAP, default the pixel map) (default: fastflow/topk:0.2)")
    m.add_argument("--feature-blocks", default=None, type=_int_list,
                   help="efficientnet_lite0 only: the MBConv blocks to take features from, e.g. 4,10 "
                        "(default: the model's, see docs/results.md)")
    m.add_argument("--published-loss", action="store_true",
                   help="FastFlow: the published loss, without the LayerNorm's log-det (reproduces "
                        "gathierry/FastFlow and anomalib; the default counts it, so the loss is an exact NLL)")


def _training_options(t) -> None:
    t.add_argument("--epochs", type=_epochs, default="auto",
                   help="a number, or auto (default): stop when the held-out NLL has not improved for --patience "
                        "epochs, after at least --min-epochs and at most --max-epochs")
    t.add_argument("--max-epochs", type=int, default=None,
                   help=f"with --epochs auto (default {DEFAULT_MAX_EPOCHS}; {SYNTHETIC_MAX_EPOCHS} with --synthetic)")
    t.add_argument("--min-epochs", type=int, default=5, help="with --epochs auto (default 5)")
    t.add_argument("--patience", type=int, default=5, help="with --epochs auto (default 5)")
    t.add_argument("--max-fpr", type=float, default=0.01,
                   help="false-alarm rate of the label-free threshold set at the end of training from the held-out "
                        "normal images' scores (default 0.01); eval reports precision / recall / F1 at it")
    t.add_argument("--batch-size", type=int, default=None, help="default 32 (FastFlow) / fiber batch 256 (CFLOW-AD)")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="normal images held out of training for the held-out NLL, the checkpoint choice and the "
                        "threshold: <category>/validation/good when it exists, else this seeded fraction of "
                        "train/good (default 0.1; 0: none)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/<run>/last.pt if present")
    t.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")


def _run_options(r) -> None:
    r.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    r.add_argument("--impl", choices=("auto", "triton", "torch"), default=None,
                   help="fused-kernel implementation (default: $ALTUB_FAST_IMPL or auto)")
    r.add_argument("--runtime", choices=("auto", "torch", "onnxruntime", "openvino"), default="auto",
                   help="what scores the test set: auto (default: the fastest installed of onnxruntime, openvino; "
                        "else torch), torch (eager PyTorch), onnxruntime, openvino (each checkpoint exported once, "
                        "cached beside it and checked against PyTorch on the first batch; training is PyTorch)")
    r.add_argument("--compare-reference", action="store_true",
                   help="also train the reference implementation (FrEIA 0.2's AllInOneBlock for FastFlow, the "
                        "plain PyTorch path for CFLOW-AD) on the same data and seed; report both")
    r.add_argument("--out", default=None, help="output folder (default: runs/<category>-<model>)")
    r.add_argument("--num-overlays", type=int, default=8)
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def missing_data_message(root: Path, category: str, where: str) -> str:
    return (f"no data for category {category!r}: looked for {root / category} (data root {root}, from {where}).\n"
            f"  - Get MVTec AD: python -m altub_fast.eval --category {category} --data-root {root} --download\n"
            f"    (one 4.9 GB archive from MVTec, licence CC BY-NC-SA 4.0: non-commercial use, cite MVTec)\n"
            f"  - or point --data-root / $MVTEC_ROOT at a folder holding {category}/train/good, {category}/test, "
            f"{category}/ground_truth\n"
            f"  - or run the whole pipeline on the built-in synthetic carpet: python -m altub_fast.eval --synthetic")


def check_args(args) -> None:
    """Fill ``--max-epochs``' default and raise :class:`UsageError` for options that cannot work."""
    if args.synthetic and args.download:
        raise UsageError("--synthetic and --download exclude each other")
    if args.max_epochs is None:
        args.max_epochs = SYNTHETIC_MAX_EPOCHS if args.synthetic else DEFAULT_MAX_EPOCHS
    if args.epochs != "auto" and args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1 or auto, got {args.epochs}")
    if not 1 <= args.max_epochs or not 0 <= args.min_epochs <= args.max_epochs or args.patience < 1:
        raise UsageError(f"need --max-epochs >= 1, 0 <= --min-epochs <= --max-epochs and --patience >= 1 (got "
                         f"{args.max_epochs}, {args.min_epochs}, {args.patience})")
    if not 0.0 <= args.max_fpr < 1.0:
        raise UsageError(f"--max-fpr must be in [0, 1), got {args.max_fpr}")
    if not 0.0 <= args.heldout_fraction < 1.0:
        raise UsageError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    if args.image_size < 32:
        raise UsageError(f"--image-size must be at least 32, got {args.image_size}")


def data_root(args) -> Tuple[Path, str]:
    """(the folder holding <category>/, where that choice came from); fills the category and, for
    --synthetic, the backbone defaults."""
    if args.synthetic:
        args.category = args.category or SYNTHETIC_CATEGORY
        args.backbone = args.backbone or "efficientnet_lite0"
        where = "--data-root" if args.data_root else "$ALTUB_FAST_CACHE/synthetic"
        return Path(args.data_root or _cache_dir() / "synthetic"), where
    args.category = args.category or "carpet"
    if args.data_root:
        return Path(args.data_root), "--data-root"
    if os.environ.get("MVTEC_ROOT"):
        return Path(os.environ["MVTEC_ROOT"]), "$MVTEC_ROOT"
    return Path(DEFAULT_MVTEC_ROOT), "the default"


def check_files(args) -> None:
    """--checkpoint and --weights must name existing files."""
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UsageError(f"checkpoint {args.checkpoint} does not exist")
    if args.weights and not Path(args.weights).is_file():
        raise UsageError(f"weights file {args.weights} does not exist")


def epochs_text(args) -> str:
    if args.epochs != "auto":
        return f"{args.epochs} epochs"
    return (f"epochs auto (held-out NLL, patience {args.patience}, {args.min_epochs}-{args.max_epochs} epochs)")
