"""``sparta.models``: models by name, heads, the CIFAR stem, weights and checkpoints.

Small models only (resnet18, mobilenet_v3_small, squeezenet1_1, digits_cnn) so the file runs
in seconds on a shared CPU. Nothing is downloaded: pretrained weights are a state dict written
here into ``$TORCH_HOME/hub/checkpoints/``, the cache torchvision reads before downloading (its
SHA-256 check on the file name's hash prefix runs only on download, so a cached file is used
as is), and downloading is replaced by a function that fails the test.
"""

from __future__ import annotations

import os
import pickle
import sys
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from sparta.errors import ConfigError, UnknownNameError
from sparta.models import apply_cifar_stem, create, digits_cnn, list_models, replace_head


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; any download attempt raises."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_download(url, dst, *args, **kwargs):
        raise urllib.error.URLError(f"test forbids downloading {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch"


def assert_same_tensors(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    keys = [k for k in a if not k.startswith(skip)]
    assert keys and set(keys) == {k for k in b if not k.startswith(skip)}
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def test_list_models():
    names = list_models()
    assert names == sorted(names)
    assert {"resnet18", "vit_b_16", "mobilenet_v3_small", "digits_cnn"} <= set(names)
    assert set(torchvision.models.list_models(module=torchvision.models)) < set(names)


# -- heads --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, head, size",
    [
        ("resnet18", "fc", 64),
        ("mobilenet_v3_small", "classifier.3", 64),
        ("squeezenet1_1", "classifier.1", 64),
        ("digits_cnn", "head", 8),
    ],
)
def test_num_classes_replaces_the_head(name, head, size):
    torch.manual_seed(0)
    default = create(name)
    in_channels = 1 if name == "digits_cnn" else 3
    expected = 10 if name == "digits_cnn" else 1000
    assert _outputs(default.get_submodule(head)) == expected
    model = create(name, num_classes=7).eval()
    assert _outputs(model.get_submodule(head)) == 7
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def _outputs(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def test_replace_head_keeps_the_body_and_resizes_aux_heads():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    body = {k: v.clone() for k, v in model.state_dict().items()}
    old_fc = model.fc
    replace_head(model, 5)
    assert model.fc is not old_fc and (model.fc.in_features, model.fc.out_features) == (1024, 5)
    assert model.aux1.fc2.out_features == model.aux2.fc2.out_features == 5
    heads = ("fc.", "aux1.fc2.", "aux2.fc2.")
    assert_same_tensors(body, model.state_dict(), skip=heads)

    vit_like = nn.Sequential()
    vit_like.add_module("encoder", nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)))
    vit_like.add_module("heads", nn.Sequential())
    vit_like.heads.add_module("head", nn.Linear(4, 1000))
    replace_head(vit_like, 3)
    assert vit_like.heads.head.out_features == 3 and vit_like.encoder[1].out_features == 4


# -- CIFAR stem ---------------------------------------------------------------------------------
def independent_pool(w: torch.Tensor) -> torch.Tensor:
    """3x3 from 7x7: output (i, j) is the mean of rows 2i..2i+2 and columns 2j..2j+2."""
    out = torch.empty(*w.shape[:2], 3, 3, dtype=w.dtype)
    for i in range(3):
        for j in range(3):
            out[..., i, j] = w[..., 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].mean(dim=(-2, -1))
    return out


def test_cifar_stem_shapes_and_pooled_kernel():
    torch.manual_seed(0)
    plain = create("resnet18")
    model = create("resnet18", cifar_stem=True)
    conv = model.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert conv.bias is None and isinstance(model.maxpool, nn.Identity)

    torch.manual_seed(1)
    base = create("resnet18")
    w7 = base.conv1.weight.detach().clone()
    apply_cifar_stem(base)
    torch.testing.assert_close(base.conv1.weight.detach(), independent_pool(w7), rtol=0, atol=1e-7)

    sizes = {}

    def record(key):
        def hook(module, inputs, output):
            sizes[key] = output.shape[-1]

        return hook

    model.layer1.register_forward_hook(record("layer1"))
    plain.layer1.register_forward_hook(record("plain"))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
        plain.eval()(torch.randn(1, 3, 32, 32))
    assert sizes == {"layer1": 32, "plain": 8}


def test_cifar_stem_needs_a_resnet():
    for name in ("mobilenet_v3_small", "digits_cnn"):
        with pytest.raises(ConfigError, match="cifar_stem needs a ResNet-style stem"):
            create(name, cifar_stem=True)


# -- pretrained weights from a local TORCH_HOME --------------------------------------------------
def test_weights_load_from_the_torch_home_cache(torch_home):
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    torch.manual_seed(123)
    saved = torchvision.models.mobilenet_v3_small().state_dict()
    target = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True)
    torch.save(saved, target)

    for spec in ("DEFAULT", "IMAGENET1K_V1", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        assert_same_tensors(saved, create("mobilenet_v3_small", weights=spec).state_dict())
    model = create("mobilenet_v3_small", num_classes=3, weights="DEFAULT")
    assert model.classifier[3].out_features == 3
    assert_same_tensors(saved, model.state_dict(), skip=("classifier.3.",))


def test_missing_weights_file_says_where_to_put_it(torch_home):
    with pytest.raises(ConfigError) as error:
        create("resnet18", weights="DEFAULT")
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(error.value) and "download.pytorch.org" in str(error.value)


def test_unknown_weights_list_the_valid_ones():
    with pytest.raises(ConfigError, match="valid: IMAGENET1K_V1, DEFAULT"):
        create("resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="unknown weights"):
        create("resnet18", weights="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="no published weights"):
        create("digits_cnn", weights="DEFAULT")


# -- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_pth_nested_and_safetensors(tmp_path):
    torch.manual_seed(2)
    saved = create("resnet18", num_classes=10).state_dict()
    torch.save({"state_dict": saved, "epoch": 3}, tmp_path / "ckpt.pth")
    save_file(saved, str(tmp_path / "ckpt.safetensors"))
    torch.save({f"module.{k}": v for k, v in saved.items()}, tmp_path / "ddp.pt")
    for file in ("ckpt.pth", "ckpt.safetensors", "ddp.pt"):
        model = create("resnet18", checkpoint=tmp_path / file)  # head resized to the file's 10
        assert_same_tensors(saved, model.state_dict())
    kept = create("resnet18", num_classes=10, checkpoint=tmp_path / "ckpt.pth")
    assert_same_tensors(saved, kept.state_dict())
    fresh = create("resnet18", num_classes=4, checkpoint=str(tmp_path / "ckpt.safetensors"))
    assert fresh.fc.out_features == 4
    assert_same_tensors(saved, fresh.state_dict(), skip=("fc.",))


def test_checkpoint_and_cifar_stem(tmp_path):
    torch.manual_seed(3)
    imagenet = create("resnet18").state_dict()  # a 7x7 conv1: the stem is pooled from it
    torch.save(imagenet, tmp_path / "imagenet.pth")
    model = create("resnet18", checkpoint=tmp_path / "imagenet.pth", cifar_stem=True)
    torch.testing.assert_close(
        model.conv1.weight.detach(), independent_pool(imagenet["conv1.weight"]), rtol=0, atol=1e-7
    )
    assert_same_tensors(imagenet, model.state_dict(), skip=("conv1.",))

    cifar = create("resnet18", num_classes=10, cifar_stem=True).state_dict()  # a 3x3 conv1
    save_file(cifar, str(tmp_path / "cifar.safetensors"))
    again = create("resnet18", 10, checkpoint=tmp_path / "cifar.safetensors", cifar_stem=True)
    assert_same_tensors(cifar, again.state_dict())


def test_bad_checkpoints(tmp_path):
    torch.save(create("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match=r"missing keys: layer1\.2\.") as error:
        create("resnet34", checkpoint=tmp_path / "r18.pth")
    assert "and" in str(error.value) and "more" in str(error.value)

    state = create("digits_cnn").state_dict()
    state["extra.weight"] = torch.zeros(1)
    state["features.0.weight"] = torch.zeros(16, 1, 5, 5)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match="unexpected keys: extra.weight.*shape mismatches"):
        create("digits_cnn", checkpoint=tmp_path / "odd.pt")

    with pytest.raises(ConfigError, match="does not exist"):
        create("resnet18", checkpoint=tmp_path / "missing.pth")
    with open(tmp_path / "pickled.pth", "wb") as f:
        pickle.dump({"weight": ConfigError("not a tensor")}, f, protocol=2)
    with pytest.raises(ConfigError, match="weights_only=True"):
        create("resnet18", checkpoint=tmp_path / "pickled.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read safetensors"):
        create("resnet18", checkpoint=tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="either weights or checkpoint"):
        create("resnet18", weights="DEFAULT", checkpoint=tmp_path / "r18.pth")


# -- names and values ---------------------------------------------------------------------------
def test_unknown_model_suggests_a_close_name():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        create("resnet-18")
    with pytest.raises(ConfigError, match="num_classes"):
        create("resnet18", num_classes=0)


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes "import timm" raise ImportError
    with pytest.raises(ConfigError, match="pip install timm"):
        create("timm:resnet18")


def test_digits_cnn_on_8x8_and_16x16():
    model = digits_cnn(5).eval()
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        for size in (8, 16):
            assert model(torch.randn(3, 1, size, size)).shape == (3, 5)
