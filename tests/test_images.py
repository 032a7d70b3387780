"""The one image loader: modes, alpha, 16 bit, and every bad-input case with the file named."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from leukoscope.imaging.images import ImageError, load_rgb


def test_rgba_alpha_dropped_not_composited(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 150, 100
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0  # transparent region with valid RGB underneath (the LMU trap)
    p = tmp_path / "cell.tiff"
    tifffile.imwrite(p, rgba)
    img = load_rgb(p)
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    assert (img == [200, 150, 100]).all()  # not black where alpha = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cell.png")
    assert (load_rgb(tmp_path / "cell.png") == [200, 150, 100]).all()


def test_gray_palette_and_16bit(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.bmp")
    assert (load_rgb(tmp_path / "g.bmp") == 77).all()
    pal = Image.fromarray(np.full((8, 8, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    assert (load_rgb(tmp_path / "p.png")[0, 0] == (10, 200, 30)).all()
    tifffile.imwrite(tmp_path / "w.tif", np.full((8, 8, 3), 65535, np.uint16))
    assert (load_rgb(tmp_path / "w.tif") == 255).all()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.jpg")
    assert load_rgb(tmp_path / "x.jpg").shape == (4, 4, 3)


def test_truncated_jpeg_names_file(tmp_path):
    p = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ImageError) as err:
        load_rgb(p)
    assert str(p) in str(err.value) and ("truncated" in err.value.reason or "corrupt" in err.value.reason)


def test_not_an_image_empty_and_missing(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("this is text")
    with pytest.raises(ImageError, match="not an image"):
        load_rgb(txt)
    (tmp_path / "empty.tiff").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(tmp_path / "empty.tiff")
    with pytest.raises(ImageError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")


def test_decompression_bomb_refused(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("L", (6000, 6000)).save(p)  # 36 MP of zeros: tiny file, huge image
    with pytest.raises(ImageError, match="absurd image size"):
        load_rgb(p, max_pixels=10_000_000)
    t = tmp_path / "bomb.tiff"
    tifffile.imwrite(t, np.zeros((4000, 4000), np.uint8), compression="zlib")
    with pytest.raises(ImageError, match="absurd image size"):
        load_rgb(t, max_pixels=1_000_000)


def test_real_lmu_tiffs_are_rgb_400(lmu_sample):
    img = load_rgb(lmu_sample / "EBO" / "EBO_0011.tiff")  # the file with alpha = 0 regions
    assert img.shape == (400, 400, 3)
    with Image.open(lmu_sample / "EBO" / "EBO_0011.tiff") as im:
        rgba = np.asarray(im)
    transparent = rgba[..., 3] == 0
    assert transparent.mean() > 0.1
    # RGB under alpha = 0 is kept as stored, not blackened
    assert (img[transparent] == rgba[..., :3][transparent]).all()
    assert img[transparent].mean() > 50
