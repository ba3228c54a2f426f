import pytest
import torch
import torch.nn as nn

import common
import report
import step1
import step2
import step3
import step4

STEPS = [step1, step2, step3, step4]


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_net_returns_log_probabilities(step):
    torch.manual_seed(0)
    model = step.Net().eval()
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)
    assert (out <= 0).all()


@pytest.mark.parametrize("step", STEPS[1:], ids=lambda s: s.__name__)
def test_light_steps_stay_under_the_budget(step):
    assert common.count_params(common.make_net(step.Net, step.RECIPE)) < common.PARAM_BUDGET


def test_step1_is_heavy():
    # heavy on purpose: far over the budget the later steps must meet
    assert common.count_params(step1.Net()) > 10 * common.PARAM_BUDGET


def test_every_step_keeps_the_skeleton():
    # the same convs and pool in the same places: RF 24 on a 4x4 map before the output block
    def skeleton(Net):  # (RF, map size) after each conv and pool up to the first 4x4 map, where
        rows = []      # it changes: a 1x1 (of a split 3x3 or not) adds no place of its own
        for r in common.layer_table(Net()):
            if r["layer"].endswith(("Conv2d", "MaxPool2d", "BlurPool")) and (r["rf"], r["output"][1:]) not in rows[-1:]:
                rows.append((r["rf"], r["output"][1:]))
        return rows[:[size for _, size in rows].index([4, 4]) + 1]
    first = skeleton(step1.Net)
    assert first[-1] == (24, [4, 4])
    for step in STEPS[1:]:
        assert skeleton(step.Net) == first, step.__name__


def test_batchnorm_after_every_conv_but_the_last_and_the_depthwise_halves():
    for step in (step3, step4):
        convs = [m for m in step.Net().modules() if isinstance(m, nn.Conv2d)]
        bns = [m for m in step.Net().modules() if isinstance(m, nn.BatchNorm2d)]
        depthwise = [m for m in convs if m.groups > 1]  # each followed by its 1x1, which has one
        assert len(bns) == len(convs) - 1 - len(depthwise)
        assert convs[-1].bias is not None  # the class-score conv keeps its bias, no BatchNorm


def test_dropout_setting_renames_no_weights():
    with_dropout = step3.Net(dropout=0.1).state_dict().keys()
    assert with_dropout == step3.Net(dropout=0.0).state_dict().keys()


def test_importing_a_step_trains_nothing():
    # each RECIPE is plain data, readable without running anything
    assert step4.RECIPE.max_rotation > 0 and step3.RECIPE.max_rotation == 0
