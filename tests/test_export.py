"""python -m altub_fast.export: ONNX, OpenVINO and TorchScript files of FastFlow and CFLOW-AD that
reproduce PyTorch's maps and scores (1e-4 relative) at other batch sizes than the one exported,
with no custom op in the graph, and a loud failure when they do not."""
import copy
import json

import numpy as np
import pytest
import torch

from altub_fast import export as E
from altub_fast import functional
from altub_fast.inference import graph as G
from altub_fast.cli import main as altub_fast_main
from altub_fast.imagenet import IMAGENET_MEAN, IMAGENET_STD
from altub_fast.train import load_model
from test_predict import SIZE, make_checkpoint, with_threshold

pytest.importorskip("onnx", reason="onnx is a dev dependency")
pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency")
pytest.importorskip("openvino", reason="openvino is a dev dependency")


def pytorch_reference(ckpt, images01):
    """The checkpoint's own model, its own normalisation, eager PyTorch."""
    model = load_model(str(ckpt))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    maps, scores = model.anomaly_map((torch.from_numpy(images01) - mean) / std)
    return maps.numpy(), scores.numpy()


def rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=["fastflow", "cflow"])
def exported(request, tmp_path_factory):
    """One CLI call per model writing all three formats (the graph is exported once)."""
    d = tmp_path_factory.mktemp(f"export_{request.param}")
    ckpt = with_threshold(make_checkpoint(d / "ckpt", request.param), d, 1.25)
    rc = E.main(["--checkpoint", str(ckpt), "--format", "onnx", "openvino", "torchscript", "--out", str(d / "model")])
    assert rc == E.EXIT_OK
    return request.param, ckpt, d


@pytest.mark.parametrize("fmt", E.FORMATS)
def test_round_trip_against_pytorch(exported, fmt):
    kind, ckpt, d = exported
    path = d / ("model" + E.SUFFIXES[fmt])
    assert path.is_file()
    runner = E.ExportedModel(path)
    assert runner.format == fmt
    for n in (5, 1):   # neither is the exported example's batch size (2)
        images = E.check_images((SIZE, SIZE), n, seed=7 + n)
        maps, scores = runner(images)
        ref_maps, ref_scores = pytorch_reference(ckpt, images)
        assert maps.shape == (n, SIZE, SIZE) and scores.shape == (n,) and maps.dtype == np.float32
        assert rel(maps, ref_maps) <= 1e-4 and rel(scores, ref_scores) <= 1e-4, (kind, fmt, n)
    meta = json.loads((d / ("model" + E.SUFFIXES[fmt] + ".json")).read_text())
    assert meta["format"] == fmt and meta["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert meta["threshold"]["value"] == 1.25 and meta["model"]["name"] == kind
    assert meta["check"]["batch_sizes"] == [1, 3] and meta["check"]["max_rel_err_maps"] <= 1e-4
    # the model was calibrated (non-default score constants), so matching PyTorch means they are baked in
    assert meta["calibrated"] is True
    if fmt == "openvino":
        assert (d / "model.bin").is_file()


def test_onnx_graph_is_standard_with_a_free_batch_axis(exported):
    import onnx

    _, _, d = exported
    proto = onnx.load(str(d / "model.onnx"))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["maps", "scores"]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value


def test_export_runs_the_plain_pytorch_path(monkeypatch):
    monkeypatch.setenv("ALTUB_FAST_IMPL", "triton")      # what the model would otherwise run
    torch.manual_seed(0)
    from altub_fast.models import build_model
    model = build_model("fastflow", "resnet18", pretrained=False, image_size=32, out_indices=(1,), flow_steps=2,
                        hidden_ratio=0.25).eval()
    before = dict(functional.CALLS)
    module = E.prepare_for_export(model)
    x = E.check_images((32, 32), 2)
    with torch.no_grad():
        maps, _ = module(torch.from_numpy(x))
    ran = {k: v - before.get(k, 0) for k, v in functional.CALLS.items() if v != before.get(k, 0)}
    assert ran and all(k.endswith(":torch") for k in ran)
    assert all(getattr(m, "impl", "torch") == "torch" for m in module.modules())
    assert not module.model.check_finite
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    monkeypatch.setenv("ALTUB_FAST_IMPL", "torch")
    eager, _ = model.anomaly_map((torch.from_numpy(x) - mean) / std)
    # the graph is the plain path bit for bit, once the model's LayerNorm (64 x 8 x 8 values) takes
    # its statistics in float64 as the export does; and that changes the maps by rounding only
    assert [type(m) for m in module.model.norms] == [G.PreciseLayerNorm]
    precise = copy.deepcopy(model)
    G.precise_layer_norms(precise)
    ref, _ = precise.anomaly_map((torch.from_numpy(x) - mean) / std)
    torch.testing.assert_close(maps, ref, rtol=0, atol=0)
    torch.testing.assert_close(maps, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))


def test_large_layer_norms_export_with_float64_statistics(tmp_path):
    """FastFlow's LayerNorm over a whole feature map (64 x 64 x 64 values, post-ReLU-like: positive,
    skewed) in ONNX Runtime: within 1e-6 of float64 once exported as PreciseLayerNorm (ONNX's own
    LayerNormalization drifted by 4e-5 there, enough to fail the runtime check at batch 8)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm([64, 64, 64])
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.relu(torch.randn(4, 64, 64, 64) * 2.0 + 0.5) + 3.0 * torch.rand(4, 64, 1, 1)
    with torch.no_grad():
        ref = torch.nn.functional.layer_norm(x.double(), [64, 64, 64], norm.weight.double(), norm.bias.double())
    module = torch.nn.Sequential(copy.deepcopy(norm))
    G.precise_layer_norms(module)
    assert type(module[0]) is G.PreciseLayerNorm and module[0].weight is not norm.weight
    with torch.no_grad():
        eager = module(x)
    assert rel(eager.numpy(), ref.numpy()) <= 1e-6
    torch.testing.assert_close(eager, norm(x).detach(), rtol=1e-5, atol=1e-5)
    path = tmp_path / "norm.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (x[:1],), str(path), dynamo=True, input_names=["x"], report=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert "LayerNormalization" not in ops and "Cast" in ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert rel(got, ref.numpy()) <= 1e-6
    # a small LayerNorm (a ViT's, over its embedding) stays as it is
    small = torch.nn.Sequential(torch.nn.LayerNorm(384))
    G.precise_layer_norms(small)
    assert type(small[0]) is torch.nn.LayerNorm


def test_a_failed_check_is_loud_and_deletes_the_file(tmp_path, monkeypatch, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    real_call = E.ExportedModel.__call__

    def off_by_a_bit(self, images):
        maps, scores = real_call(self, images)
        return maps * 1.001, scores
    monkeypatch.setattr(E.ExportedModel, "__call__", off_by_a_bit)
    out = tmp_path / "bad.pt"
    assert E.main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == E.EXIT_FAILED
    err = capsys.readouterr().err
    assert "does not reproduce PyTorch" in err and "deleted" in err
    assert not out.exists() and not (tmp_path / "bad.pt.json").exists()


def test_bad_checkpoints_and_arguments(tmp_path, capsys):
    data = b"PK\x03\x04 not really a zip"
    (tmp_path / "truncated.pt").write_bytes(data)
    assert E.main(["--checkpoint", str(tmp_path / "truncated.pt"), "--format", "onnx"]) == E.EXIT_USAGE
    assert "truncated" in capsys.readouterr().err
    torch.save({"format": "altub_fast.checkpoint/0"}, tmp_path / "old.pt")
    assert altub_fast_main(["export", "--checkpoint", str(tmp_path / "old.pt"), "--format", "onnx"]) == E.EXIT_USAGE
    assert "not an altub_fast training checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        E.main(["--checkpoint", str(tmp_path / "old.pt"), "--format", "tflite"])


def test_output_paths():
    assert E.output_paths(["onnx"], "runs/x/last.pt") == {"onnx": E.Path("runs/x/last.onnx")}
    assert E.output_paths(["torchscript"], "c.pt", "deploy/m.pt") == {"torchscript": E.Path("deploy/m.pt")}
    both = E.output_paths(["onnx", "openvino"], "c.pt", "deploy/m")
    assert both == {"onnx": E.Path("deploy/m.onnx"), "openvino": E.Path("deploy/m.xml")}
    assert E.format_of("a/b.xml") == "openvino" and E.format_of("m.torchscript.pt") == "torchscript"
    with pytest.raises(ValueError, match="cannot tell the format"):
        E.format_of("model.bin")
