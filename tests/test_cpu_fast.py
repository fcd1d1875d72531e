"""The CPU fast path (altub_fast.nn.cpu_fast; cpu_fold and cpu_pack): when it applies, that it runs, that it changes no
number (channels_last, the BatchNorm fold and its cache), and that torch.compile of a flow compiles
once instead of on every call."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import altub_fast
from altub_fast.models import CFlow, FastFlow
from altub_fast.nn import cpu_fast, cpu_fold, cpu_pack

from _helpers import load_benchmark_script, make_subnet


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


class _Recorder(nn.Module):
    """A stand-in backbone that records the input it was handed and returns it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return x


def test_backbone_input_is_channels_last_only_where_enabled(user_cpu):
    x = torch.randn(2, 3, 8, 8)
    rec = _Recorder().eval()
    cpu_fast.run_backbone(rec, x)
    y = rec.seen[-1]
    assert y.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(y, x)
    cpu_fast.run_backbone(rec, x, "torch")
    assert rec.seen[-1] is x
    v = torch.randn(2, 8)
    cpu_fast.run_backbone(rec, v)
    assert rec.seen[-1] is v       # not an image batch: untouched


def test_backbone_input_is_left_alone_while_tracing(user_cpu):
    rec = _Recorder().eval()

    def f(x):
        return cpu_fast.run_backbone(rec, x) * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit's deprecation notice
        torch.jit.trace(f, torch.randn(1, 3, 4, 4), check_trace=False)
    assert [t.is_contiguous(memory_format=torch.channels_last) for t in rec.seen] == [False]


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
    # features come back in the plain layout the flows are fastest in
    assert all(f.is_contiguous() for f in feats)
    for f, r in zip(feats, feats_ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    # ... with every BatchNorm folded, on a copy: the model is untouched
    assert fast.backbone in cpu_fold._FOLDS and ref.backbone not in cpu_fold._FOLDS
    twin = cpu_fast.folded_backbone(fast.backbone, images)
    assert twin is cpu_fold._FOLDS[fast.backbone].folded
    assert twin is not fast.backbone
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in fast.backbone.modules())
    assert n_bn >= 15 and sum(m.forward is cpu_fold._identity for m in twin.modules()
                              if isinstance(m, nn.BatchNorm2d)) == n_bn
    assert not any("forward" in vars(m) for m in fast.backbone.modules())
    assert fast.state_dict().keys() == ref.state_dict().keys()
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


class _ConvBN(nn.Module):
    def __init__(self, reuse_conv_output=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.reuse = reuse_conv_output
        g = torch.Generator().manual_seed(0)
        for bn in (self.bn, self.bn2):   # statistics off their init, so the fold does something
            bn.running_mean.copy_(torch.randn(4, generator=g))
            bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            bn.weight.data.copy_(torch.randn(4, generator=g))
            bn.bias.data.copy_(torch.randn(4, generator=g))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        h = self.conv(x)
        y = self.bn2(self.conv2(torch.relu(self.bn(h))))
        return [y + h] if self.reuse else [y]   # reuse: the pre-BatchNorm output is also used


def test_fold_gives_the_plain_numbers_and_follows_weight_changes(user_cpu):
    m = _ConvBN()
    x = torch.randn(2, 3, 8, 8)
    out = cpu_fast.run_backbone(m, x)
    twin = cpu_fast.folded_backbone(m, x)
    assert twin is not m and twin.bn.forward is cpu_fold._identity and twin.bn2.forward is cpu_fold._identity
    torch.testing.assert_close(out[0], m(x)[0], atol=1e-5, rtol=1e-5)
    assert cpu_fast.folded_backbone(m, x) is twin          # cached while nothing changes
    # new weights (as load_state_dict copies them in): the copy is rebuilt and follows them
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["bn.running_var"] = sd["bn.running_var"] * 3.0
    sd["conv.weight"] = -sd["conv.weight"]
    m.load_state_dict(sd)
    assert cpu_fast.folded_backbone(m, x) is not twin
    torch.testing.assert_close(cpu_fast.run_backbone(m, x)[0], m(x)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cpu_fast.run_backbone(m, x)[0], out[0])
    # not on the fast path: the plain module runs
    assert cpu_fast.run_backbone(m, x, "torch")[0].is_contiguous()


def test_fold_that_would_change_the_function_is_refused_with_a_warning(user_cpu):
    m = _ConvBN(reuse_conv_output=True)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="did not fold.*differed"):
        twin = cpu_fast.folded_backbone(m, x)
    assert twin is m
    torch.testing.assert_close(cpu_fast.run_backbone(m, x)[0], m(x)[0])


def test_no_fold_for_a_backbone_that_trains(user_cpu):
    m = _ConvBN()
    x = torch.randn(1, 3, 8, 8)
    m.train()
    assert cpu_fast.folded_backbone(m, x) is m              # running statistics would move
    m.eval()
    m.conv.weight.requires_grad_(True)
    assert cpu_fast.folded_backbone(m, x) is m              # weights being fine-tuned
    m.conv.weight.requires_grad_(False)
    assert cpu_fast.folded_backbone(m, x) is not m


def test_efficientnet_lite0_folds_every_batchnorm(user_cpu):
    """The default backbone (its Conv2dStaticSamePadding convolutions and the stem's BatchNorm)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    fast = FastFlow("efficientnet_lite0", image_size=64, pretrained=False, flow_steps=2, impl="auto").eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    twin = cpu_fast.folded_backbone(fast.backbone, images)
    bns = [m for m in twin.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.forward is cpu_fold._identity for m in bns)
    for f, r in zip(fast.extract_features(images), fast.backbone(images)):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


def test_options_script_measures_the_backbone_fast_path(tmp_path):
    """benchmarks/cpu_fast_options.py (the numbers behind cpu_fast), its smallest run: every
    option of the backbone part is timed and gives the plain backbone's numbers."""
    pytest.importorskip("efficientnet_lite_pytorch")
    script = load_benchmark_script("cpu_fast_options")
    out = tmp_path / "options.json"
    rows = script.main(["--parts", "backbone", "--rounds", "1", "--image-size", "64", "--batches", "1",
                        "--out", str(out)])
    assert {(r["model"], r["option"]) for r in rows} == {
        (m, o) for m in ("efficientnet_lite0", "resnet18") for o in ("channels_last", "fold", "channels_last+fold")}
    for r in rows:
        assert r["rel_diff"] < 1e-4 and r["ratio_median"] > 0 and r["base_median_s"] > 0
    import json
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(rows)) and "command" in saved["meta"]


def _conv_subnet(c_in=4, c_out=8, k=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c_in, c_in, k, padding=k // 2), nn.ReLU(), nn.Conv2d(c_in, c_out, k, padding=k // 2))


def _kinds(steps):
    """A packed subnet's steps by kind: "conv" (packed) or "module" (runs as is)."""
    return ["conv" if isinstance(s, cpu_pack.PackedConv) else "module" for s in steps]


@pytest.fixture
def pack_small(monkeypatch):
    """Pack the tests' small convolutions too (the default packs only from 256 input channels)."""
    monkeypatch.setattr(cpu_pack, "PACK_MIN_CHANNELS", 1)


def test_packed_subnet_gives_the_plain_numbers_and_follows_weights_and_shapes(user_cpu, pack_small):
    net = _conv_subnet()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        out = cpu_fast.run_subnet(net, x)                 # packs, checks, returns the plain result
        steps = cpu_pack._PACKS[net].steps
        assert _kinds(steps) == ["conv", "conv"] and steps[0].relu and not steps[1].relu   # ReLU fused
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(cpu_fast.run_subnet(net, x), ref, atol=1e-5, rtol=1e-5)   # packed run
        assert cpu_pack._PACKS[net].steps is steps                                   # cached
        x3 = torch.randn(3, 4, 5, 7)                                                        # new shape: repacked
        torch.testing.assert_close(cpu_fast.run_subnet(net, x3), net(x3), atol=1e-5, rtol=1e-5)
        assert cpu_pack._PACKS[net].shape == (3, 4, 5, 7)
        net[2].weight.mul_(-2.0)                                                            # edited in place
        torch.testing.assert_close(cpu_fast.run_subnet(net, x3), net(x3), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cpu_fast.run_subnet(net, x3), net(x3), atol=1e-5, rtol=1e-5)
    # not packed: with gradients, under impl="torch", in float64, 1x1-only and non-Sequential subnets
    assert not cpu_fast.packs(x) and cpu_fast.run_subnet(net, x).requires_grad
    with torch.no_grad():
        assert cpu_fast.packs(x) and not cpu_fast.packs(x, "torch") and not cpu_fast.packs(x.double())
        one = _conv_subnet(k=1)
        cpu_fast.run_subnet(one, x)
        assert cpu_pack._PACKS[one].steps is None
        wrapped = nn.ModuleList([net])
        assert cpu_pack._pack_steps(wrapped, x.shape) is None


def test_packed_subnet_that_disagrees_is_refused_with_a_warning(user_cpu, pack_small, monkeypatch):
    net = _conv_subnet()
    x = torch.randn(2, 4, 6, 6)
    monkeypatch.setattr(cpu_pack, "_run_steps", lambda steps, x: torch.zeros(2, 8, 6, 6))
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="packed convolutions differed"):
            out = cpu_fast.run_subnet(net, x)
        torch.testing.assert_close(out, net(x))
        torch.testing.assert_close(cpu_fast.run_subnet(net, x), net(x))   # plain from then on
        entry = cpu_pack._PACKS[net]
        assert entry.refused and entry.steps is None
        x3 = torch.randn(3, 4, 5, 7)                                        # for every shape, no repacking
        torch.testing.assert_close(cpu_fast.run_subnet(net, x3), net(x3))
        assert cpu_pack._PACKS[net] is entry


def test_flow_inference_on_packed_subnets_matches_the_reference(user_cpu, pack_small):
    def build(impl):
        torch.manual_seed(0)
        flow = altub_fast.SequenceINN(8, 6, 6)
        for k in (3, 1, 3):
            flow.append(altub_fast.AllInOneBlock, subnet_constructor=lambda ci, co, k=k: nn.Sequential(
                nn.Conv2d(ci, 8, k, padding=k // 2), nn.ReLU(), nn.Conv2d(8, co, k, padding=k // 2)), impl=impl)
        return flow
    fast, ref = build(None), build("torch")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for _ in range(2):   # the first call packs, the second runs packed
            (z, j), (z_ref, j_ref) = fast(x), ref(x)
            torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(j, j_ref, atol=1e-4, rtol=1e-5)
        x_back, _ = fast(z, rev=True)
        torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)
    import copy
    import pickle
    twin = copy.deepcopy(fast)                     # the caches stay outside the modules
    assert twin[0].subnet not in cpu_pack._PACKS and len(pickle.dumps(fast)) > 0
    assert [getattr(cpu_pack._PACKS.get(b.subnet), "steps", None) is not None for b in fast] == [True, False, True]


def test_only_wide_convolutions_are_packed(user_cpu):
    """The default rule: a convolution is packed from PACK_MIN_CHANNELS input channels (where it won)."""
    wide = cpu_fast.PACK_MIN_CHANNELS
    x_narrow, x_wide = torch.randn(1, 8, 4, 4), torch.randn(1, wide, 4, 4)
    assert cpu_pack._pack_steps(_conv_subnet(8, 8), x_narrow.shape) is None
    torch.manual_seed(0)
    mixed = nn.Sequential(nn.Conv2d(wide, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, wide, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(wide, 4, 3, padding=1))
    steps = cpu_pack._pack_steps(mixed, x_wide.shape)
    assert _kinds(steps) == ["conv", "module", "module", "conv"]
    with torch.no_grad():
        torch.testing.assert_close(cpu_pack._run_steps(steps, x_wide), mixed(x_wide), atol=1e-5, rtol=1e-5)
