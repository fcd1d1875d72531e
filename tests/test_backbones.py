"""Frozen backbones: shapes, the offline efficientnet_lite0 weights, weights=PATH, missing weights."""
import os

import pytest
import torch

timm = pytest.importorskip("timm")

from altub_fast.models import (EFFICIENTNET_LITE0, BackboneWeightsError, FastFlow, build_backbone,
                               efficientnet_lite0_weights_path)


def test_resnet18_shapes_and_frozen():
    torch.manual_seed(0)
    bb = build_backbone("resnet18", pretrained=False, out_indices=(1, 2, 3))
    assert bb.channels == [64, 128, 256] and bb.strides == [4, 8, 16]
    assert bb.weights_origin == "random" and bb.random_weights
    assert all(not p.requires_grad for p in bb.parameters())
    for size in (64, 63):
        feats = bb(torch.randn(2, 3, size, size))
        assert [tuple(f.shape[1:]) for f in feats] == bb.feature_shapes(size)
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())


def test_cflow_layers_strides():
    bb = build_backbone("resnet18", pretrained=False, out_indices=(2, 3, 4))
    assert bb.channels == [128, 256, 512] and bb.strides == [8, 16, 32]


def test_efficientnet_lite0_offline_weights():
    path = efficientnet_lite0_weights_path()
    assert os.path.isfile(path)
    bb = build_backbone(EFFICIENTNET_LITE0)  # pretrained=True: the packaged file, no network
    assert bb.weights_origin.startswith("package:")
    assert bb.channels == [40, 112, 320] and bb.strides == [8, 16, 32]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(bb.stem.weight, state["_conv_stem.weight"])
    assert torch.equal(bb.blocks[10]._project_conv.weight, state["_blocks.10._project_conv.weight"])
    assert torch.equal(bb.bn0.running_var, state["_bn0.running_var"])
    assert not bb.training and all(not p.requires_grad for p in bb.parameters())
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 40, 8, 8), (2, 112, 4, 4), (2, 320, 2, 2)]
    assert [tuple(f.shape[1:]) for f in feats] == bb.feature_shapes(64)
    # the weights are real: ImageNet BN statistics give well-scaled, non-constant features
    assert all(torch.isfinite(f).all() and f.std() > 1e-3 for f in feats)
    # inside a model the backbone stays in eval mode
    m = FastFlow(bb, image_size=64, flow_steps=1)
    m.train()
    assert not m.backbone.training and all(not mod.training for mod in m.backbone.modules())


def test_weights_file_loads(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("resnet18", pretrained=False)
    path = str(tmp_path / "r18.pth")
    torch.save(full.state_dict(), path)
    bb = build_backbone("resnet18", weights=path, out_indices=(1, 2, 3))
    assert bb.weights_origin.startswith("file:")
    assert torch.equal(bb.model.conv1.weight, full.conv1.weight)
    assert torch.equal(bb.model.layer3[1].bn2.running_mean, full.layer3[1].bn2.running_mean)
    # a file for another architecture is refused with a clear error
    bad = str(tmp_path / "bad.pth")
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(BackboneWeightsError, match="does not fit"):
        build_backbone("resnet18", weights=bad)
    with pytest.raises(FileNotFoundError):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_missing_weights_names_both_ways_out(monkeypatch):
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise OSError("simulated: no network")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, fn, no_network)
    with pytest.raises(BackboneWeightsError) as info:
        build_backbone("resnet18", pretrained=True)
    msg = str(info.value)
    assert "weights=PATH" in msg and "download" in msg and "simulated: no network" in msg


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("no_such_net_123", pretrained=False)


@pytest.mark.parametrize("name,prefix", [("deit_tiny_distilled_patch16_224", 2), ("cait_xxs24_224", 0)])
def test_vit_backbone(name, prefix):
    torch.manual_seed(0)
    bb = build_backbone(name, pretrained=False, vit_block_index=1, image_size=64)
    assert bb.kind == "vit" and bb.num_prefix_tokens == prefix
    assert len(bb.model.blocks) == 2
    with torch.no_grad():
        (f,) = bb(torch.randn(2, 3, 64, 64))
    assert tuple(f.shape) == (2, 192, 4, 4) and bb.feature_shapes(64) == [(192, 4, 4)]
