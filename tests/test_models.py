import pytest
import torch

from common.config import section
from common.models import AvgPool, GeM, ModelConfigError, build_model, load_checkpoint
from common.weights import WeightsError

torch.set_num_threads(1)
CFG = section("model", backbone="tf_efficientnet_lite0", pretrained="none", img_size=64, emb_dim=32,
              dropout=0.0, pool="gem", gem_p=3.0)


def _model(**over):
    torch.manual_seed(0)
    return build_model({**CFG, **over})


def _save_ckpt(model, path, cfg):
    torch.save({"model": model.state_dict(), "head": None, "member": {"name": "m", "model": cfg},
                "classes": ["a", "b"], "epoch": 1, "metrics": {"map20": 0.5}, "history": []}, path)
    return path


@pytest.fixture(scope="module")
def model():
    return _model().eval()


def test_forward_shape_and_unit_norm(model):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        e = model(x)
    assert e.shape == (3, 32) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.emb_dim == 32 and model.img_size == 64
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)


def test_gem_p_is_learnable_and_gets_gradient(model):
    assert isinstance(model.pool, GeM)
    assert any(p is model.pool.p for p in model.parameters()) and model.pool.p.requires_grad
    assert model.pool.p.item() == pytest.approx(3.0)
    gem = GeM(p=2.0)
    gem(torch.rand(2, 4, 5, 5)).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0


def test_gem_p1_equals_average_pooling_and_large_p_tends_to_max():
    x = torch.rand(2, 8, 7, 7) + 0.01
    assert torch.allclose(GeM(p=1.0)(x), AvgPool()(x), atol=1e-6)
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)
    big = GeM(p=60.0)(x)
    assert torch.all(big <= x.amax(dim=(2, 3)) + 1e-5) and torch.all(big > x.mean(dim=(2, 3)))


def test_neck_follows_config():
    m = _model(emb_dim=24, dropout=0.5, pool="avg")
    assert isinstance(m.pool, AvgPool)
    drop, lin, bn = m.neck
    assert drop.p == 0.5 and lin.out_features == 24 and bn.num_features == 24 and m.emb_dim == 24
    assert lin.in_features == m.backbone.num_features == 1280
    with torch.no_grad():
        assert m.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 24)


def test_param_groups_cover_every_parameter_once(model):
    groups = model.param_groups()
    assert set(groups) == {"backbone", "neck"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.pool.p) in {id(p) for p in groups["neck"]}
    assert {id(p) for p in model.neck.parameters()} <= {id(p) for p in groups["neck"]}


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path):
    model = _model()
    with torch.no_grad():
        model.pool.p.fill_(2.5)  # a trained value must survive the round trip
    path = _save_ckpt(model, tmp_path / "best.pt", {**CFG, "pretrained": "imagenet"})
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training and ckpt["classes"] == ["a", "b"] and ckpt["epoch"] == 1
    assert loaded.pool.p.item() == pytest.approx(2.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_pretrained_path_loads_backbone_and_neck(tmp_path):
    src = _model()
    with torch.no_grad():
        src.neck[1].weight.mul_(2.0)
    path = _save_ckpt(src, tmp_path / "pre.pt", CFG)
    dst = _model(pretrained=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_pretrained_path_with_other_neck_size_reinitialises_neck(tmp_path):
    src = _model()
    path = _save_ckpt(src, tmp_path / "pre.pt", CFG)
    with pytest.warns(UserWarning, match="re-initialised"):
        dst = _model(pretrained=str(path), emb_dim=16)
    assert dst.neck[1].weight.shape == (16, 1280)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(v, dst.backbone.state_dict()[k]), k


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(WeightsError, match="neither imagenet"):
        _model(pretrained=str(tmp_path / "missing.pt"))
    path = _save_ckpt(_model(), tmp_path / "pre.pt", CFG)
    with pytest.raises(WeightsError, match="trained with backbone 'tf_efficientnet_lite0'"):
        _model(pretrained=str(path), backbone="resnet18")


def test_bad_config_is_a_clear_error():
    with pytest.raises(ModelConfigError, match="tf_efficientnet_lite0"):  # suggestion for a typo
        build_model({**CFG, "backbone": "tf_efficientnet_lite00"})
    with pytest.raises(ModelConfigError, match="pool"):
        build_model({**CFG, "pool": "max"})
    with pytest.raises(ModelConfigError, match="dropout"):
        build_model({**CFG, "dropout": 1.0})


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
