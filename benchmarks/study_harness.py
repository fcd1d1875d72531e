"""What the long studies share (``study_altub.py``, ``study_scores.py``, ``study_defaults.py``):
the timestamped log, the atomic JSON save, the runner that records a failed job and goes on, the
merge of results written by processes run side by side, the markdown table writer, and the small
pieces of data handling and label-free stopping they all use. Each study keeps only its arms, its
evaluation and its report. ``report.py`` (the pytest-benchmark tables) uses the table writer too.

A study script imports this module as ``import study_harness`` (benchmarks/ is put on sys.path by
the script itself, so that it runs as ``python benchmarks/<study>.py`` and loads in the tests).
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

if TYPE_CHECKING:   # torch is imported where it is used: report.py takes the tables without it
    import torch

#: The trainer's ``epochs="auto"``: stop when the held-out NLL has not improved (by ``min_delta``)
#: for ``patience`` epochs, after at least ``min_epochs``; keep the best epoch.
AUTO_RULE = dict(patience=5, min_epochs=5, min_delta=0.0)


# ----------------------------------------------------------------------------- log and JSON
def log(msg: str, stamp: str = "%H:%M:%S") -> None:
    """``msg`` on stdout after the time (``stamp``, a strftime format), flushed at once."""
    print(time.strftime(stamp), msg, flush=True)


def save_json(obj: Any, path: str, **dump_options) -> None:
    """Write ``obj`` to ``path`` atomically (a ``.tmp`` beside it, then renamed): a study stopped
    mid-write leaves the previous file whole. ``dump_options`` go to :func:`json.dump`."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **dump_options)
    os.replace(tmp, path)


def _commands(config: Dict[str, Any]) -> List[str]:
    c = config["command"]
    return [c] if isinstance(c, str) else list(c)


def merge_results(parts: Iterable[Dict[str, Any]],
                  run_key: Optional[Callable[[Dict[str, Any]], tuple]] = None) -> Dict[str, Any]:
    """One results dict from several (studies split over processes): the first one's config with
    every command listed, the data sets in first-seen order, the kNN results and errors of all,
    and every run; with ``run_key``, a run present twice is kept once (its finished copy where the
    first one is ``partial``)."""
    merged: Dict[str, Any] = {}
    for r in parts:
        if not merged:
            merged = dict(r, runs=[], knn=dict(r["knn"]), datasets=dict(r["datasets"]), errors=list(r.get("errors", [])))
            merged["config"] = dict(r["config"], command=_commands(r["config"]))
        else:
            merged["datasets"].update({k: v for k, v in r["datasets"].items() if k not in merged["datasets"]})
            merged["knn"].update(r["knn"])
            merged["errors"] += r.get("errors", [])
            merged["config"]["command"] += _commands(r["config"])
        for run in r["runs"]:
            old = [] if run_key is None else [i for i, o in enumerate(merged["runs"]) if run_key(o) == run_key(run)]
            if not old:
                merged["runs"].append(run)
            elif merged["runs"][old[0]].get("partial") and not run.get("partial"):
                merged["runs"][old[0]] = run
    return merged


# ----------------------------------------------------------------------------- the runner
def run_jobs(jobs: Iterable[Tuple[str, Callable[[], Any]]], results: Dict[str, Any], save: Callable[[], None],
             before: Optional[Callable[[int, str], None]] = None) -> None:
    """Run each ``(label, job)`` in order, then ``save()``. A job that raises does not end the
    study: its traceback goes to the log and ``"<label>: <error>"`` to ``results["errors"]``.
    ``before(i, label)`` is called ahead of job ``i`` (0, 1, ...), e.g. to log the progress."""
    for i, (label, job) in enumerate(jobs):
        if before is not None:
            before(i, label)
        try:
            job()
        except Exception as e:  # one failed job must not end the study: recorded, logged
            traceback.print_exc()
            results.setdefault("errors", []).append(f"{label}: {e!r}")
        save()


# ----------------------------------------------------------------------------- markdown
def md_row(cells: Sequence[Any]) -> str:
    """One markdown table row: ``| a | b |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]] = (),
             align: Optional[Sequence[str]] = None) -> List[str]:
    """A markdown table's lines: the header, the rule (``---`` per column, or ``align``'s markers
    such as ``---:``) and one line per row."""
    rule = "|" + "".join(f"{a}|" for a in (align or ["---"] * len(header)))
    return [md_row(header), rule] + [md_row(r) for r in rows]


def write_summary(lines: Sequence[str], path: str, plot: Optional[Callable[[], None]] = None) -> None:
    """``lines`` written as the markdown file ``path``, then ``plot()`` where given: a plot that
    fails is logged and skipped (plots are a convenience; the tables are the record)."""
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    if plot is not None:
        try:
            plot()
        except Exception as e:
            log(f"plotting failed: {e}")


# ----------------------------------------------------------------------------- data and stopping
class Stack(NamedTuple):
    """A whole (small) data set in memory: images, masks (None where it has none), labels (N,)
    and defect names."""

    images: torch.Tensor
    masks: Optional[torch.Tensor]
    labels: torch.Tensor
    defects: List[str]


def load_stack(dataset, indices: Optional[Sequence[int]] = None, batch_size: int = 32) -> Stack:
    """Every item of ``dataset`` (or of its ``indices``), in order, as one :class:`Stack`."""
    import torch
    from torch.utils.data import DataLoader, Subset
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    images, masks, labels, defects = [], [], [], []
    for b in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images.append(b["image"])
        if "mask" in b:
            masks.append(b["mask"])
        labels.append(torch.as_tensor(b["label"]).reshape(-1))
        defects.extend(b.get("defect", []))
    return Stack(torch.cat(images), torch.cat(masks) if masks else None, torch.cat(labels), defects)


def feature_batches(feats: List[torch.Tensor], batch_size: int = 32) -> List[List[torch.Tensor]]:
    """Per-scale feature tensors cut into batches along the first axis."""
    return [[f[i:i + batch_size] for f in feats] for i in range(0, feats[0].shape[0], batch_size)]


def auto_choice(curve: Sequence[float], rule: Dict[str, Any] = AUTO_RULE) -> Dict[str, Any]:
    """The label-free rule on a held-out NLL curve (epoch 1, 2, ...): ``{"stop", "chosen",
    "stopped"}``: the epoch it stops at (the last one where it never stops), the epoch of the lowest
    NLL up to then, and whether it stopped."""
    best, best_e = math.inf, 0
    for e, v in enumerate(curve, start=1):
        if v < best - rule["min_delta"]:
            best, best_e = v, e
        if e >= rule["min_epochs"] and e - best_e >= rule["patience"]:
            return {"stop": e, "chosen": best_e, "stopped": True}
    return {"stop": len(curve), "chosen": best_e, "stopped": False}


def default_data_root() -> str:
    """``shared/data`` beside the repository (the studies' default ``--data-root``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, os.pardir, os.pardir, "shared", "data")
