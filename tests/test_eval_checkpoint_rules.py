"""``--score`` / ``--image-score`` given with ``--checkpoint`` are honoured (issue 19); without them
an old checkpoint keeps its own rules. Uses the landed FastFlow checkpoint fixture (64 px)."""
import json
import os
import shutil

import torch

from altub_fast import eval as cli
from altub_fast.eval import apply_score_rules
from altub_fast.train import load_model

CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "landed_fastflow.pt")


def _eval(tmp_path, *extra):
    out = tmp_path / ("o" + "_".join(e.strip("-") for e in extra))
    ckpt = tmp_path / os.path.basename(CKPT)   # a copy: the runtime's export cache goes beside the checkpoint
    if not ckpt.exists():
        shutil.copyfile(CKPT, ckpt)
    code = cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--image-size", "64", "--checkpoint", str(ckpt),
                     "--out", str(out), "--quiet", "--num-overlays", "0", *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())["runs"][0]


def test_apply_score_rules_changes_only_what_is_given():
    m = load_model(CKPT)
    assert (m.scorer.mode, m.scorer.image_rule) == ("fastflow", "topk")
    assert not apply_score_rules(m, None, None)
    assert apply_score_rules(m, "loglik", None) and m.scorer.mode == "loglik" and m.scorer.image_rule == "topk"
    assert apply_score_rules(m, None, "max") and m.scorer.image_rule == "max"


def test_eval_checkpoint_honours_score_and_image_score(tmp_path, capsys):
    own = _eval(tmp_path)
    loglik = _eval(tmp_path, "--score", "loglik", "--image-score", "max")
    assert own["threshold"] is not None and own["threshold"]["score_mode"] == "fastflow"
    assert loglik["threshold"] is None            # the stored one belongs to the checkpoint's rules
    assert "instead of the checkpoint's rules" in capsys.readouterr().out
    # the maps really changed: same checkpoint, same test set, other metrics
    assert any(abs(own["metrics"][k] - loglik["metrics"][k]) > 1e-6 for k in ("image_auroc", "pixel_auroc"))
    m = load_model(CKPT)
    apply_score_rules(m, "loglik", "max")
    x = torch.rand(2, 3, 64, 64)
    maps, scores = m.anomaly_map(x)
    torch.testing.assert_close(scores, maps.flatten(1).max(1).values)
