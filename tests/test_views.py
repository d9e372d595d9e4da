"""View sampling (DESIGN §6): crops, instance-aware crops, mask warping, colour augmentation, k-means masks."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from freeatm_fast.config import DataConfig
from freeatm_fast.data import views as V
from freeatm_fast.data.dataset import LabeledSample
from freeatm_fast.data.toyworld import render_sample


def _toy(i, size=64, seed=0):
    s = render_sample(seed, "train", i, size)
    return LabeledSample(f"{i:09d}", Image.fromarray(s.image), s.masks, s.meta, index=i, label=s.meta["label"])


def test_random_resized_crop_ranges_and_determinism():
    for w, h in ((64, 64), (100, 40)):
        rng = np.random.default_rng(0)
        for _ in range(200):
            x0, y0, x1, y1 = V.random_resized_crop(rng, w, h, (0.2, 1.0))
            assert 0 <= x0 < x1 <= w + 1e-9 and 0 <= y0 < y1 <= h + 1e-9
            bw, bh = x1 - x0, y1 - y0
            assert V.RATIO[0] - 1e-9 <= bw / bh <= V.RATIO[1] + 1e-9
            assert bw * bh <= w * h + 1e-6
    a = V.random_resized_crop(np.random.default_rng(7), 64, 64, (0.2, 1.0))
    b = V.random_resized_crop(np.random.default_rng(7), 64, 64, (0.2, 1.0))
    assert np.array_equal(a, b)
    # no candidate fits a 10:1 image with ratio [3/4, 4/3] at full scale: torchvision's centre-crop fallback
    box = V.random_resized_crop(np.random.default_rng(0), 100, 10, (1.0, 1.0))
    assert np.allclose(box, [100 / 2 - 10 * 4 / 6, 0, 100 / 2 + 10 * 4 / 6, 10])


def test_visible_fraction_matches_brute_force():
    rng = np.random.default_rng(1)
    mask = (rng.random((16, 24)) > 0.7).astype(np.uint8) * 255  # mask at another resolution than the image
    boxes = np.concatenate([rng.uniform(0, 40, (50, 2)), rng.uniform(40, 96, (50, 2))], 1)[:, [0, 1, 2, 3]]
    boxes[:, 1], boxes[:, 3] = boxes[:, 1] * 0.5, boxes[:, 3] * 0.5  # image is 96 x 48
    got = V.visible_fraction(mask, boxes, (96, 48))
    cy, cx = np.mgrid[0:16, 0:24] + 0.5
    for box, g in zip(boxes, got, strict=True):
        bx = box * [24 / 96, 16 / 48, 24 / 96, 16 / 48]
        inside = (cx >= bx[0]) & (cx < bx[2]) & (cy >= bx[1]) & (cy < bx[3])
        assert g == pytest.approx(mask[inside].sum() / mask.sum())


def test_instance_crops_keep_the_object():
    for i in range(20):
        s = render_sample(0, "train", i)
        for k in range(len(s.masks)):
            rng = np.random.default_rng(i * 10 + k)
            boxes = V.instance_crops(rng, s.masks[k], 64, 64, (0.2, 1.0), 0.5)
            assert boxes.shape == (2, 4)
            assert (V.visible_fraction(s.masks[k], boxes, (64, 64)) >= 0.5).all()
    # impossible with random crops (a tiny object must be fully inside crops of 1% area): the box fallback
    mask = np.zeros((64, 64), np.uint8)
    mask[40:50, 5:25] = 255
    boxes = V.instance_crops(np.random.default_rng(0), mask, 64, 64, (0.01, 0.01), 1.0)
    assert (V.visible_fraction(mask, boxes, (64, 64)) == 1.0).all()
    w, h = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    assert V.RATIO[0] - 1e-9 <= w / h <= V.RATIO[1] + 1e-9
    with pytest.raises(ValueError, match="empty"):
        V.instance_crops(np.random.default_rng(0), np.zeros((8, 8), np.uint8), 64, 64, (0.2, 1.0), 0.5)


@pytest.mark.parametrize("flip", [False, True])
def test_warped_masks_sit_on_the_warped_object(flip):
    """Warp a rendered (exact-colour) image and its masks with the same crop: where a warped mask is fully on,
    the warped image shows the object's colour; where it is fully off, it never does in a flat interior."""
    checked = 0
    for i in range(12):
        s = render_sample(0, "train", i)
        image = Image.fromarray(s.image)
        rng = np.random.default_rng(i)
        box = V.random_resized_crop(rng, 64, 64, (0.3, 1.0))
        img = V.crop_resize(image, box, 48, flip).astype(np.int64)
        masks = V.warp_masks(s.masks, box, (64, 64), flip, 48)
        assert masks.shape == (len(s.masks), 48, 48) and masks.dtype == np.uint8
        for k, obj in enumerate(s.meta["objects"]):
            full = masks[k] == 255
            if full.any():
                checked += 1
                assert np.abs(img[full] - np.asarray(obj["rgb"])).max() <= 1
    assert checked > 10
    # flip is exactly a mirror of the unflipped warp
    s = render_sample(0, "train", 3)
    box = np.array([5.5, 3.25, 50.0, 60.5])
    assert np.array_equal(
        V.warp_masks(s.masks, box, (64, 64), True, 32), V.warp_masks(s.masks, box, (64, 64), False, 32)[:, :, ::-1]
    )


def test_warp_masks_at_another_resolution():
    """Masks stored at twice the image resolution warp to (nearly) the same masks as at the image's."""
    s = render_sample(0, "train", 6)
    big = s.masks.repeat(2, axis=1).repeat(2, axis=2)  # [K, 128, 128], same geometry
    box = np.array([8.0, 4.0, 56.0, 60.0])
    a = V.warp_masks(s.masks, box, (64, 64), False, 32).astype(np.int64)
    b = V.warp_masks(big, box, (64, 64), False, 32).astype(np.int64)
    for k in range(len(a)):
        inter = ((a[k] > 127) & (b[k] > 127)).sum()
        union = ((a[k] > 127) | (b[k] > 127)).sum()
        assert union == 0 or inter / union > 0.85
    assert np.abs(a - b).mean() < 8


def _params(n, **fields):
    p = np.zeros((n, V.NUM_COLOUR_PARAMS), dtype=np.float32)
    p[:, V.P_BRIGHT : V.P_SAT + 1] = 1.0
    p[:, V.P_ORDER] = [0, 1, 2, 3]
    for name, value in fields.items():
        p[:, getattr(V, name)] = value
    return p


def test_colour_augment_identity_and_normalisation():
    x = torch.randint(0, 256, (3, 20, 24, 3), dtype=torch.uint8)
    out = V.colour_augment(x, _params(3))
    ref = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(V.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        V.IMAGENET_STD
    ).view(1, 3, 1, 1)
    assert out.shape == (3, 3, 20, 24) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-6)
    # jitter switched on with neutral factors (1, 1, 1, hue 0) changes nothing either
    assert torch.allclose(V.colour_augment(x, _params(3, P_JITTER=1)), ref, atol=1e-5)


def test_colour_augment_ops():
    x = torch.rand(4, 3, 16, 16)
    raw = lambda p: V.colour_augment(x, p, normalize=False)  # noqa: E731
    assert torch.allclose(raw(_params(4, P_JITTER=1, P_BRIGHT=0.5)), x * 0.5, atol=1e-6)
    gray = raw(_params(4, P_GRAY=1))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(gray[:, 0], luma, atol=1e-6)
    sat0 = raw(_params(4, P_JITTER=1, P_SAT=0.0))
    assert torch.allclose(sat0[:, 0], luma, atol=1e-5)
    con0 = raw(_params(4, P_JITTER=1, P_CONTRAST=0.0))
    assert torch.allclose(con0, luma.mean((1, 2), keepdim=True)[:, None].expand_as(x), atol=1e-5)
    sol = raw(_params(4, P_SOLARIZE=1))
    assert torch.allclose(sol, torch.where(x >= 0.5, 1 - x, x))
    # a hue turn keeps luma (YIQ rotation) for colours that stay in gamut, and a full turn is the identity
    mid = 0.25 + 0.5 * x
    hue = V.colour_augment(mid, _params(4, P_JITTER=1, P_HUE=0.1), normalize=False)
    assert not torch.allclose(hue, mid, atol=1e-3)
    assert torch.allclose(
        (hue * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1), 0.25 + 0.5 * luma, atol=1e-4
    )
    assert torch.allclose(V.colour_augment(mid, _params(4, P_JITTER=1, P_HUE=1.0), normalize=False), mid, atol=1e-5)
    blur = raw(_params(4, P_SIGMA=1.5))
    assert blur.std() < x.std() * 0.7 and abs(blur.mean() - x.mean()) < 0.02


def test_colour_augment_per_view_params_are_independent():
    """The batched ops equal applying each view's parameters alone (no mixing across views)."""
    aug = V.ColourAugment(jitter=0.4, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.2)
    rng = np.random.default_rng(0)
    p = np.stack([aug.sample(rng, 32) for _ in range(16)])
    assert (p[:, V.P_JITTER] > 0).any() and (p[:, V.P_SIGMA] > 0).any() and (p[:, V.P_SIGMA] == 0).any()
    x = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    batch = V.colour_augment(x, p)
    one = torch.cat([V.colour_augment(x[i : i + 1], p[i : i + 1]) for i in range(16)])
    assert torch.allclose(batch, one, atol=1e-5)


def test_colour_params_sampling():
    rng = np.random.default_rng(0)
    off = V.ColourAugment(jitter=0.4, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    p = np.stack([off.sample(rng, 64) for _ in range(100)])
    assert (p[:, [V.P_JITTER, V.P_GRAY, V.P_SIGMA, V.P_SOLARIZE]] == 0).all()
    on = V.ColourAugment(jitter=0.4, jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0, solarize_prob=1.0)
    p = np.stack([on.sample(rng, 224) for _ in range(100)])
    assert (p[:, V.P_JITTER] == 1).all() and (p[:, V.P_GRAY] == 1).all() and (p[:, V.P_SOLARIZE] == 1).all()
    assert ((p[:, V.P_BRIGHT : V.P_SAT + 1] >= 0.6) & (p[:, V.P_BRIGHT : V.P_SAT + 1] <= 1.4)).all()
    assert (np.abs(p[:, V.P_HUE]) <= 0.1).all()
    assert ((p[:, V.P_SIGMA] >= 0.1) & (p[:, V.P_SIGMA] <= 2.0)).all()
    assert all(sorted(row) == [0, 1, 2, 3] for row in p[:, V.P_ORDER])


def test_kmeans_masks():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = (200, 20, 20)
    img[:, 30:] = (20, 20, 200)
    m = V.kmeans_masks(img, 2, np.random.default_rng(0))
    assert m.shape == (2, 40, 60) and m.dtype == np.uint8
    assert (m.astype(np.int64).sum(0) == 255).all(), "segments partition the image"
    left = m[:, :, :30].max(axis=(1, 2)) > 0
    assert left.sum() == 1 and (m[left][0][:, :30] == 255).all() and (m[left][0][:, 30:] == 0).all()
    toy = render_sample(0, "train", 4).image
    a = V.kmeans_masks(toy, 4, np.random.default_rng(3))
    b = V.kmeans_masks(toy, 4, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == (4, 64, 64)
    assert (a.astype(np.int64).sum(0) == 255).all()


def test_two_views_maker():
    d = DataConfig(instance_views=True, max_objects=5, mask_size=32, image_size=48)
    maker = V.TwoViews(d, min_mass=1e-3)
    items = [maker(_toy(i), np.random.default_rng(i)) for i in range(6)]
    again = maker(_toy(0), np.random.default_rng(0))
    assert np.array_equal(again["views"], items[0]["views"]) and np.array_equal(again["masks"], items[0]["masks"])
    batch = maker.collate(items)
    assert batch["view1"].shape == (6, 3, 48, 48) and batch["view1"].dtype == torch.float32
    assert batch["masks1"].shape == (6, 5, 32, 32) and batch["masks2"].dtype == torch.uint8
    assert batch["valid"].shape == (6, 5) and batch["valid"].dtype == torch.bool
    for b, it in enumerate(items):
        k = len(_toy(b).masks)
        assert not batch["valid"][b, k:].any() and (batch["masks1"][b, k:] == 0).all()
        assert 0 <= it["obj"] < k and batch["valid"][b, it["obj"]]
    # k-means masks in place of the data's
    km = V.TwoViews(DataConfig(masks="kmeans", kmeans_k=3, max_objects=4), min_mass=0.0)
    it = km(_toy(1), np.random.default_rng(0))
    assert it["masks"].shape == (2, 4, 64, 64) and it["count"] == 3
    assert km.collate([it])["valid"][0].tolist() == [True, True, True, False]


def test_multicrop_and_caption_group_makers():
    d = DataConfig(views="multicrop", global_crops=2, local_crops=3, local_size=24, image_size=40)
    mc = V.MultiCrop(d)
    batch = mc.collate([mc(_toy(i), np.random.default_rng(i)) for i in range(4)])
    assert [tuple(c.shape) for c in batch["crops"]] == [(4, 3, 40, 40)] * 2 + [(4, 3, 24, 24)] * 3
    assert batch["index"].tolist() == [0, 1, 2, 3]
    cg = V.CaptionGroup(DataConfig(views="caption_group", group_size=3, image_size=32))
    items = [cg([_toy(4 * g + j) for j in range(3)], np.random.default_rng(g), g) for g in range(2)]
    batch = cg.collate(items)
    assert batch["images"].shape == (2, 3, 3, 32, 32) and batch["group"].tolist() == [0, 1]
    assert batch["indices"].tolist() == [[0, 1, 2], [4, 5, 6]] and batch["index"].tolist() == [0, 4]
    assert not math.isnan(float(batch["images"].sum()))


def test_block_index_from_the_box_centre():
    """3x3 grid, 1-based row-major: the cell holding the box centre (centre on a border -> the lower/right cell)."""
    assert V.block_index((0, 0, 10, 10), 90) == 1
    assert V.block_index((80, 0, 90, 10), 90) == 3
    assert V.block_index((40, 40, 50, 50), 90) == 5
    assert V.block_index((0, 80, 10, 90), 90) == 7
    assert V.block_index((80, 80, 90, 90), 90) == 9
    assert V.block_index((0, 0, 60, 60), 90) == 5  # centre (30, 30) lies on the border of cells 1/2/4/5
    assert V.block_index((0, 0, 59.9, 59.9), 90) == 1
    assert V.block_index((0, 0, 90, 90), 90, grid=4) == 11  # centre (45, 45) at 4x4: row 2, column 2
    assert V.block_index((-5, -5, 2, 2), 90) == 1 and V.block_index((85, 85, 99, 99), 90) == 9  # clipped


def test_position_prompts():
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 0, 0]], dtype=np.float32)
    valid = np.array([True, True, False])
    words = ["red circle", "blue cross", ""]
    out = V.position_prompt("a red circle and a blue cross", boxes, valid, words, np.random.default_rng(0), size=64)
    assert out.startswith("a red circle and a blue cross . The block ") and out.endswith(" .")
    assert out.count("The block") == 1
    assert out.endswith(" . The block 1 has a red circle .") or out.endswith(" . The block 9 has a blue cross .")
    both = V.position_prompt("c", boxes, valid, words, np.random.default_rng(0), size=64, objects=5)
    assert both in (
        "c . The block 1 has a red circle . The block 9 has a blue cross .",
        "c . The block 9 has a blue cross . The block 1 has a red circle .",
    )
    never = V.position_prompt("c", boxes, valid, words, np.random.default_rng(0), size=64, prob=0.0)
    assert never == "c"
    # the same draws whatever the outcome: the RNG ends in the same state
    r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
    V.position_prompt("c", boxes, valid, words, r1, size=64, prob=0.0)
    V.position_prompt("c", boxes, valid, words, r2, size=64, prob=1.0)
    assert r1.random() == r2.random()
    # no valid object: the caption is unchanged
    assert V.position_prompt("c", boxes, np.zeros(3, bool), words, np.random.default_rng(0), size=64) == "c"


def test_vlp_view_prompts_follow_the_crop():
    """The prompt's block is computed from the box in the view (after crop and flip), not in the source image."""
    d = DataConfig(views="vlp", image_size=64, max_objects=4, hflip_prob=1.0, crop_scale=(1.0, 1.0))
    maker = V.VLPView(d, prompts=True)
    sample = _toy(3)
    item = maker(sample, np.random.default_rng(0))
    k = next(i for i, ok in enumerate(item["box_valid"]) if ok and item["words"][i] in item["caption"].split(" . ")[-1])
    block = V.block_index(item["boxes_view"][k], 64)
    assert f"The block {block} has a {item['words'][k]} ." in item["caption"]
    plain = V.VLPView(d, prompts=False)(sample, np.random.default_rng(0))
    assert item["caption"].startswith(plain["caption"]) and "The block" not in plain["caption"]
    assert np.array_equal(plain["boxes_view"], item["boxes_view"])  # prompts are drawn after every other decision
