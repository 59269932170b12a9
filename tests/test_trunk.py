"""common/trunk.py: the frozen trunk / trainable top split, the feature cache, training on it."""
import numpy as np
import pytest
import timm
import torch
from torch import nn

from common import training
from common.augment import build_transforms
from common.config import ConfigError
from common.io import read_image
from common.models import load_checkpoint
from common.trunk import TrunkCache, cached_trunk, split_backbone
from test_training import tiny_member, toy_frame


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_split_reproduces_forward_features(name):
    net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
    x = torch.randn(2, 3, 64, 64)
    for n in (0, 1, 2):
        trunk, top = split_backbone(net, n)
        assert torch.allclose(top(trunk(x)), net.forward_features(x), atol=1e-5)
    trunk, top = split_backbone(net, 1)
    shared = {id(p) for p in net.parameters()}
    assert {id(p) for p in top.parameters()} <= shared and len(list(top.parameters())) > 0


def test_split_refuses_unknown_backbones_and_out_of_range_counts():
    with pytest.raises(ConfigError, match="cannot split"):
        split_backbone(nn.Sequential(nn.Conv2d(3, 4, 3)), 1)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="")
    with pytest.raises(ConfigError, match="4 stages"):
        split_backbone(net, 5)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    df = toy_frame(tmp_path_factory.mktemp("trunk_toy"), n_ids=5, per_id=4)
    val = df.assign(is_query=[int(j % 4 == 0) for j in range(len(df))])
    return df, val


def test_cache_holds_the_plain_view_first_then_augmented_and_mirrored_views(toy):
    df, _ = toy
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="").eval()
    trunk, _ = split_backbone(net, 2)
    paths = list(df["path"])
    cache = TrunkCache(trunk, paths, [0, 1], 48, (0.5,) * 3, (0.5,) * 3, views=3, strength=1.0, flip=True,
                       progress=False)
    assert cache.train.shape[:3] == (2, 2, 3) and cache.plain.shape[0] == len(paths)
    plain = build_transforms(48, (0.5,) * 3, (0.5,) * 3, train=False)
    with torch.no_grad():
        direct = trunk(plain(image=read_image(paths[1]))["image"][None]).half()[0]
        mirrored = trunk(plain(image=np.ascontiguousarray(read_image(paths[1])[:, ::-1]))["image"][None]).half()[0]
    assert torch.allclose(cache.plain[1].float(), direct.float(), atol=1e-2)
    assert torch.equal(cache.train[1, 0, 0], cache.plain[1])            # view 0 = plain
    assert torch.allclose(cache.train[1, 1, 0].float(), mirrored.float(), atol=1e-2)  # mirrored plain
    assert not torch.allclose(cache.train[1, 0, 1].float(), cache.train[1, 0, 0].float(), atol=1e-2)  # augmented
    batch = cache.batch([(1, True, 3), (0, False, 4)])  # aug_seed % views picks the view
    assert torch.equal(batch[0], cache.train[1, 1, 0].float()) and torch.equal(batch[1], cache.train[0, 0, 1].float())


def test_training_on_the_cache_moves_only_the_top_and_is_reused(toy, tmp_path, capsys):
    df, val = toy
    member = tiny_member(epochs=2, trainable_blocks=2, cache_trunk=True, cache_views=2, lr=5e-3)
    init = tmp_path / "init"
    start = training.fit(tiny_member(epochs=0), df, val, init, device="cpu", progress=False)
    before = torch.load(start["best"], weights_only=False)["model"]
    res = training.fit(member, df, val, tmp_path / "a", init=start["best"], device="cpu", progress=False,
                       cache_dir=tmp_path / "cache")
    after = torch.load(res["best"], weights_only=False)["model"]
    trunk_keys = [k for k in before if k.startswith(("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0."))]
    top_keys = [k for k in before if k.startswith("backbone.blocks.6.") and k.endswith("weight")]
    assert trunk_keys and all(torch.equal(before[k], after[k]) for k in trunk_keys)  # frozen, BN stats too
    assert any(not torch.equal(before[k], after[k]) for k in top_keys) or res["best_epoch"] == 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert "built" in capsys.readouterr().out
    # seen / unseen identities are scored apart
    row = res["history"][-1]
    assert {"top1_seen", "map20_seen", "n_queries_seen", "n_queries_unseen"} <= set(row)
    # the same trunk, images and views: the cache file is read, not rebuilt
    training.fit(member, df, val, tmp_path / "b", init=start["best"], device="cpu", progress=False,
                 cache_dir=tmp_path / "cache")
    assert "reused" in capsys.readouterr().out and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # what validation scored from the cache is what the saved model gives on the images
    model, _ = load_checkpoint(res["last"])
    trunk, top = split_backbone(model.backbone, 2)
    cache, reused = cached_trunk(tmp_path / "cache", trunk, list(df["path"]), range(len(df)), 48, model.mean,
                                 model.std, views=2, strength=0.3, flip=True, seed=int(member["seed"]), progress=False)
    assert reused
    with torch.no_grad():
        from_cache = model.embed_map(top(cache.plain_features([0, 5])))
        x = torch.stack([build_transforms(48, model.mean, model.std, train=False)(image=read_image(df["path"][i]))["image"]
                         for i in (0, 5)])
        direct = model(x)
    assert torch.allclose(from_cache, direct, atol=2e-2)


def test_patience_stops_early(toy, tmp_path):
    df, val = toy
    # lr 0: only the neck's BatchNorm statistics move, so the score soon stops rising; the run ends
    # the first epoch that is not better than the best (patience 1), well before epoch 6
    member = tiny_member(epochs=6, patience=1, lr=0.0, warmup_epochs=0, freeze_bn=True)
    res = training.fit(member, df, val, tmp_path, device="cpu", progress=False)
    epochs = [r["epoch"] for r in res["history"]]
    assert epochs[-1] == res["best_epoch"] + 1 and epochs[-1] < 6


def test_time_budget_cuts_the_run_after_its_first_epoch(toy, tmp_path, capsys):
    df, val = toy
    res = training.fit(tiny_member(epochs=5, time_budget_min=1e-9), df, val, tmp_path, device="cpu", progress=False)
    assert [r["epoch"] for r in res["history"]] == [0, 1] and "exceed train.time_budget_min" in capsys.readouterr().out
    ckpt = torch.load(res["last"], weights_only=False)
    assert ckpt["scheduler"]["total"] == 1  # the schedule ended with the run, not at epoch 5
