"""Which checkpoints an eval run scores, what each says about itself, and their thresholds.

After training, eval scores the checkpoint chosen on the held-out NLL (best.pt) and, where it holds
another epoch, last.pt; with ``--checkpoint``, that file (scored with ``--score`` /
``--image-score`` where given). :func:`checkpoints_to_score` gives, by name, what results.json says
of each checkpoint, the threshold stored in it, and the model to score; :func:`threshold_for` turns
a stored threshold into results.json's (recomputed at ``--max-fpr`` from the stored held-out scores).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

__all__ = ["apply_score_rules", "checkpoint_info", "checkpoints_to_score", "threshold_for", "trained_checkpoints"]


def checkpoints_to_score(args, training, device: str):
    """(checkpoints: name -> what results.json says of it, stored: name -> its stored threshold,
    the chosen one's name, models: name -> the model to score): --checkpoint alone; after training
    the chosen best.pt and, where it is another epoch, last.pt as well."""
    from .inference import load_model

    if args.checkpoint:
        info, stored = checkpoint_info(args.checkpoint)
        if training.rules_changed:   # the stored threshold was set on held-out scores of the checkpoint's own rules
            stored = None
            print(f"note: scoring with --score {training.model.scorer.mode} / --image-score "
                  f"{training.model.scorer.image_score_spec} instead of the checkpoint's rules: its stored threshold does "
                  "not apply, so no decisions are reported")
        return {"checkpoint": info}, {"checkpoint": stored}, "checkpoint", {"checkpoint": training.model}
    checkpoints, stored, chosen = trained_checkpoints(training.trainer, training.ckpt_dir)
    models = {"last": training.model}
    if chosen == "best":
        models["best"] = load_model(checkpoints["best"]["path"], device=device)
    return checkpoints, stored, chosen, models


def apply_score_rules(model, score: Optional[str], image_score: Optional[str]) -> bool:
    """Score a loaded checkpoint with ``--score`` / ``--image-score`` where given (an old checkpoint
    otherwise keeps its own rules). Every mode's constants were calibrated together on the held-out
    images, so switching needs no data. True when a rule changed."""
    from .models.scoring import check_score_mode, parse_image_rule

    scorer, before = model.scorer, (model.scorer.mode, model.scorer.image_score_rule)
    if score is not None:
        scorer.mode = check_score_mode(score)
    if image_score is not None:
        scorer.set_image_rule(parse_image_rule(image_score))
    return (scorer.mode, scorer.image_score_rule) != before


def checkpoint_info(path) -> Tuple[dict, Optional[dict]]:
    """(what a checkpoint file says about itself: kind, epoch, why it was chosen; its stored threshold)."""
    from .train import load_checkpoint_file

    ck = load_checkpoint_file(str(path))
    sel = ck.get("selection") or {}
    kind = ck.get("kind", "last")
    entry = sel.get(kind) or {}
    return ({"path": str(path), "kind": kind, "epoch": int(ck["epoch"]), "heldout_nll": entry.get("heldout_nll"),
             "why": entry.get("why")}, ck.get("threshold"))


def threshold_for(stored: Optional[dict], max_fpr: float) -> Optional[dict]:
    """A checkpoint's threshold for results.json (without the held-out scores); at ``max_fpr``,
    recomputed from the stored held-out scores where the checkpoint's was set at another rate."""
    from .metrics import threshold_at_fpr

    if not stored:
        return None
    out = {k: v for k, v in stored.items() if k != "heldout_scores"}
    if stored.get("heldout_scores") and abs(float(stored["max_fpr"]) - max_fpr) > 1e-12:
        out.update(value=threshold_at_fpr(stored["heldout_scores"], max_fpr), max_fpr=max_fpr,
                   note=f"recomputed at --max-fpr {max_fpr:g} from the checkpoint's held-out scores "
                        f"(stored at {stored['max_fpr']:g})")
    return out


def trained_checkpoints(trainer, ckpt_dir: Path):
    """({"best": ..., "last": ...}, their stored thresholds by the same names, the chosen one's name)
    after training: best.pt where the run had held-out images (chosen), else last.pt."""
    from .train import load_checkpoint_file

    sel = trainer.selection()
    out = {"last": dict(sel["last"], path=str(ckpt_dir / "last.pt"))}
    stored = {"last": trainer.threshold}
    best_path = ckpt_dir / "best.pt"
    if sel["best"] is not None and best_path.is_file():
        out["best"] = dict(sel["best"], path=str(best_path))
        stored["best"] = load_checkpoint_file(str(best_path)).get("threshold")
        if out["best"]["epoch"] != out["last"]["epoch"]:
            return out, stored, "best"
        out["best"]["why"] += "; the same epoch as last.pt"
    return out, stored, "last"
