"""Image reading and the eval transform, against open_clip's own transform on real tiles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rsclip_jax.preprocess import (
    ImageReadError,
    center_crop,
    expand_image_paths,
    load_and_preprocess,
    load_image,
    normalize_images,
)


def _ours(path, size):
    return np.asarray(normalize_images(load_and_preprocess(path, size)[None]))[0]


@pytest.mark.parametrize("size", [224, 336])
def test_matches_open_clip_eval_transform(rgb_tiles, size):
    import open_clip

    reference = open_clip.image_transform(size, is_train=False)
    for path in rgb_tiles:
        want = reference(Image.open(path)).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(_ours(path, size), want, rtol=0, atol=1e-6, err_msg=str(path))


def test_non_square_and_odd_sizes_match_open_clip(rgb_tiles, tmp_path):
    import open_clip

    reference = open_clip.image_transform(224, is_train=False)
    with Image.open(rgb_tiles[0]) as im:
        # wide, tall, smaller than the crop, and odd sizes exercise rounding in resize and crop
        for i, box in enumerate([(0, 0, 399, 181), (13, 0, 150, 333), (5, 7, 106, 88), (0, 0, 225, 224)]):
            path = tmp_path / f"crop{i}.png"
            im.crop(box).save(path)
            want = reference(Image.open(path)).numpy().transpose(1, 2, 0)
            np.testing.assert_allclose(_ours(path, 224), want, rtol=0, atol=1e-6, err_msg=str(box))


def test_modes_become_rgb(rgb_tiles, tmp_path):
    with Image.open(rgb_tiles[0]) as im:
        rgb = im.convert("RGB")
    cases = {
        "gray.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "gray_alpha.png": rgb.convert("LA"),
        "bilevel.png": rgb.convert("1"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = load_and_preprocess(tmp_path / name, 224)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8, name
        assert out.std() > 10, f"{name} lost its content"
    gray = load_and_preprocess(tmp_path / "gray.png", 224)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_sixteen_bit_is_percentile_stretched(tiles, tmp_path):
    pan = next(p for p in tiles if "16bit" in p.name)
    with Image.open(pan) as im:
        assert im.mode.startswith("I;16")  # a real 16-bit panchromatic GeoTIFF
        raw = np.asarray(im).astype(np.float64)
    img = np.asarray(load_image(pan))
    lo, hi = np.percentile(raw, [2, 98])
    expected = np.round(np.clip((raw - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(img[..., 0], expected)
    # 16-bit PNG, written from a ramp well above 8 bits
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    out = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert out.min() == 0 and out.max() == 255 and out.dtype == np.uint8


def test_float_tiff_with_nan(tmp_path):
    a = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    a[0, 0] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "float.tif")
    out = np.asarray(load_image(tmp_path / "float.tif"))
    assert out.shape == (32, 32, 3) and out.max() == 255


def test_bad_files_name_the_file(rgb_tiles, tmp_path):
    data = rgb_tiles[0].read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ["empty.png", "truncated.png", "text.jpg", "missing.png"]:
        with pytest.raises(ImageReadError, match=name):
            load_image(tmp_path / name)


def test_decompression_bomb_refused(tmp_path):
    Image.new("L", (1, 1)).save(tmp_path / "tiny.png")
    raw = bytearray((tmp_path / "tiny.png").read_bytes())
    # Rewrite the IHDR width/height to 40000 x 40000 and fix its CRC, so only the size is hostile.
    import struct
    import zlib

    raw[16:24] = struct.pack(">II", 40000, 40000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    (tmp_path / "bomb.png").write_bytes(bytes(raw))
    with pytest.raises(ImageReadError, match="bomb.png.*decompression bomb"):
        load_image(tmp_path / "bomb.png")


def test_expand_image_paths(tiles, tmp_path):
    assert expand_image_paths([tiles[0].parent]) == [str(p) for p in tiles]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageReadError, match="no image files"):
        expand_image_paths([tmp_path])
    with pytest.raises(ImageReadError, match="nope"):
        expand_image_paths([tmp_path / "nope"])


def test_center_crop_pads_small_images():
    img = Image.new("RGB", (10, 6), (255, 0, 0))
    out = np.asarray(center_crop(img, 8))
    assert out.shape == (8, 8, 3)
    assert out[0].sum() == 0 and out[1:7, 0:8, 0].min() == 255  # one zero row above, one below
