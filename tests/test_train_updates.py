"""The trainer's two updates (altub_fast/train/updates.py) on a fake flow, without DDP: what each
steps, with which optimiser and lr, and what a non-finite loss does."""
import copy
import logging

import pytest
import torch

from altub_fast.train import AltUBSchedule
from altub_fast.train.updates import BaseOnlyUpdate, FlowUpdate, NonFiniteLossError, NonFinitePolicy
from _fake_flow import FakeFlow, Images


def _unit(model, n=4):
    return next(model.training_units(model.extract_features(Images(n).images)))


def _updates(model, schedule=None, mode="raise", last=lambda: None):
    policy = NonFinitePolicy(mode, model, last)
    flow = FlowUpdate(model, lr=0.05, weight_decay=1e-4, nonfinite=policy)
    base = BaseOnlyUpdate(model, schedule or AltUBSchedule(r=2.0, clip_value=None), lambda: flow.lr, nonfinite=policy)
    return flow, base


def _copy(params):
    return [p.detach().clone() for p in params]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_flow_update_steps_flow_and_base_with_adam():
    model = FakeFlow()
    flow, _ = _updates(model)
    groups = {g["name"]: g for g in flow.optimizer.param_groups}
    assert groups["flow"]["weight_decay"] == 1e-4 and groups["base"]["weight_decay"] == 0.0
    assert isinstance(flow.optimizer, torch.optim.Adam) and flow.ddp is None and flow.lr == 0.05
    f0, b0 = _copy(model.flow_parameters()), _copy(model.base_parameters())
    unit = _unit(model)
    loss_before = float(model.step_loss(unit)[0].detach())
    out = flow(unit, where="epoch 1, step 1")
    assert not out.skipped and out.loss == pytest.approx(loss_before) and out.z[0].shape == (4, 3, 4, 4)
    assert not _same(f0, model.flow_parameters()) and not _same(b0, model.base_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_flow_update_of_a_baseline_has_one_group():
    model = FakeFlow(altub=False)
    flow = FlowUpdate(model, lr=0.1, weight_decay=0.0, nonfinite=NonFinitePolicy("raise", model))
    assert [g["name"] for g in flow.optimizer.param_groups] == ["flow"]
    with pytest.raises(ValueError, match="learnable base"):
        BaseOnlyUpdate(model, AltUBSchedule(), lambda: 0.1, nonfinite=NonFinitePolicy("raise", model))


def test_base_only_update_leaves_the_flow_and_its_optimiser_alone():
    model = FakeFlow()
    flow, base = _updates(model)
    unit = _unit(model)
    flow(unit, "a")
    flow(unit, "b")                                   # Adam has state now
    f0, b0 = _copy(model.flow_parameters()), _copy(model.base_parameters())
    state = copy.deepcopy(flow.optimizer.state_dict())
    out = base(unit, "c")
    assert not out.skipped
    assert _same(f0, model.flow_parameters()) and not _same(b0, model.base_parameters())
    after = flow.optimizer.state_dict()["state"]
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(after[k][n]))
               for k, st in state["state"].items() for n, v in st.items())
    # SGD, lr = r * the flow optimiser's current lr (followed when that changes)
    assert isinstance(base.optimizer, torch.optim.SGD) and base.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    flow.optimizer.param_groups[0]["lr"] = 0.01
    base(unit, "d")
    assert base.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)


def test_base_only_update_clips_by_value_and_can_use_adam_or_a_fixed_lr():
    model = FakeFlow()
    unit = _unit(model)
    _, base = _updates(model, AltUBSchedule(r=2.0, clip_value=1e-3))
    b0 = _copy(model.base_parameters())
    base(unit, "a")
    step = max(float((p.detach() - b).abs().max()) for p, b in zip(model.base_parameters(), b0))
    assert 0 < step <= 0.1 * 1e-3 * (1 + 1e-6)
    _, base = _updates(FakeFlow(), AltUBSchedule(optimizer="adam", lr=0.3))
    assert isinstance(base.optimizer, torch.optim.Adam) and base.lr == 0.3


def _poisoned():
    model = FakeFlow()
    unit = _unit(model)
    with torch.no_grad():
        model.log_scale[0] = float("nan")
    return model, unit


@pytest.mark.parametrize("which", [0, 1])
def test_nonfinite_loss_raises_naming_where_and_updates_nothing(which):
    model, unit = _poisoned()
    update = _updates(model, last=lambda: "/runs/last.pt")[which]
    before = _copy(model.parameters())
    with pytest.raises(NonFiniteLossError, match=r"at epoch 3, step 7: fake flow: 64 non-finite z values\. "
                                                 r"Nothing was updated; the last good checkpoint is /runs/last\.pt"):
        update(unit, where="epoch 3, step 7")
    assert all(torch.equal(a, b) or torch.isnan(a).any() for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written"):
        _updates(model)[which](unit, where="here")


@pytest.mark.parametrize("which", [0, 1])
def test_nonfinite_loss_skipped_under_skip(which, caplog):
    model, unit = _poisoned()
    update = _updates(model, mode="skip")[which]
    before = _copy(model.parameters())
    with caplog.at_level(logging.WARNING, logger="altub_fast.train"):
        out = update(unit, where="epoch 1, step 2")
    assert out.skipped and out.loss != out.loss and "update skipped" in caplog.text and "step 2" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()) if torch.isfinite(a).all())
    with pytest.raises(ValueError, match="on_nonfinite"):
        NonFinitePolicy("ignore", model)


def test_epoch_tally_adds_up_the_updates():
    from altub_fast.train.stats import EpochTally, ZStats

    tally = EpochTally(ZStats([3], torch.device("cpu")))
    z = [torch.ones(2, 3, 4, 4)]
    for loss, base_only, skipped in [(1.0, False, False), (3.0, True, False), (float("nan"), False, True),
                                     (5.0, False, False)]:
        tally.add({"loss": loss, "base_only": base_only, "skipped": skipped, "z": z})
    assert tally.losses() == {"loss": 3.0, "loss_flow_updates": 3.0, "loss_base_only_updates": 3.0, "updates": 3,
                              "flow_updates": 2, "base_only_updates": 1, "skipped_updates": 1}
    assert float(tally.zstats.n[0]) == 3 * 2 * 16                     # z of the three updates done
    empty = EpochTally().losses()
    assert empty["updates"] == 0 and empty["loss"] != empty["loss"]   # NaN without updates
