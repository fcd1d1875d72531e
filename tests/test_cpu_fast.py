"""The CPU fast path (altub_fast.nn.cpu_fast): when it applies, that it runs, that it changes no
number, and that torch.compile of a flow compiles once instead of on every call."""
import warnings

import numpy as np
import pytest
import torch

import altub_fast
from altub_fast.models import CFlow, FastFlow
from altub_fast.nn import cpu_fast

from _helpers import make_subnet


@pytest.fixture
def user_cpu(monkeypatch):
    """The environment of a user on a CPU machine: no Triton interpreter, the default switch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("ALTUB_FAST_IMPL", raising=False)


def test_enabled_follows_the_implementation_switch(user_cpu, monkeypatch):
    x = torch.zeros(1, 3, 4, 4)
    assert cpu_fast.enabled(x)
    assert cpu_fast.enabled(x, "auto") and cpu_fast.enabled(x, " AUTO ")
    assert not cpu_fast.enabled(x, "torch")
    assert not cpu_fast.enabled(x, "triton")
    monkeypatch.setenv("ALTUB_FAST_IMPL", "torch")
    assert not cpu_fast.enabled(x)
    assert cpu_fast.enabled(x, "auto")          # a per-call choice overrides the environment
    monkeypatch.setenv("ALTUB_FAST_IMPL", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is a correctness tool: plain path
    assert not cpu_fast.enabled(x)


def test_enabled_names_a_bad_implementation(user_cpu):
    with pytest.raises(ValueError, match="impl must be one of.*'fast'"):
        cpu_fast.enabled(torch.zeros(1), "fast")


def test_backbone_input_is_channels_last_only_where_enabled(user_cpu):
    x = torch.randn(2, 3, 8, 8)
    y = cpu_fast.backbone_input(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(y, x)
    assert cpu_fast.backbone_input(x, "torch") is x
    v = torch.randn(2, 8)
    assert cpu_fast.backbone_input(v) is v       # not an image batch: untouched


def test_backbone_input_is_left_alone_while_tracing(user_cpu):
    seen = []

    def f(x):
        y = cpu_fast.backbone_input(x)
        seen.append(y.is_contiguous(memory_format=torch.channels_last))
        return y * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit's deprecation notice
        torch.jit.trace(f, torch.randn(1, 3, 4, 4), check_trace=False)
    assert seen == [False]


def _fastflow(impl):
    np.random.seed(0)
    torch.manual_seed(0)
    return FastFlow("resnet18", image_size=64, pretrained=False, flow_steps=2, impl=impl).eval()


@pytest.mark.parametrize("model_name", ["fastflow", "cflow"])
def test_model_on_the_fast_path_gives_the_reference_numbers(user_cpu, model_name):
    def build(impl):
        if model_name == "fastflow":
            return _fastflow(impl)
        np.random.seed(0)
        torch.manual_seed(0)
        return CFlow("resnet18", image_size=64, pretrained=False, coupling_blocks=2, condition_dim=16,
                     impl=impl).eval()
    fast, ref = build("auto"), build("torch")
    ref.load_state_dict(fast.state_dict())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    feats, feats_ref = fast.extract_features(images), ref.extract_features(images)
    # the fast path ran (NHWC strides) and the plain one did not
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
    assert not any(f.is_contiguous(memory_format=torch.channels_last) for f in feats_ref if f.shape[1] > 1)
    for f, r in zip(feats, feats_ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    (maps, scores), (maps_ref, scores_ref) = fast.anomaly_map(images), ref.anomaly_map(images)
    torch.testing.assert_close(maps, maps_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, scores_ref, atol=1e-5, rtol=1e-5)


def test_training_from_fast_path_features_matches_the_reference(user_cpu):
    fast, ref = _fastflow("auto"), _fastflow("torch")
    ref.load_state_dict(fast.state_dict())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    loss = fast(fast.extract_features(images)).loss
    loss_ref = ref(ref.extract_features(images)).loss
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-5)
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_compiled_flow_compiles_once_not_per_call():
    """The functional API's call counter must not make dynamo recompile on every call (it did:
    compiled flows fell back to eager after 8 calls)."""
    torch.manual_seed(0)
    flow = altub_fast.SequenceINN(4, 4, 4)
    for _ in range(2):
        flow.append(altub_fast.AllInOneBlock, subnet_constructor=make_subnet(2), impl="torch")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(flow, backend=counting_backend)
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        z_ref, j_ref = flow(x)
        compiled(x)
        after_first = len(graphs)
        for _ in range(10):
            z, j = compiled(x)
    assert after_first >= 1
    assert len(graphs) == after_first, f"recompiled {len(graphs) - after_first} times in 10 calls"
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(j, j_ref)
