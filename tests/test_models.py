"""The model zoo: registry, parameter counts, and parity with the official `bcos` models.

Parity: the same weights (random, with non-trivial norm statistics) loaded into our model and the
official one give logits and dynamic weights equal to 1e-10 relative in float64.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from bcos.models import pretrained as official_zoo
from bcos.models import resnet as official_resnet
from bcos.modules import BcosConv2d as OfficialConv
from bcos.modules import norms as official_norms

from e2kd_fast import AddInverse, contribution_map, create_model, dynamic_weights, list_models, load_checkpoint
from e2kd_fast.models import model_entry
from tests.helpers import official_input_grad, randomize_norms, rel_err


def _official_cifar(depth: int, **kwargs):
    builder = getattr(official_resnet, f"cifar10_resnet{depth}")
    return builder(norm_layer=official_norms.NoBias(official_norms.BatchNormUncentered2d), **kwargs)


# our name -> (official constructor, input side). ImageNet models run at 32 px to keep float64 cheap.
OFFICIAL = {
    "bcos_resnet18": (official_zoo.resnet18, 32),
    "bcos_resnet34": (official_zoo.resnet34, 32),
    "bcos_resnet50": (official_zoo.resnet50, 32),
    "bcos_resnet101": (official_zoo.resnet101, 32),
    "bcos_resnet152": (official_zoo.resnet152, 32),
    "bcos_resnext50_32x4d": (official_zoo.resnext50_32x4d, 32),
    "bcos_densenet121": (official_zoo.densenet121, 32),
    "bcos_densenet161": (official_zoo.densenet161, 32),
    "bcos_densenet169": (official_zoo.densenet169, 32),
    "bcos_densenet201": (official_zoo.densenet201, 32),
    "bcos_vit_ti_patch16_224": (official_zoo.simple_vit_ti_patch16_224, 32),
    "bcos_vit_s_patch16_224": (official_zoo.simple_vit_s_patch16_224, 32),
    "bcos_vit_b_patch16_224": (official_zoo.simple_vit_b_patch16_224, 32),
    "bcos_resnet20_cifar": (partial(_official_cifar, 20), 16),
    "bcos_resnet32_cifar": (partial(_official_cifar, 32), 16),
    "bcos_resnet44_cifar": (partial(_official_cifar, 44), 16),
    "bcos_resnet56_cifar": (partial(_official_cifar, 56), 16),
    "bcos_resnet110_cifar": (partial(_official_cifar, 110), 16),
}

PARAMS_M = {  # official counts in millions (B-cos-v2 model zoo; R50 is 25.54M in the code, 25.52M in the zoo table)
    "bcos_resnet18": 11.69,
    "bcos_resnet34": 21.80,
    "bcos_resnet50": 25.54,
    "bcos_resnet101": 44.50,
    "bcos_resnet152": 60.13,
    "bcos_resnext50_32x4d": 25.00,
    "bcos_densenet121": 7.95,
    "bcos_densenet161": 28.58,
    "bcos_densenet169": 14.08,
    "bcos_densenet201": 19.91,
    "bcos_vit_ti_patch16_224": 5.80,
    "bcos_vit_s_patch16_224": 22.22,
    "bcos_vit_b_patch16_224": 86.90,
    "resnet18": 11.69,
    "resnet34": 21.80,
    "resnet50": 25.56,
    "densenet121": 7.98,
    "densenet169": 14.15,
}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model_of_the_zoo():
    assert set(OFFICIAL) | {"resnet18", "resnet34", "resnet50", "densenet121", "densenet169"} == set(list_models())
    assert list_models("bcos_vit*") == [
        "bcos_vit_b_patch16_224",
        "bcos_vit_s_patch16_224",
        "bcos_vit_ti_patch16_224",
    ]
    assert list_models(family="standard") == ["densenet121", "densenet169", "resnet18", "resnet34", "resnet50"]


def test_unknown_model_names_suggest_close_matches():
    with pytest.raises(KeyError, match="did you mean bcos_resnet18"):
        create_model("bcos_resnet_18")


def test_num_classes_and_family():
    model = create_model("bcos_resnet20_cifar")
    assert model.e2kd_family == "bcos" and model.num_classes == 10
    assert model(torch.rand(2, 6, 32, 32)).shape == (2, 10)
    model = create_model("bcos_resnet18", num_classes=7)
    assert model(torch.rand(1, 6, 64, 64)).shape == (1, 7)
    assert model.logit_layer.logit_bias == pytest.approx(-math.log(6))
    assert create_model("resnet18", num_classes=5).e2kd_family == "standard"
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_model("bcos_densenet121", num_classes=1)


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_parameter_counts(name):
    count = _num_params(create_model(name))
    assert round(count / 1e6, 2) == PARAMS_M[name]
    if name in OFFICIAL:
        assert count == _num_params(OFFICIAL[name][0]())


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parity_with_official_model(name):
    torch.set_default_dtype(torch.float64)
    build_official, side = OFFICIAL[name]
    official = randomize_norms(build_official()).eval()
    ours = create_model(name).eval()
    load_checkpoint(ours, official.state_dict())
    x6 = AddInverse()(torch.rand(2, 3, side, side))

    logits, official_logits = ours(x6), official(x6)
    assert rel_err(logits, official_logits) < 1e-10
    target = official_logits.argmax(1)
    weights = dynamic_weights(ours, x6, target)
    assert weights.shape == x6.shape
    assert rel_err(weights, official_input_grad(official, x6, target)) < 1e-10


@pytest.mark.parametrize(
    "name", ["bcos_resnet18", "bcos_densenet121", "bcos_resnet20_cifar", "bcos_vit_ti_patch16_224"]
)
def test_parity_in_train_mode(name):
    """Students train in train mode: batch statistics make the explanation batch-dependent."""
    torch.set_default_dtype(torch.float64)
    build_official, side = OFFICIAL[name]
    official = randomize_norms(build_official()).train()
    ours = create_model(name).train()
    load_checkpoint(ours, official.state_dict())
    x6 = AddInverse()(torch.rand(3, 3, side, side))
    assert rel_err(ours(x6), official(x6)) < 1e-10
    target = torch.tensor([0, 1, 2])
    assert rel_err(dynamic_weights(ours, x6, target), official_input_grad(official, x6, target)) < 1e-10


def test_official_cifar_config_without_norm_and_with_maxout():
    """The official CIFAR-10 configs: no norm layers, MaxOut with two units."""
    torch.set_default_dtype(torch.float64)
    official = official_resnet.cifar10_resnet20(
        norm_layer=torch.nn.Identity, conv_layer=partial(OfficialConv, max_out=2)
    )
    ours = create_model("bcos_resnet20_cifar", norm="none", max_out=2)
    load_checkpoint(ours, official.state_dict())
    x6 = AddInverse()(torch.rand(2, 3, 16, 16))
    assert rel_err(ours(x6), official(x6)) < 1e-10
    target = torch.tensor([3, 7])
    assert rel_err(dynamic_weights(ours, x6, target), official_input_grad(official, x6, target)) < 1e-10


@pytest.mark.parametrize("name", ["bcos_resnet18", "bcos_resnext50_32x4d", "bcos_densenet121", "bcos_resnet20_cifar"])
@pytest.mark.parametrize("training", [False, True])
def test_cnns_are_dynamic_linear(name, training):
    """logit_c(x) = Σ W_c(x) ⊙ x + logit bias, exactly (up to float64 rounding)."""
    torch.set_default_dtype(torch.float64)
    model = randomize_norms(create_model(name)).train(training)
    x6 = AddInverse()(torch.rand(2, 3, 32, 32))
    target = torch.tensor([1, 4])
    weights, logits = dynamic_weights(model, x6, target, return_logits=True)
    reconstructed = contribution_map(x6, weights).sum(dim=(1, 2)) + model.logit_layer.logit_bias
    torch.testing.assert_close(reconstructed, logits.gather(1, target[:, None])[:, 0], rtol=1e-10, atol=1e-12)


def test_vit_is_not_exactly_dynamic_linear():
    """The positional embedding is an input-independent term that W(x) does not carry (as officially)."""
    torch.set_default_dtype(torch.float64)
    model = create_model("bcos_vit_ti_patch16_224").eval()
    x6 = AddInverse()(torch.rand(1, 3, 32, 32))
    weights, logits = dynamic_weights(model, x6, torch.tensor([0]), return_logits=True)
    reconstructed = contribution_map(x6, weights).sum() + model.logit_layer.logit_bias
    assert not torch.allclose(reconstructed, logits[0, 0], rtol=1e-6)


def test_model_entry_metadata():
    assert model_entry("bcos_resnet56_cifar").default_num_classes == 10
    assert model_entry("densenet169").family == "standard"
