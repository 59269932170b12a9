from collections import Counter

import numpy as np
import pytest

from common.samplers import PKSampler

# identity sizes 1, 2, 3, 5, 9 and 4 x 4: long tail like the competition
LABELS = np.repeat(np.arange(9), [1, 2, 3, 5, 9, 4, 4, 4, 4])


def ids_of(batch):
    return [LABELS[i] for i, _, _ in batch]


def test_every_image_and_identity_every_epoch_in_full_pk_batches():
    s = PKSampler(LABELS, P=3, K=4, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        seen = {i for b in batches for i, _, _ in b}
        assert seen == set(range(len(LABELS))), "every image each epoch"
        for b in batches:
            counts = Counter(ids_of(b))
            assert len(b) == 12 and len(counts) == 3, "P distinct identities"
            assert set(counts.values()) == {4}, "K images each"


def test_small_identities_are_upsampled_and_large_ones_appear_more_often():
    s = PKSampler(LABELS, P=3, K=4, seed=0)
    groups = Counter()
    for b in s:
        for g, n in Counter(ids_of(b)).items():
            groups[g] += 1
            assert n == 4
    assert groups[0] >= 1 and groups[1] >= 1  # 1- and 2-image identities fill K slots by repetition
    assert groups[4] >= 3  # 9 images: ceil(9 / 4) groups


def test_order_depends_on_seed_and_epoch_only():
    a, b = PKSampler(LABELS, 3, 4, seed=5), PKSampler(LABELS, 3, 4, seed=5)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(PKSampler(LABELS, 3, 4, seed=6)) != list(a)


def test_flips_are_per_identity_group_and_roughly_half():
    s = PKSampler(LABELS, P=3, K=4, seed=0, flip=True)
    flips = []
    for epoch in range(10):
        s.set_epoch(epoch)
        for batch in s:
            per_group = {}
            for i, f, _ in batch:
                per_group.setdefault(LABELS[i], set()).add(f)
            assert all(len(v) == 1 for v in per_group.values()), "positives share one orientation"
            flips += [next(iter(v)) for v in per_group.values()]
    assert 0.3 < np.mean(flips) < 0.7
    assert not any(f for b in PKSampler(LABELS, 3, 4) for _, f, _ in b)


def test_every_item_gets_its_own_augmentation_seed():
    seeds = [a for b in PKSampler(LABELS, 3, 4) for _, _, a in b]
    assert len(set(seeds)) == len(seeds)


def test_p_is_capped_by_the_number_of_identities():
    s = PKSampler(["a", "a", "b", "b"], P=8, K=2)
    assert all(len(b) == 4 for b in s)


@pytest.mark.parametrize("kwargs", [dict(labels=[], P=2, K=2), dict(labels=[1, 2], P=0, K=2)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        PKSampler(**kwargs)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_ranks_split_each_batch_by_identity_and_cover_the_epoch(world):
    from common.samplers import DistributedPKSampler

    single = PKSampler(LABELS, P=6, K=2, seed=3)
    ranks = [DistributedPKSampler(LABELS, P=6, K=2, seed=3, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert all(len(b) == len(single) for b in per_rank), "same optimisation steps as one process"
        for step, whole in enumerate(single):
            parts = [b[step] for b in per_rank]
            assert sorted(k for p in parts for k in p) == sorted(whole), "the ranks together = the global batch"
            id_sets = [set(ids_of(p)) for p in parts]
            assert all(a.isdisjoint(b) for i, a in enumerate(id_sets) for b in id_sets[i + 1:]), "distinct identities"
            assert all(len(p) == 6 // world * 2 for p in parts)
        assert {i for b in per_rank for batch in b for i, _, _ in batch} == set(range(len(LABELS)))


def test_distributed_sampler_rejects_bad_ranks():
    from common.samplers import DistributedPKSampler

    with pytest.raises(ValueError, match="rank 2 outside"):
        DistributedPKSampler(LABELS, P=4, K=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot be shared by 8 ranks"):
        DistributedPKSampler(LABELS, P=4, K=2, world_size=8)
