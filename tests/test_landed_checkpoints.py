"""Checkpoints written by the landed code (before the restructuring of issue 18) still load and
score identically. The fixtures were made by ``tests/fixtures/make_landed_checkpoints.py`` at
commit 5c2a164 (FastFlow and CFLOW-AD on efficientnet_lite0's packaged weights, 64 px, one epoch
of AltUB on the synthetic carpet, calibrated by the trainer)."""
import os

import pytest
import torch

from altub_fast.train import load_model

from fixtures.make_landed_checkpoints import probe_images

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.mark.parametrize("name", ["fastflow", "cflow"])
def test_landed_checkpoint_scores_identically(name):
    expected = torch.load(os.path.join(HERE, f"landed_{name}_expected.pt"), weights_only=False)
    model = load_model(os.path.join(HERE, f"landed_{name}.pt"))
    assert model.calibrated
    assert model.score_mode == expected["score_mode"]
    with torch.no_grad():
        maps, scores = model.anomaly_map(probe_images())
    torch.testing.assert_close(maps, expected["maps"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores, expected["scores"], rtol=1e-4, atol=1e-12)
    ck = torch.load(os.path.join(HERE, f"landed_{name}.pt"), map_location="cpu", weights_only=False)
    assert ck["threshold"] == expected["threshold"]
