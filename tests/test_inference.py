import cv2
import numpy as np
import pytest
import torch

from common.config import section
from common.inference import embed_images
from common.io import ImageReadError
from common.models import build_model

torch.set_num_threads(1)
CFG = section("model", backbone="tf_efficientnet_lite0", pretrained="none", img_size=64, emb_dim=16, pool="gem")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CFG).eval()


@pytest.fixture()
def images(tmp_path):
    """Three 64x64 images: two asymmetric (and the mirror of the first), one mirror-symmetric."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    half = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    sym = np.concatenate([half, half[:, ::-1]], axis=1)
    paths = {}
    for name, img in {"a": a, "b": b, "a_mirror": a[:, ::-1], "sym": sym}.items():
        paths[name] = tmp_path / f"{name}.png"
        cv2.imwrite(str(paths[name]), cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
    return paths


def test_shape_dtype_norm_and_order(model, images):
    e = embed_images(model, [images["a"], images["b"], images["sym"]], 64, batch_size=2, progress=False)
    assert e.shape == (3, 16) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    swapped = embed_images(model, [images["b"], images["a"]], 64, batch_size=1, progress=False)
    assert np.allclose(swapped, e[[1, 0]], atol=1e-5)  # order kept, batch size irrelevant in eval mode
    assert not np.allclose(e[0], e[1], atol=1e-3)


def test_matches_a_manual_forward_with_the_models_normalisation(model, images):
    img = cv2.cvtColor(cv2.imread(str(images["a"])), cv2.COLOR_BGR2RGB)
    x = (torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255 - 0.5) / 0.5
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.allclose(embed_images(model, [images["a"]], 64, progress=False), ref, atol=1e-5)


def test_tta_on_symmetric_image_equals_no_tta(model, images):
    plain = embed_images(model, [images["sym"]], 64, progress=False)
    tta = embed_images(model, [images["sym"]], 64, tta_hflip=True, progress=False)
    assert np.allclose(plain, tta, atol=1e-5)


def test_tta_averages_image_and_mirror(model, images):
    both = embed_images(model, [images["a"], images["a_mirror"]], 64, progress=False)
    expected = both.sum(0) / np.linalg.norm(both.sum(0))
    tta = embed_images(model, [images["a"], images["a_mirror"]], 64, tta_hflip=True, progress=False)
    assert np.allclose(tta[0], expected, atol=1e-5) and np.allclose(tta[1], expected, atol=1e-5)
    assert not np.allclose(both[0], expected, atol=1e-3)


def test_empty_list_and_mode_restored(model):
    model.train()
    try:
        e = embed_images(model, [], 64, progress=False)
        assert e.shape == (0, 16) and e.dtype == np.float32
        assert model.training
    finally:
        model.eval()


def test_unreadable_image_names_the_file(model, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        embed_images(model, [images["a"], bad], 64, progress=False)
