import math

import pytest
import torch
import torch.nn.functional as F

from common.config import section
from common.losses import MarginHead, MetricLoss, batch_hard_triplet, class_weights, hardest_pairs


def unit(angle):
    return torch.tensor([[math.cos(angle), math.sin(angle)]])


def axis_head(kind, s=10.0, m=0.3, k=1):
    """Two classes whose centres are the x and y axes."""
    head = MarginHead(2, 2, kind, s=s, m=m, k=k)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2).repeat_interleave(head.k, dim=0))
    return head


def test_arcface_adds_the_angular_margin_to_the_target_logit_only():
    head = axis_head("arcface", s=10.0, m=0.3)
    theta = 0.4  # angle to class 0; to class 1 it is pi/2 - theta
    logits = head(unit(theta), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(theta + 0.3), abs=1e-5)
    assert logits[0, 1].item() == pytest.approx(10 * math.cos(math.pi / 2 - theta), abs=1e-5)
    plain = head.cosine(unit(theta))[0]
    assert plain.tolist() == pytest.approx([math.cos(theta), math.sin(theta)], abs=1e-6)


def test_arcface_stays_monotonic_past_pi_minus_m():
    head = axis_head("arcface", s=1.0, m=0.5)
    near, far = (head(unit(a), torch.tensor([0]))[0, 0].item() for a in (math.pi - 0.3, math.pi - 0.1))
    assert far < near  # cos(theta + m) would rise again here
    assert far == pytest.approx(math.cos(math.pi - 0.1) - math.sin(math.pi - 0.5) * 0.5, abs=1e-5)


def test_cosface_subtracts_the_margin_from_the_target_cosine():
    head = axis_head("cosface", s=8.0, m=0.35)
    logits = head(unit(0.2), torch.tensor([1]))
    assert logits[0, 1].item() == pytest.approx(8 * (math.sin(0.2) - 0.35), abs=1e-5)
    assert logits[0, 0].item() == pytest.approx(8 * math.cos(0.2), abs=1e-5)


def test_subcenter_uses_the_closest_of_k_centres():
    head = MarginHead(2, 2, "subcenter", s=1.0, m=0.0, k=3)
    with torch.no_grad():  # class 0 has one centre on the query, class 1 none near it
        head.weight.copy_(torch.tensor([[0, 1], [1, 0], [0, -1], [-1, 0], [0, -1], [-1, -1.0]]))
    assert head.cosine(unit(0.0))[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert head.weight.shape == (6, 2)


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="margin head"):
        MarginHead(4, 3, "sphereface")


def test_batch_hard_triplet_uses_the_hardest_positive_and_negative():
    # 1-D points on the unit circle: labels a a b b
    angles = torch.tensor([0.0, 0.5, 0.7, 2.0])
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    d = torch.cdist(emb, emb)
    pos, neg, ok = hardest_pairs(d, labels)
    assert pos.tolist() == [1, 0, 3, 2] and neg.tolist() == [2, 2, 1, 1] and ok.all()
    gaps = torch.stack([d[i, pos[i]] - d[i, neg[i]] for i in range(4)])
    expected = F.relu(gaps + 0.3).mean().item()
    assert batch_hard_triplet(emb, labels, margin=0.3).item() == pytest.approx(expected, abs=1e-5)
    soft = F.softplus(gaps).mean().item()
    assert batch_hard_triplet(emb, labels, margin=None).item() == pytest.approx(soft, abs=1e-5)


def test_triplet_without_positives_is_zero_but_differentiable():
    emb = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    loss = batch_hard_triplet(emb, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0 and emb.grad is not None


def test_class_weights_favour_rare_classes_and_average_one():
    w = class_weights([1, 4, 9, 100])
    assert w.mean().item() == pytest.approx(1.0) and (w[:-1] > w[1:]).all()


def test_metric_loss_combines_its_parts_and_trains_the_head():
    cfg = section("train", loss="arcface+triplet", arcface_s=16.0, arcface_m=0.3, triplet_margin=0.2,
                  triplet_weight=0.5, ce_weight=0.2, label_smoothing=0.1)
    loss_fn = MetricLoss(cfg, emb_dim=8, n_classes=3)
    emb = F.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    total, parts = loss_fn(emb, labels)
    assert set(parts) == {"arcface", "triplet", "ce"}
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-5)
    total.backward()
    assert loss_fn.head.weight.grad.abs().sum() > 0


def test_metric_loss_class_weights_change_the_loss():
    emb = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    torch.manual_seed(0)
    plain = MetricLoss(section("train", loss="cosface"), 8, 3, counts=[4, 1, 1])
    torch.manual_seed(0)
    weighted = MetricLoss(section("train", loss="cosface", class_weights=True), 8, 3, counts=[4, 1, 1])
    assert plain(emb, labels)[0].item() != pytest.approx(weighted(emb, labels)[0].item(), rel=1e-4)


def test_triplet_alone_has_no_head():
    assert MetricLoss(section("train", loss="triplet"), 8, 3).head is None


@pytest.mark.parametrize("bad", ["arcface+cosface", "circle", ""])
def test_bad_loss_names_are_refused(bad):
    with pytest.raises(ValueError, match="train.loss"):
        MetricLoss(section("train", loss=bad), 8, 3)
