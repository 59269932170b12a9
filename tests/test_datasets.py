import cv2
import numpy as np
import pytest
import torch

from common.augment import build_transforms
from common.datasets import FlukeDataset, encode_labels, hflip_mode, make_loader
from common.io import ImageReadError
from common.samplers import PKSampler


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        img = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), img[:, :, ::-1])  # written as BGR, read back as RGB
    return paths


def test_encode_labels_is_sorted_and_invertible():
    labels, classes = encode_labels(["w2", "w1", "w2", "w3"])
    assert classes == ["w1", "w2", "w3"] and labels.tolist() == [1, 0, 1, 2]
    assert [classes[i] for i in labels] == ["w2", "w1", "w2", "w3"]


def test_flipped_item_is_mirrored_and_labelled_as_a_new_identity(images):
    ds = FlukeDataset(images, [0, 0, 1, 1, 2, 2], transform=None, mirror_offset=3)
    plain, y = ds[2]
    mirrored, y_flip = ds[(2, True)]
    assert (y, y_flip) == (1, 4)
    assert torch.equal(mirrored, plain.flip(1)) and not torch.equal(mirrored, plain)
    assert plain.shape == (40, 56, 3) and plain.dtype == torch.uint8


def test_transformed_items_are_float_chw_tensors(images):
    t = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True)
    x, y = FlukeDataset(images, None, t)[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == -1


def test_augmentation_depends_on_the_sampler_seed_only_not_on_workers(images):
    labels = [0, 0, 1, 1, 2, 2]
    ds = FlukeDataset(images, labels, build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True, strength=1.5),
                      mirror_offset=3)

    def first_batch(seed, workers=0):
        return next(iter(make_loader(ds, PKSampler(labels, P=3, K=2, seed=seed, flip=True), num_workers=workers)))

    (a, ya), (b, yb), (c, _) = first_batch(7), first_batch(7, workers=2), first_batch(8)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)
    assert a.shape == (6, 3, 32, 32) and set(ya.tolist()) <= set(range(6))
    x1, _ = ds[(0, False, 123)]
    x2, _ = ds[(0, False, 123)]
    assert torch.equal(x1, x2)


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        FlukeDataset([bad], [0])[0]


def test_hflip_modes():
    assert hflip_mode({"hflip": "new_identity"})
    assert not hflip_mode({"hflip": False}) and not hflip_mode({"hflip": None})
    with pytest.raises(ValueError, match="augment.hflip"):
        hflip_mode({"hflip": "same_identity"})


def test_label_count_must_match(images):
    with pytest.raises(ValueError, match="labels"):
        FlukeDataset(images, [0, 1])
