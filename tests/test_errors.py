"""Bad input gets a clear error: the right type, and a message saying what was wrong."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import sparta


def mlp() -> nn.Sequential:
    """Two adaptable Linear layers and a head."""
    return nn.Sequential(
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def tiny_mlp() -> nn.Sequential:
    """Every layer is too small for rank 8 or more."""
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def requires_grad(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


# -- adapter names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "SPLORA", "", "pruning"])
def test_unknown_adapter_lists_the_known_ones(name: str):
    with pytest.raises(sparta.UnknownNameError, match="splora.*sppara") as info:
        sparta.wrap(mlp(), name)
    assert isinstance(info.value, sparta.ConfigError) and isinstance(info.value, ValueError)
    assert repr(name) in str(info.value)
    with pytest.raises(sparta.ConfigError, match="splora.*sppara"):
        sparta.AdaptedLayer(nn.Linear(16, 16), name)
    with pytest.raises(sparta.ConfigError, match="splora.*sppara"):
        sparta.get_adapter(name)


@pytest.mark.parametrize("name, hint", [("splorra", "splora"), ("spara", "sppara")])
def test_near_miss_suggests_the_adapter(name: str, hint: str):
    with pytest.raises(sparta.ConfigError, match=f"did you mean '{hint}'"):
        sparta.wrap(mlp(), name)


def test_far_miss_suggests_nothing():
    with pytest.raises(sparta.ConfigError) as info:
        sparta.wrap(mlp(), "xyzzy")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("name", [None, 3, nn.Linear])
def test_adapter_that_is_not_a_name(name):
    with pytest.raises((sparta.ConfigError, TypeError), match="splora.*sppara"):
        sparta.wrap(mlp(), name)


# -- adapter options ----------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, False, "8", 8.0, None])
def test_bad_rank(rank):
    pattern = re.escape(f"rank must be a positive integer, got {rank!r}")
    with pytest.raises(sparta.ConfigError, match=pattern) as info:
        sparta.wrap(mlp(), "splora", rank=rank)
    assert isinstance(info.value, ValueError)
    with pytest.raises(sparta.ConfigError, match=pattern):
        sparta.AdaptedLayer(nn.Linear(16, 16), "splora", rank=rank)
    with pytest.raises(sparta.ConfigError, match=pattern):
        sparta.SPLoRA(16, 16, rank=rank)


@pytest.mark.parametrize("scale", [-1e-4, float("inf"), float("nan"), True, "1e-4"])
def test_bad_init_scale(scale):
    for adapter in ("splora", "sppara"):
        with pytest.raises(sparta.ConfigError, match="init_scale"):
            sparta.wrap(convnet(), adapter, init_scale=scale)


def test_rank_larger_than_the_layer_allows():
    with pytest.raises(sparta.ConfigError, match="larger than the layer allows"):
        sparta.AdaptedLayer(nn.Linear(4, 4), "splora", rank=1000)
    with pytest.raises(sparta.ConfigError, match="larger than the layer allows"):
        sparta.SPLoRA(4, 4, rank=1000)
    # the limit is the larger side of the delta (out x in / groups): 4 fits a 2 x 4 delta, 5 not
    layer = sparta.AdaptedLayer(nn.Linear(4, 2), "splora", rank=4)
    assert tuple(layer.adapter.B.shape) == (2, 4) and tuple(layer.adapter.A.shape) == (4, 4)
    with pytest.raises(sparta.ConfigError, match=r"rank 5 is larger than the layer allows.*<= 4"):
        sparta.AdaptedLayer(nn.Linear(4, 2), "splora", rank=5)
    # grouped conv: the delta is 8 x (8 / 4)
    sparta.AdaptedLayer(nn.Conv2d(8, 8, 3, groups=4), "splora", rank=8)
    with pytest.raises(sparta.ConfigError, match="larger than the layer allows"):
        sparta.AdaptedLayer(nn.Conv2d(8, 8, 3, groups=4), "splora", rank=9)


def test_wrap_where_every_layer_is_too_small():
    with pytest.raises(sparta.ConfigError, match="adapted no layer") as info:
        sparta.wrap(tiny_mlp(), "splora", rank=1000)
    # the message says why
    assert "rank 1000 is larger than the layer allows" in str(info.value)


def test_wrap_skips_only_the_layers_that_are_too_small():
    model = nn.Sequential(
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 6), nn.Linear(6, 3)
    )
    with pytest.warns(UserWarning, match="larger than the layer allows"):
        wrapped = sparta.wrap(model, rank=12)
    report = wrapped.sparta_report
    assert report.adapted == ["0", "2"]  # a 4 x 32 delta takes rank 12, a 6 x 4 one cannot
    assert [(s.name, s.type) for s in report.skipped] == [("4", "Linear")]
    assert "rank 12" in report.skipped[0].reason
    assert type(wrapped[4]) is nn.Linear and not wrapped[4].weight.requires_grad


@pytest.mark.parametrize(
    "adapter, options, bad, accepted",
    [
        ("sppara", {"rank": 4}, "rank", "init_scale"),
        ("splora", {"rnak": 4}, "rnak", "rank, init_scale"),
        ("splora", {"rank": 4, "alpha": 2.0}, "alpha", "rank, init_scale"),
    ],
)
def test_unknown_option_names_the_accepted_ones(adapter, options, bad, accepted):
    pattern = f"adapter '{adapter}' takes no option '{bad}'.*{accepted}"
    with pytest.raises(sparta.ConfigError, match=pattern):
        sparta.wrap(convnet(), adapter, **options)
    with pytest.raises(sparta.ConfigError, match=pattern):
        sparta.AdaptedLayer(nn.Conv2d(8, 8, 3), adapter, **options)


def test_options_with_an_adapter_instance_are_refused():
    with pytest.raises(sparta.ConfigError, match="options"):
        sparta.AdaptedLayer(nn.Linear(16, 16), sparta.SPLoRA(16, 16, rank=2), rank=2)


def test_adapter_instance_of_the_wrong_shape():
    with pytest.raises(sparta.ConfigError, match=r"does not match.*out=16, in=16"):
        sparta.AdaptedLayer(nn.Linear(16, 16), sparta.SPLoRA(16, 12, rank=2))


def test_sppara_on_a_linear_layer():
    with pytest.raises(sparta.NotAdaptableError, match="conv.*not linear"):
        sparta.AdaptedLayer(nn.Linear(16, 16), "sppara")


# -- inputs that are not modules ----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["resnet18", None, [nn.Linear(2, 2)], mlp().state_dict()])
def test_non_module_input(bad):
    type_name = type(bad).__name__
    with pytest.raises(TypeError, match=f"wrap expects a torch.nn.Module, got {type_name}"):
        sparta.wrap(bad)
    with pytest.raises(TypeError, match=f"fuse expects a torch.nn.Module, got {type_name}"):
        sparta.fuse(bad)
    with pytest.raises(TypeError, match=f"expects a torch.nn.Module, got {type_name}"):
        sparta.learned_parameters(bad)
    with pytest.raises(TypeError, match=type_name):
        sparta.AdaptedLayer(bad)


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.BatchNorm2d(4), nn.Embedding(10, 4)])
def test_adapted_layer_of_an_unsupported_module(layer):
    with pytest.raises(sparta.NotAdaptableError, match=f"got {type(layer).__name__}"):
        sparta.AdaptedLayer(layer)


# -- even kernels -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv, size",
    [
        (nn.Conv2d(3, 8, 4, stride=4), "4x4"),
        (nn.Conv2d(3, 8, (3, 2)), "3x2"),
        (nn.Conv1d(3, 8, 2), "2"),
    ],
)
def test_even_kernel_given_directly_names_the_layer(conv, size):
    with pytest.raises(sparta.NotAdaptableError, match=rf"'stem'.*kernel {size} has an even size"):
        sparta.AdaptedLayer(conv, "splora", name="stem")
    with pytest.raises(sparta.NotAdaptableError, match="even"):
        sparta.AdaptedLayer(conv, "sppara")


def test_even_kernel_in_wrap_is_skipped_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=4),  # patchify stem: no centre tap
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 5),
    )
    with pytest.warns(UserWarning, match=r"0 \(kernel 4x4 has an even size") as caught:
        wrapped = sparta.wrap(model)
    assert len(caught) == 1
    report = wrapped.sparta_report
    assert report.adapted == ["2"] and report.head == ["4"]
    assert len(report.skipped) == 1
    skipped = report.skipped[0]
    assert (skipped.name, skipped.type) == ("0", "Conv2d")
    assert "even" in skipped.reason and "4x4" in skipped.reason
    assert "0 (Conv2d)" in str(report)
    # the skipped layer stays a plain, frozen layer
    assert type(wrapped[0]) is nn.Conv2d
    assert not wrapped[0].weight.requires_grad and not wrapped[0].bias.requires_grad
    out = wrapped(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 5)


# -- include / exclude / head -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["include", "exclude"])
@pytest.mark.parametrize("patterns, bad", [("layer9.*", "layer9.*"), (["0", "nope"], "nope")])
def test_pattern_matching_nothing(key, patterns, bad):
    with pytest.raises(sparta.ConfigError, match=f"{key} pattern {re.escape(repr(bad))}"):
        sparta.wrap(mlp(), **{key: patterns})


def test_pattern_close_to_a_name_gets_a_hint():
    with pytest.raises(sparta.ConfigError, match=r"close names: .*\b2\b"):
        sparta.wrap(mlp(), exclude="2x")


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_pattern_list_holding_a_non_string(key):
    with pytest.raises(TypeError, match=f"{key} patterns must be strings, got 3"):
        sparta.wrap(mlp(), **{key: ["0", 3]})


@pytest.mark.parametrize("key", ["include", "exclude", "head"])
def test_pattern_that_is_not_a_string_or_a_list(key):
    # the message must say which argument was wrong (not only "'int' object is not iterable")
    with pytest.raises(TypeError, match=key):
        sparta.wrap(mlp(), **{key: 3})


@pytest.mark.parametrize("head", ["nonexistent", ["4", "nonexistent"], ""])
def test_head_that_is_not_a_module(head):
    bad = "nonexistent" if head else ""
    with pytest.raises(sparta.ConfigError, match=f"head {re.escape(repr(bad))} is not a module"):
        sparta.wrap(mlp(), head=head)


def test_include_that_selects_no_target_layer():
    # "1" exists (a ReLU) but is not a target layer
    with pytest.raises(sparta.ConfigError, match="adapted no layer"):
        sparta.wrap(mlp(), include="1")


# -- state of the model after an error ----------------------------------------------------------


def test_failed_wrap_leaves_the_model_as_it_was():
    model = tiny_mlp()
    before = requires_grad(model)
    with pytest.raises(sparta.ConfigError, match="adapted no layer"):
        sparta.wrap(model, rank=1000)
    assert requires_grad(model) == before
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))


@pytest.mark.parametrize(
    "kwargs", [{"rank": 1000}, {"exclude": ["0", "2"]}], ids=["too-small", "all-excluded"]
)
def test_failed_inplace_wrap_leaves_the_model_as_it_was(kwargs):
    # design.md: never leave a half-converted model behind on failure
    model = mlp() if "exclude" in kwargs else tiny_mlp()
    before = requires_grad(model)
    assert all(before.values())
    with pytest.raises(sparta.ConfigError, match="adapted no layer"):
        sparta.wrap(model, inplace=True, **kwargs)
    assert not hasattr(model, "sparta_report")
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))
    assert requires_grad(model) == before


# -- wrapping twice -----------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["splora", "sppara"])
def test_wrapping_an_already_wrapped_model(adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wrapped = sparta.wrap(convnet(), adapter)
    for second in ("splora", "sppara"):
        with pytest.raises(sparta.ConfigError, match="already wrapped"):
            sparta.wrap(wrapped, second)
    # fusing first gives a plain model, which may be wrapped again
    again = sparta.wrap(sparta.fuse(wrapped), "splora", rank=2)
    assert again.sparta_report.adapted == ["0", "2"]


def test_wrapping_a_model_with_adapted_attention():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2), "fc": nn.Linear(16, 2)})
    wrapped = sparta.wrap(model, rank=2)
    assert wrapped.sparta_report.adapted == ["attn"]
    with pytest.raises(sparta.ConfigError, match="already wrapped"):
        sparta.wrap(wrapped, rank=2)


def test_wrapping_a_model_holding_an_adapted_layer():
    model = nn.Sequential(sparta.AdaptedLayer(nn.Linear(16, 16), rank=2), nn.Linear(16, 2))
    with pytest.raises(sparta.ConfigError, match="already wrapped"):
        sparta.wrap(model)


# -- layers that are not targets ----------------------------------------------------------------


def test_transposed_convolutions_are_not_targets():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ConvTranspose2d(8, 8, 2, stride=2),  # even kernel: would be "skipped" if a target
        nn.Conv2d(8, 4, 3, padding=1),
        nn.ConvTranspose1d(4, 4, 3),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        wrapped = sparta.wrap(model, head=None)
    report = wrapped.sparta_report
    assert report.adapted == ["0", "2"]
    assert report.skipped == [] and report.excluded == []
    assert type(wrapped[1]) is nn.ConvTranspose2d and type(wrapped[3]) is nn.ConvTranspose1d
    assert not any(p.requires_grad for p in wrapped[1].parameters())
    # counted: two adapters (r * (in + out)) and the biases of the adapted layers only
    assert sparta.learned_parameters(wrapped) == 8 * (3 + 8) + 8 + 8 * (8 + 4) + 4
    with pytest.raises(sparta.NotAdaptableError, match="ConvTranspose2d"):
        sparta.AdaptedLayer(nn.ConvTranspose2d(8, 8, 3))


def test_nothing_to_adapt():
    for model in (nn.Sequential(), nn.Sequential(nn.ReLU(), nn.Linear(4, 2))):
        with pytest.raises(sparta.ConfigError, match="adapted no layer"):
            sparta.wrap(model)
