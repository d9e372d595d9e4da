"""The mask recipe of DESIGN §4 on constructed maps whose answer is known."""

from collections import deque

import numpy as np
import pytest
import torch

from freeatm_fast.generate.aggregate import (
    AggregateConfig,
    aggregate,
    box_in_pixels,
    largest_component_boxes,
    token_maps,
)


def _rect(h, w, y0, y1, x0, x1, value=1.0):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = value
    return m


def test_blob_gives_its_box_exactly_with_nearest_upsampling():
    maps = {16: _rect(16, 16, 2, 6, 8, 14)[None, None]}  # [1, 1, 16, 16]
    cfg = AggregateConfig(upsample="nearest", mask_size=64, patch_grid=4)
    r = aggregate(maps, [[[0]]], cfg, image_size=(128, 256))
    # mask pixels: x 32..56, y 8..24 (x4); image: x * 2, y * 4
    assert r.boxes[0, 0].tolist() == [64.0, 32.0, 112.0, 96.0]
    assert r.areas[0, 0].item() == pytest.approx(4 * 6 / 256)
    assert r.scores[0, 0].item() == pytest.approx(1.0)
    assert r.binary[0, 0].sum().item() == 16 * 24
    assert r.labels[0, 8:24, 32:56].eq(1).all() and r.labels.sum().item() == 16 * 24


def test_blob_box_with_default_bicubic_recipe():
    maps = {16: _rect(16, 16, 2, 6, 8, 14)[None, None]}
    r = aggregate(maps, [[[0]]], AggregateConfig(mask_size=64), image_size=(64, 64))
    x0, y0, x1, y1 = r.boxes[0, 0].tolist()
    # The bicubic edge crosses tau=0.4 within ~2 mask pixels of the block's border.
    assert abs(x0 - 32) <= 2 and abs(x1 - 56) <= 2 and abs(y0 - 8) <= 2 and abs(y1 - 24) <= 2
    assert 0.0 <= r.soft.min() and r.soft.max() <= 1.0 + 1e-6
    assert r.soft[0, 0].max().item() == pytest.approx(1.0, abs=1e-5)


def test_two_tokens_split_by_argmax():
    left = _rect(8, 8, 0, 8, 0, 4, 1.0) + _rect(8, 8, 0, 8, 4, 8, 0.2)
    right = _rect(8, 8, 0, 8, 4, 8, 1.0) + _rect(8, 8, 0, 8, 0, 4, 0.3)
    maps = {8: torch.stack([left, right])[None]}  # [1, 2, 8, 8]
    cfg = AggregateConfig(upsample="nearest", mask_size=16)
    r = aggregate(maps, [[[0], [1]]], cfg, image_size=(16, 16))
    assert r.labels[0, :, :8].eq(1).all() and r.labels[0, :, 8:].eq(2).all()
    assert r.boxes[0].tolist() == [[0.0, 0.0, 8.0, 16.0], [8.0, 0.0, 16.0, 16.0]]
    assert not (r.binary[0, 0] & r.binary[0, 1]).any()
    assert r.areas[0].tolist() == [0.5, 0.5]


def test_empty_map_gives_zero_box_area_and_score():
    maps = {8: torch.zeros(1, 2, 8, 8)}
    maps[8][0, 1] = _rect(8, 8, 0, 4, 0, 4)
    r = aggregate(maps, [[[0], [1]]], AggregateConfig(mask_size=16), image_size=(32, 32))
    assert r.boxes[0, 0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert r.areas[0, 0].item() == 0.0 and r.scores[0, 0].item() == 0.0
    assert not r.binary[0, 0].any()
    assert r.areas[0, 1].item() > 0


def test_sub_word_tokens_are_averaged_and_tau_decides():
    blob = _rect(8, 8, 2, 6, 2, 6)
    maps = {8: torch.stack([blob, torch.zeros(8, 8), blob])[None]}  # token 1 never fires
    cfg = AggregateConfig(upsample="nearest", mask_size=8, tau=0.4)
    r = aggregate(maps, [[[0, 1]]], cfg, image_size=(8, 8))
    assert r.soft[0, 0].max().item() == pytest.approx(0.5)
    assert r.scores[0, 0].item() == pytest.approx(0.5)
    assert r.boxes[0, 0].tolist() == [2.0, 2.0, 6.0, 6.0]
    # Above the averaged score, the background wins everywhere.
    r2 = aggregate(maps, [[[0, 1]]], AggregateConfig(upsample="nearest", mask_size=8, tau=0.6), image_size=(8, 8))
    assert not r2.binary.any() and r2.boxes.abs().sum() == 0
    # Columns 0 and 2 (the same blob) average to the full blob.
    r3 = aggregate(maps, [[[0, 2]]], cfg, image_size=(8, 8))
    assert r3.soft[0, 0].max().item() == pytest.approx(1.0)


def test_resolutions_are_max_normalised_then_averaged():
    a = _rect(4, 4, 0, 2, 0, 2, 5.0)  # max 5 -> normalised to 1
    b = _rect(8, 8, 0, 8, 0, 4, 0.25)  # max 0.25 -> normalised to 1
    maps = {4: a[None, None], 8: b[None, None], 2: torch.full((1, 1, 2, 2), 7.0)}
    cfg = AggregateConfig(resolutions=(4, 8), upsample="nearest", mask_size=8)
    tok = token_maps(maps, cfg)[0, 0]
    expected = (_rect(8, 8, 0, 4, 0, 4) + _rect(8, 8, 0, 8, 0, 4)) / 2
    torch.testing.assert_close(tok, expected)
    # minmax normalisation removes a constant offset
    cfg_mm = AggregateConfig(resolutions=(4,), upsample="nearest", mask_size=4, normalize="minmax")
    tok_mm = token_maps({4: a[None, None] + 3.0}, cfg_mm)[0, 0]
    torch.testing.assert_close(tok_mm, _rect(4, 4, 0, 2, 0, 2))


def test_largest_component_is_boxed_not_the_union():
    m = _rect(16, 16, 0, 3, 0, 3) + _rect(16, 16, 8, 14, 6, 15)  # 9 px vs 54 px, apart
    r = aggregate({16: m[None, None]}, [[[0]]], AggregateConfig(upsample="nearest", mask_size=16), image_size=(16, 16))
    assert r.boxes[0, 0].tolist() == [6.0, 8.0, 15.0, 14.0]
    assert r.areas[0, 0].item() == pytest.approx((9 + 54) / 256)  # the area counts the whole binary mask


def _bfs_reference(mask: np.ndarray):
    """Plain BFS: (box, size) of the largest 4-connected component, first in raster order on ties."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    best = (0, [0, 0, 0, 0])
    for y in range(H):
        for x in range(W):
            if not mask[y, x] or seen[y, x]:
                continue
            q, pix = deque([(y, x)]), []
            seen[y, x] = True
            while q:
                cy, cx = q.popleft()
                pix.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
            if len(pix) > best[0]:
                ys, xs = zip(*pix, strict=True)
                best = (len(pix), [min(xs), min(ys), max(xs) + 1, max(ys) + 1])
    return best


def test_connected_components_match_bfs_on_random_masks_and_a_snake():
    rng = np.random.default_rng(0)
    masks = rng.random((12, 20, 17)) < np.linspace(0.2, 0.7, 12)[:, None, None]
    snake = np.zeros((20, 17), dtype=bool)  # one long path: many sweeps without pointer jumping
    snake[::2] = True
    snake[1::4, -1] = True  # rows 0-2 joined at the right end, 2-4 at the left end, ...
    snake[3::4, 0] = True
    masks = np.concatenate([masks, snake[None], np.zeros((1, 20, 17), dtype=bool)])
    boxes, sizes = largest_component_boxes(masks)
    for i, m in enumerate(masks):
        size, box = _bfs_reference(m)
        assert sizes[i] == size, i
        assert boxes[i].tolist() == box, i
    assert sizes[-1] == 0 and boxes[-1].tolist() == [0, 0, 0, 0]


def test_patch_importance_and_padding_of_object_lists():
    quad = _rect(8, 8, 0, 4, 0, 4)
    other = _rect(8, 8, 4, 8, 4, 8, 0.5)
    maps = {8: torch.stack([quad, other])[None].repeat(2, 1, 1, 1)}  # [2, 2, 8, 8]
    spans = [[[0], [1]], [[0]]]  # sample 1 has one object: padded
    cfg = AggregateConfig(upsample="nearest", mask_size=8, patch_grid=2)
    r = aggregate(maps, spans, cfg, image_size=(8, 8))
    assert r.num_objects == (2, 1)
    assert r.valid.tolist() == [[True, True], [True, False]]
    assert r.soft[1, 1].abs().sum() == 0 and not r.binary[1, 1].any() and r.boxes[1, 1].abs().sum() == 0
    # max over objects, then mean per 4x4 cell (both normalise to 1 per token)
    assert r.importance[0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert r.importance[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    s1 = r.sample(1)
    assert s1["soft"].shape == (1, 8, 8) and s1["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0]]
    r_sum = aggregate(maps, spans, AggregateConfig(upsample="nearest", mask_size=8, patch_grid=2, importance="sum"),
                      image_size=(8, 8))  # fmt: skip
    assert r_sum.importance[0].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_non_square_maps_and_images():
    m = _rect(8, 12, 0, 4, 6, 12)  # latent grid 8 x 12 (e.g. 768x512 at 1/64)
    r = aggregate({8: m[None, None]}, [[[0]]], AggregateConfig(upsample="nearest", mask_size=24), image_size=(96, 64))
    assert r.soft.shape == (1, 1, 24, 24)
    assert r.boxes[0, 0].tolist() == [48.0, 0.0, 96.0, 32.0]


def test_no_objects_at_all():
    r = aggregate({8: torch.rand(2, 3, 8, 8)}, [[], []], AggregateConfig(mask_size=8, patch_grid=2), image_size=(8, 8))
    assert r.soft.shape == (2, 0, 8, 8) and r.boxes.shape == (2, 0, 4)
    assert r.labels.eq(0).all() and r.importance.abs().sum() == 0


def test_box_in_pixels_rounds_outward():
    assert box_in_pixels([1.5, 2.0, 7.2, 9.0]) == [1, 2, 8, 9]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"upsample": "area"}, "upsample"),
        ({"tau": 1.5}, "tau"),
        ({"mask_size": 0}, "mask_size"),
        ({"normalize": "sum"}, "normalize"),
        ({"importance": "mean"}, "importance"),
        ({"patch_grid": 0}, "patch_grid"),
        ({"resolutions": (16, -1)}, "resolutions"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AggregateConfig(**kwargs)


def test_bad_inputs_name_the_problem():
    maps = {8: torch.rand(1, 2, 8, 8)}
    with pytest.raises(ValueError, match=r"resolutions \[16\]"):
        aggregate(maps, [[[0]]], AggregateConfig(resolutions=(16,), mask_size=8), image_size=(8, 8))
    with pytest.raises(ValueError, match=r"spans\[0\]\[1\]"):
        aggregate(maps, [[[0], [2]]], AggregateConfig(mask_size=8), image_size=(8, 8))
    with pytest.raises(ValueError, match=r"spans\[0\]\[0\]"):
        aggregate(maps, [[[1, 1]]], AggregateConfig(mask_size=8), image_size=(8, 8))
    with pytest.raises(ValueError, match="one list per map row"):
        aggregate(maps, [[[0]], [[1]]], AggregateConfig(mask_size=8), image_size=(8, 8))
    with pytest.raises(ValueError, match="image_size"):
        aggregate(maps, [[[0]]], AggregateConfig(mask_size=8), image_size=(0, 8))
    with pytest.raises(ValueError, match="B' and K must agree"):
        aggregate({8: maps[8], 4: torch.rand(1, 3, 4, 4)}, [[[0]]], AggregateConfig(mask_size=8), image_size=(8, 8))
    with pytest.raises(ValueError, match="resolution 8"):
        aggregate({8: torch.rand(2, 8, 8)}, [[[0]]], AggregateConfig(mask_size=8), image_size=(8, 8))
