import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from common import lr_finder, schedule, training
from common.augment import build_transforms
from common.io import read_image
from common.config import load_config, member_config
from common.models import build_model, load_checkpoint


def toy_frame(root, n_ids=6, per_id=4, size=48, seed=0) -> pd.DataFrame:
    """Each identity is a fixed random colour pattern; its photos are shifted, noisy copies."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_ids):
        pattern = cv2.resize(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), (size, size),
                             interpolation=cv2.INTER_NEAREST)
        for j in range(per_id):
            img = np.roll(pattern, tuple(rng.integers(-3, 4, 2)), axis=(0, 1)).astype(int)
            img = np.clip(img + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)
            path = root / f"w{i}_{j}.png"
            cv2.imwrite(str(path), img)
            rows.append({"Image": path.name, "Id": f"w{i}", "path": str(path)})
    return pd.DataFrame(rows)


def tiny_member(**train):
    member = member_config(load_config("tiny"), "lite0_64")
    member["model"].update(img_size=48, emb_dim=16)
    member["train"].update(dict(epochs=2, P=3, K=2, lr=2e-3, batch_embed=32), **train)
    member["augment"]["strength"] = 0.3
    return member


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    df = toy_frame(tmp_path_factory.mktemp("toy"))
    val = df.assign(is_query=[int(j % 2 == 0) for j in range(len(df))])
    return df, val


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [schedule.lr_factor(t, 10, warmup=2, floor=0.05) for t in np.linspace(0, 10, 101)]
    assert f[0] == pytest.approx(0.05) and max(f) == pytest.approx(1.0) and f[-1] == pytest.approx(0.05)
    peak = int(np.argmax(f))
    assert np.all(np.diff(f[:peak + 1]) > 0) and np.all(np.diff(f[peak:]) <= 1e-12)
    restarts = [schedule.lr_factor(t, 15, schedule="sgdr", cycle=5, mult=2) for t in (4.9, 5.0, 14.9)]
    assert restarts[0] < 0.05 and restarts[1] == pytest.approx(1.0) and restarts[2] < 0.05
    with pytest.raises(ValueError, match="schedule"):
        schedule.lr_factor(1, 10, schedule="step")


def test_param_groups_have_discriminative_lrs_and_no_decay_on_biases_and_norms():
    member = tiny_member(lr=1e-3, backbone_lr_mult=0.1, head_lr_mult=10.0, weight_decay=0.01)
    model = build_model(dict(member["model"], pretrained="none"))
    loss_fn = training.MetricLoss(member["train"], model.emb_dim, 5)
    opt = training.build_optimizer(model, loss_fn, member["train"])
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone"]["lr"] == pytest.approx(1e-4) and by_name["neck"]["lr"] == pytest.approx(1e-3)
    assert by_name["head"]["lr"] == pytest.approx(1e-2)
    assert all(p.ndim > 1 for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["name"].endswith("_no_decay"))
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters()) + loss_fn.head.weight.numel()


def test_loop_learns_a_tiny_set(tmp_path, toy):
    df, _ = toy
    val = df.assign(is_query=1)
    member = tiny_member(epochs=12, lr=1e-3, K=4, P=3, val_every=4, freeze_bn=True)
    member["augment"].update(strength=0.0, hflip=False)
    result = training.fit(member, df, val, tmp_path, device="cpu", progress=False)
    hist = result["history"]
    assert [r["epoch"] for r in hist] == list(range(13)), "epoch 0 scores the starting weights"
    losses = [r["loss"] for r in hist[1:]]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), "training loss falls"
    assert hist[-1]["top1"] > hist[0]["top1"] + 0.2 and hist[-1]["map20"] > hist[0]["map20"], "retrieval improves"
    for name in ("best.pt", "last.pt", "history.csv", "curves.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert any((tmp_path / "tb").iterdir())
    validated = {r["epoch"]: r["map20"] for r in hist[1:] if not math.isnan(r.get("map20", math.nan))}
    assert sorted(validated) == [4, 8, 12]
    assert result["best_epoch"] == max(validated, key=validated.get), "best.pt follows train.metric"
    model, ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["epoch"] == result["best_epoch"] and ckpt["classes"] == [f"w{i}" for i in range(6)]
    assert set(ckpt) >= {"model", "head", "member", "classes", "epoch", "optimizer", "scheduler", "metrics", "history"}
    assert ckpt["head"]["weight"].shape == (6, 16), "one ArcFace centre per identity (no flips here)"


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path, toy):
    df, val = toy
    member = tiny_member(epochs=2)
    member["model"]["dropout"] = 0.3  # exercises the torch RNG across the interruption
    full = training.fit(member, df, val, tmp_path / "full", device="cpu", progress=False)
    half = training.fit(member, df, val, tmp_path / "split", device="cpu", progress=False, stop_after=1)
    assert [r["epoch"] for r in half["history"]] == [0, 1]
    rest = training.fit(member, df, val, tmp_path / "split", device="cpu", progress=False, resume=True)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k
    assert torch.allclose(a["head"]["weight"], b["head"]["weight"], atol=1e-6)
    assert rest["history"][-1]["map20"] == pytest.approx(full["history"][-1]["map20"])
    assert len(rest["history"]) == len(full["history"]) == 3


def test_resume_refuses_a_changed_training_set(tmp_path, toy):
    df, val = toy
    training.fit(tiny_member(epochs=2), df, val, tmp_path, device="cpu", progress=False, stop_after=1)
    with pytest.raises(ValueError, match="identities changed"):
        training.fit(tiny_member(epochs=2), df[df.Id != "w0"], val, tmp_path, device="cpu", progress=False,
                     resume=True)


def test_without_validation_last_is_best_and_progressive_sizes_apply(tmp_path, toy):
    df, _ = toy
    member = tiny_member(progressive=[[32, 1], [48, 1]], loss="triplet")
    result = training.fit(member, df, None, tmp_path, device="cpu", progress=False)
    assert [r["img_size"] for r in result["history"]] == [32, 48]
    assert result["best_epoch"] == 2 and result["metrics"] == {}
    assert torch.load(tmp_path / "best.pt", weights_only=False)["epoch"] == 2


def test_empty_training_table_is_a_clear_error(tmp_path, toy):
    df, _ = toy
    with pytest.raises(ValueError, match="no training images"):
        training.fit(tiny_member(), df.head(0), None, tmp_path, device="cpu", progress=False)


def test_lr_find_plots_and_suggests_a_learning_rate_in_range(tmp_path, toy):
    df, _ = toy
    lr = lr_finder.lr_find(tiny_member(), df, tmp_path / "lr.png", device="cpu", start_lr=1e-5, end_lr=1.0,
                          num_iter=12, progress=False)
    assert 1e-5 <= lr <= 1.0 and (tmp_path / "lr.png").stat().st_size > 0


def test_frozen_baseline_scores_pooled_backbone_features(toy):
    df, val = toy
    scores = training.frozen_baseline(tiny_member(), val, device="cpu", progress=False)
    assert set(scores) >= {"map20", "map5", "top1", "hit20"} and scores["n_queries"] == int(val.is_query.sum())
    assert 0 <= scores["map20"] <= 1 and not math.isnan(scores["top1"])


def test_imprinting_puts_each_class_centre_at_its_images(toy):
    df, _ = toy
    member = tiny_member(freeze_bn=True)
    member["augment"]["hflip"] = False
    run = training.setup_run(member, df, None, torch.device("cpu"))
    plain = build_transforms(48, run.model.mean, run.model.std, train=False)
    x = torch.stack([plain(image=read_image(p))["image"] for p in df["path"]])
    random_acc = _nearest_centre_accuracy(run, x)
    training.imprint_head(run, 48, batch_size=64, progress=False)
    assert torch.allclose(run.loss_fn.head.weight.norm(dim=1), torch.ones(6), atol=1e-5)
    assert _nearest_centre_accuracy(run, x) >= max(0.6, random_acc + 0.3)


def _nearest_centre_accuracy(run, x) -> float:
    training.train_mode(run.model, run.freeze_bn)
    with torch.no_grad():
        predicted = run.loss_fn.head.cosine(run.model(x)).argmax(1).numpy()
    return float((predicted == run.labels).mean())


def test_zero_epochs_keep_the_starting_weights_as_best(toy, tmp_path):
    """train.epochs: 0 is a frozen run: best.pt holds the starting weights, scored as epoch 0."""
    import torch

    from common.models import load_checkpoint

    df, val = toy
    start = training.fit(tiny_member(epochs=1), df, val, tmp_path / "start", device="cpu", progress=False)
    result = training.fit(tiny_member(epochs=0), df, val, tmp_path / "zero", device="cpu", progress=False,
                          init=start["best"])
    assert result["best_epoch"] == 0 and [h["epoch"] for h in result["history"]] == [0]
    assert result["metrics"]["map20"] == pytest.approx(start["metrics"]["map20"], abs=1e-6)
    a, _ = load_checkpoint(start["best"])
    b, _ = load_checkpoint(tmp_path / "zero" / "best.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_below_baseline_warns_loudly_and_the_frozen_fallback_embeds_pooled_features(toy, tmp_path, capsys):
    _, val = toy
    assert training.warn_below_baseline("m", {"map20": 0.10}, {"map20": 0.20}, "map20", "frozen")
    err = capsys.readouterr().err
    assert "WARNING: m trained" in err and "BELOW its untrained backbone (0.2000)" in err and "frozen" in err
    assert not training.warn_below_baseline("m", {"map20": 0.30}, {"map20": 0.20}) and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="below_baseline"):
        training.warn_below_baseline("m", {"map20": 0.1}, {"map20": 0.2}, policy="drop")
    member = tiny_member()
    model, ckpt = load_checkpoint(training.save_frozen(member, tmp_path / "frozen.pt"))
    assert ckpt["output"] == "pooled" and model.emb_dim == model.net.feat_dim
    base = training.frozen_baseline(member, val, device="cpu", progress=False)
    assert training.evaluate(model, val, 48, progress=False) == base  # the fallback is the baseline it beat
