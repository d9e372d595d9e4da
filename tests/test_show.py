"""``freeatm show``: a readable PNG grid (size, not blank, mask colours, boxes) and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from freeatm_fast import cli
from freeatm_fast.data.shards import ShardReader
from freeatm_fast.generate import show as show_mod
from freeatm_fast.generate.sampler import GenerateConfig, generate
from freeatm_fast.generate.show import CAPTION_LINES, CELL_MIN_SIDE, LINE_HEIGHT, OVERLAY_ALPHA, PAD, PALETTE, show


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a [dog] on a [sofa]\na [cat] next to a [tree]\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = GenerateConfig(
            prompts=str(prompts), num_images=5, batch_size=5, steps=2, size=32, shard_size=3, out=str(root / "out"),
            device="cpu",
        )  # fmt: skip
        generate(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "out"


def test_grid_png_size_content_and_mask_colours(shard_dir, tmp_path):
    png = tmp_path / "grid.png"
    info = show(shard_dir, png, num=4, cols=2)
    assert info["num"] == 4 and info["keys"] == [f"{i:09d}" for i in range(4)]
    grid = Image.open(png)
    assert grid.format == "PNG" and grid.mode == "RGB"
    cell = CELL_MIN_SIDE  # 32-pixel images are upscaled to 256 so the words and boxes stay readable
    want = (2 * (cell + 2 * PAD), 2 * (cell + 2 * PAD + CAPTION_LINES * LINE_HEIGHT))
    assert grid.size == want == tuple(info["size"])
    arr = np.asarray(grid, dtype=np.float32)
    assert arr.std() > 20  # not blank

    sample = next(iter(ShardReader.from_dir(shard_dir)))
    tile = arr[PAD : PAD + cell, PAD : PAD + cell]  # first cell's image area
    raw = np.asarray(sample.image.resize((cell, cell), Image.BILINEAR), dtype=np.float32)
    masks = np.stack([np.asarray(Image.fromarray(m).resize((cell, cell), Image.BILINEAR)) for m in sample.masks])
    # Away from the box outlines and labels, each pixel is the image blended with the colour of its strongest object.
    winner, strength = masks.argmax(axis=0), masks.max(axis=0).astype(np.float32)[..., None] / 255.0
    colours = np.array(PALETTE[: len(masks)], np.float32)[winner]
    expected = raw * (1 - OVERLAY_ALPHA * strength) + colours * OVERLAY_ALPHA * strength
    close = np.abs(tile - expected).max(axis=-1) <= 2
    assert close.mean() > 0.8
    # The overlay moved the pixels toward the object colours: where object k wins, closer to PALETTE[k].
    for k in range(len(masks)):
        where = (winner == k) & (masks[k] > 100) & close
        assert where.sum() > 20, k  # both objects win somewhere in this seeded sample
        colour = np.array(PALETTE[k], np.float32)
        before = np.linalg.norm(raw[where] - colour, axis=-1).mean()
        after = np.linalg.norm(tile[where] - colour, axis=-1).mean()
        assert after < before - 10, (k, before, after)
    # Box outline and word label in the first object's colour, drawn opaque.
    box_pixels = np.all(np.asarray(grid)[PAD : PAD + cell, PAD : PAD + cell] == PALETTE[0], axis=-1).sum()
    assert box_pixels > 100
    # The caption area under the first cell holds dark text.
    caption = arr[PAD + cell : PAD + cell + CAPTION_LINES * LINE_HEIGHT, PAD : PAD + cell]
    assert (caption.mean(axis=-1) < 100).sum() > 50


def test_cli_show_and_fewer_samples_than_asked(shard_dir, tmp_path, capsys):
    png = tmp_path / "all.png"
    assert cli.main(["show", str(shard_dir), "--out", str(png), "--num", "50"]) == 0
    assert "5 samples" in capsys.readouterr().out
    cols, rows = 4, 2
    assert Image.open(png).size == (cols * (CELL_MIN_SIDE + 2 * PAD), rows * (CELL_MIN_SIDE + 2 * PAD + 48))
    assert [p.name for p in tmp_path.iterdir()] == ["all.png"]  # atomic write: no temporary file left


def test_errors_are_clear(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no shards"):
        show(tmp_path / "empty", tmp_path / "g.png")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        show(tmp_path / "missing", tmp_path / "g.png")
    with pytest.raises(ValueError, match="num"):
        show(tmp_path / "empty", tmp_path / "g.png", num=0)
    assert cli.main(["show", str(tmp_path / "empty"), "--out", str(tmp_path / "g.png")]) == 2
    assert "holds no shards" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_caption_wrapping():
    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = show_mod._font()
    lines = show_mod._wrap(draw, "word " * 200, 200, font, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(draw.textlength(line, font=font) <= 200 for line in lines)
    assert show_mod._wrap(draw, "short caption", 200, font, 3) == ["short caption"]
    long_word = show_mod._wrap(draw, "x" * 500, 100, font, 2)
    assert len(long_word) == 2 and all(draw.textlength(line, font=font) <= 100 for line in long_word)
