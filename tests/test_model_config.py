"""The models' arguments as data (altub_fast.models.config): the config is the single source of a
model's arguments, ``to_dict()`` is the dict checkpoints always stored, ``from_dict`` reads old ones,
and the config still reads like that dict."""
import copy
import inspect
import os

import numpy as np
import pytest
import torch

from altub_fast.models import CFlow, CFlowConfig, FastFlow, FastFlowConfig, build_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

#: The keys (in order) the landed code stored under "model_config".
FASTFLOW_KEYS = ["name", "backbone", "image_size", "pretrained", "weights", "altub", "flow_steps", "hidden_ratio",
                 "conv3x3_only", "clamp", "clamp_mode", "out_indices", "vit_block_index", "impl", "block",
                 "backbone_weights_origin", "norm_logdet", "score", "image_score", "topk_fraction", "feature_blocks"]
CFLOW_KEYS = ["name", "backbone", "image_size", "pretrained", "weights", "altub", "out_indices", "condition_dim",
              "coupling_blocks", "clamp", "fiber_batch_size", "permute_soft", "clamp_mode", "impl",
              "backbone_weights_origin", "inference_chunk", "score", "image_score", "topk_fraction", "feature_blocks"]


def tiny_fastflow(**kw):
    torch.manual_seed(0)
    np.random.seed(0)
    return FastFlow("resnet18", pretrained=False, image_size=32, out_indices=(1, 2), flow_steps=2, hidden_ratio=0.25,
                    **kw)


def tiny_cflow(**kw):
    torch.manual_seed(0)
    np.random.seed(0)
    return CFlow("resnet18", pretrained=False, image_size=32, out_indices=(1, 2), coupling_blocks=1, condition_dim=8,
                 **kw)


@pytest.mark.parametrize("cls,config_cls", [(FastFlow, FastFlowConfig), (CFlow, CFlowConfig)])
def test_signature_and_config_name_the_same_arguments(cls, config_cls):
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    assert sorted(params) == sorted(config_cls().arguments())
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name != "self":
            assert p.default == config_cls.__dataclass_fields__[p.name].default, p.name
    assert cls.config_class is config_cls and cls.model_name == config_cls.name


def test_stored_dict_is_the_landed_one():
    m = tiny_fastflow(score="fastflow", image_score="topk:0.05")   # the pre-issue-19 rules, as landed
    d = m.config.to_dict()
    assert list(d) == FASTFLOW_KEYS
    assert d == dict(name="fastflow", backbone="resnet18", image_size=[32, 32], pretrained=False, weights=None,
                     altub=True, flow_steps=2, hidden_ratio=0.25, conv3x3_only=True, clamp=2.0, clamp_mode="legacy",
                     out_indices=[1, 2], vit_block_index=None, impl=None, block="altub",
                     backbone_weights_origin="random", norm_logdet=True, score="fastflow", image_score="topk",
                     topk_fraction=0.05, feature_blocks=None)
    c = tiny_cflow(score="loglik").config.to_dict()
    assert list(c) == CFLOW_KEYS
    assert c["condition_dim"] == 8 and c["score"] == "loglik" and c["inference_chunk"] == 65536
    assert "check_finite" not in d and "check_finite" not in c      # a runtime switch, never stored


@pytest.mark.parametrize("name,config_cls", [("fastflow", FastFlowConfig), ("cflow", CFlowConfig)])
def test_landed_checkpoint_dicts_read_back_unchanged(name, config_cls):
    stored = torch.load(os.path.join(FIXTURES, f"landed_{name}.pt"), map_location="cpu", weights_only=True)
    d = stored["model_config"]
    config = config_cls.from_dict(d)
    assert config.to_dict() == d and list(config.to_dict()) == list(d)
    assert config == d and dict(config) == d


def test_config_reads_like_the_dict():
    m = tiny_fastflow()
    c = m.config
    assert c["name"] == "fastflow" and c["backbone"] == "resnet18" and c.get("impl") is None
    assert c.get("no_such_key", 7) == 7 and "flow_steps" in c and "check_finite" not in c
    assert list(c.keys()) == FASTFLOW_KEYS and dict(c.items()) == c.to_dict() and len(c) == len(FASTFLOW_KEYS)
    with pytest.raises(KeyError):
        c["check_finite"]
    assert c == copy.deepcopy(c) and c != FastFlowConfig()


def test_the_model_reads_its_settings_from_the_config():
    m = tiny_fastflow(norm_logdet=False)
    assert (m.flow_steps, m.hidden_ratio, m.conv3x3_only, m.norm_logdet) == (2, 0.25, True, False)
    assert m.image_size == (32, 32)
    with pytest.raises(AttributeError, match="read from model.config"):
        m.flow_steps = 3
    m.check_finite = False                 # a runtime switch (export turns it off on its copy)
    assert m.config.check_finite is False
    c = tiny_cflow()
    c.inference_chunk = 10
    assert c.config.inference_chunk == 10 and c.config["inference_chunk"] == 10


def test_from_dict_and_build_model_rebuild_the_same_model():
    m = tiny_fastflow(score="loglik")
    torch.manual_seed(0)
    np.random.seed(0)
    again = FastFlow.from_config(m.config.to_dict())
    assert again.config == m.config
    torch.manual_seed(0)
    np.random.seed(0)
    built = build_model(**m.config.to_dict())          # "name" and "backbone_weights_origin" included
    assert built.config == m.config
    for k, v in m.state_dict().items():
        assert torch.equal(v, built.state_dict()[k]), k


def test_bad_config_dicts_are_clear_errors():
    with pytest.raises(TypeError, match="FastFlowConfig has no option 'no_such_option'"):
        FastFlowConfig.from_dict({"name": "fastflow", "no_such_option": 1})
    with pytest.raises(TypeError, match="no_such_option"):
        build_model("fastflow", "resnet18", pretrained=False, no_such_option=1)
    with pytest.raises(ValueError, match="cannot be read as FastFlowConfig"):
        FastFlowConfig.from_dict({"name": "cflow"})
    with pytest.raises(ValueError, match="condition_dim must be a multiple of 4"):
        CFlowConfig(condition_dim=6)
    with pytest.raises(TypeError, match="backbone must be a backbone name"):
        FastFlowConfig(backbone=3)
    # a config may come from an older checkpoint without the newer keys: their defaults
    assert FastFlowConfig.from_dict({"name": "fastflow", "backbone": "resnet18"}).norm_logdet is True
