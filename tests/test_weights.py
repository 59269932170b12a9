import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from common import weights
from common.config import section
from common.models import build_model
from common.weights import WeightsError, load_offline_imagenet, map_state_dict, offline_weight_file

torch.set_num_threads(1)
LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def source():
    return torch.load(offline_weight_file(LITE0), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier():
    net = timm.create_model(LITE0, pretrained=False).eval()
    load_offline_imagenet(net, LITE0)
    return net


@pytest.mark.parametrize("i", [0, 1, 2])
def test_offline_weights_map_one_to_one_onto_timm(i):
    name = f"tf_efficientnet_lite{i}"
    src = torch.load(offline_weight_file(name), map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    mapped = map_state_dict(src, target)
    assert list(mapped) == list(target)  # every timm tensor filled, in order
    for (sk, sv), (tk, tv) in zip(src.items(), mapped.items()):
        assert tuple(sv.shape) == tuple(target[tk].shape) and sv is tv


def test_loaded_classifier_differs_from_random_init_and_is_deterministic(classifier, source):
    state = classifier.state_dict()
    assert torch.equal(state["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(state["classifier.weight"], source["_fc.weight"])
    fresh = timm.create_model(LITE0, pretrained=False).eval()
    assert not torch.equal(fresh.state_dict()["conv_stem.weight"], state["conv_stem.weight"])
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    x = torch.tensor(np.stack([np.sin(6 * xx), np.cos(4 * yy), xx * yy]), dtype=torch.float32)[None]
    with torch.no_grad():
        a, b, r = classifier(x), classifier(x), fresh(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, r, atol=1e-3)


def test_semantic_check_on_photos_shipped_with_the_venv():
    """Offline weights + mean = std = 0.5 recognise known photos (ImageNet 652 military uniform, 654 minibus)."""
    import matplotlib
    import ultralytics

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    bus = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    if not (hopper.exists() and bus.exists()):
        pytest.skip("sample photos not installed")
    top = weights.classify([hopper, bus], LITE0, size=224, k=5)
    assert top[0][0][0] == 652 and "uniform" in top[0][0][1]
    assert top[1][0][0] == 654


def test_build_model_imagenet_fills_backbone_without_classifier(source):
    m = build_model(section("model", backbone=LITE0, pretrained="imagenet", emb_dim=8))
    assert torch.equal(m.backbone.state_dict()["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(m.backbone.state_dict()["bn2.running_var"], source["_bn1.running_var"])
    assert m.mean == m.std == (0.5, 0.5, 0.5)


def test_imagenet_for_backbone_without_offline_weights_suggests_hub_or_none():
    with pytest.raises(WeightsError, match=r"resnet18.*pretrained=hub.*pretrained=none"):
        build_model(section("model", backbone="resnet18", pretrained="imagenet", emb_dim=8))


def test_timm_models_normalise_like_their_pretrained_cfg():
    m = build_model(section("model", backbone="resnet18", pretrained="none", emb_dim=8))
    assert m.mean == pytest.approx((0.485, 0.456, 0.406)) and m.std == pytest.approx((0.229, 0.224, 0.225))


def test_hub_failure_is_a_clear_error(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no internet")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(weights, "hub_weights_cached", lambda name: True)  # past the quick check: timm fails
    with pytest.raises(WeightsError, match=r"hub.*no internet.*offline: false"):
        build_model(section("model", backbone=LITE0, pretrained="hub", emb_dim=8))


def test_map_state_dict_rejects_mismatches():
    t = {"a.weight": torch.empty(3, 2), "a.bias": torch.empty(3)}
    with pytest.raises(WeightsError, match="does not fit"):
        map_state_dict({"x.weight": torch.empty(2, 2), "x.bias": torch.empty(3)}, t)
    with pytest.raises(WeightsError, match="does not fit"):  # same shapes, different kind of tensor
        map_state_dict({"x.bias": torch.empty(3, 2), "x.weight": torch.empty(3)}, t)
    with pytest.raises(WeightsError, match="1 tensors"):
        map_state_dict({"x.weight": torch.empty(3, 2)}, t)


def test_bare_timm_state_dict_as_pretrained_path(tmp_path):
    torch.manual_seed(1)
    net = timm.create_model(LITE0, pretrained=False)
    torch.save(net.state_dict(), tmp_path / "timm.pth")  # with classifier: ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bare backbone has no neck: nothing to warn about
        m = build_model(section("model", backbone=LITE0, pretrained=str(tmp_path / "timm.pth"), emb_dim=8))
    assert torch.equal(m.backbone.state_dict()["conv_stem.weight"], net.state_dict()["conv_stem.weight"])


def test_hub_without_cache_or_network_fails_in_seconds(monkeypatch):
    """The full profile (model.pretrained=hub) on a machine without the hub: one line, at once."""
    import time

    monkeypatch.setattr(weights, "hub_weights_cached", lambda name: False)
    monkeypatch.setattr(weights, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    called = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: called.append(a))
    t = time.time()
    with pytest.raises(WeightsError, match=r"huggingface\.co is unreachable.*pretrained=imagenet.*local weights file"):
        build_model(section("model", backbone="resnet34", pretrained="hub", emb_dim=8))
    assert time.time() - t < 5 and not called, "timm must not be asked to download"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"offline: true forbids downloads"):
        build_model(section("model", backbone="resnet34", pretrained="hub", emb_dim=8))


def test_cached_hub_weights_skip_the_network_check(monkeypatch):
    monkeypatch.setattr(weights, "hub_weights_cached", lambda name: True)
    monkeypatch.setattr(weights, "hub_reachable", lambda *a, **k: pytest.fail("no network check needed"))
    weights.check_hub("resnet34")
