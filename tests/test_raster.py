"""rsclip_jax.raster on real rasters: 16-bit band-interleaved GeoTIFF, float multispectral,
Sentinel-2 JPEG2000 band files (folder and STAC item), nodata, windows and footprints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from conftest import REPO
from rsclip_jax.preprocess import load_image
from rsclip_jax.raster import (
    RasterError,
    open_scene,
    parse_bands,
    parse_scale,
    read_image,
    tile_windows,
)

GEO = REPO / "tests" / "fixtures" / "geo"
SOLARIS = GEO / "sample_geotiff.tif"
S2 = GEO / "s2_T33UUU"
RGB = ["B04", "B03", "B02"]


def test_16bit_band_interleaved_geotiff_reads_where_pillow_fails():
    from PIL import Image

    with pytest.raises(ValueError, match="unknown raw mode"):  # the bug a new user hit
        with Image.open(SOLARIS) as im:
            im.load()
    img = load_image(SOLARIS)
    assert img.mode == "RGB" and img.size == (900, 900)
    with rasterio.open(SOLARIS) as ds:
        raw = ds.read(1).astype(np.float64)
    valid = raw != 0  # nodata 0
    lo, hi = np.percentile(raw[valid], (2, 98))
    expect = np.clip(np.rint((raw - lo) * (255.0 / (hi - lo))), 0, 255)
    got = np.asarray(img)[..., 0].astype(np.float64)
    assert np.abs(got - expect)[valid].max() <= 1.0
    assert (got[~valid] == 0).all()


def test_window_reads_equal_slices_of_the_whole_scene():
    # The stretch is computed once per scene, so a tile looks the same in any window.
    with open_scene(SOLARIS) as scene:
        whole, whole_valid = scene.read_rgb(Window(0, 0, scene.width, scene.height))
        part, part_valid = scene.read_rgb(Window(300, 120, 224, 160))
    np.testing.assert_array_equal(part, whole[120:280, 300:524])
    np.testing.assert_array_equal(part_valid, whole_valid[120:280, 300:524])


def test_nodata_pixels_are_invalid_and_zero():
    with open_scene(GEO / "OSBS_029.tif") as scene:
        assert scene.nodata == 255 and scene.stretch.lo is None  # 8-bit: used as is
        rgb, valid = scene.read_rgb(Window(0, 0, 400, 400))
    with rasterio.open(GEO / "OSBS_029.tif") as ds:
        raw = ds.read()
    expect_valid = (raw != 255).all(axis=0)
    np.testing.assert_array_equal(valid, expect_valid)
    np.testing.assert_array_equal(rgb[valid], raw.transpose(1, 2, 0)[valid])
    assert 0 < (~valid).sum() < valid.size


def test_float_multispectral_band_choice():
    with open_scene(GEO / "ms1.tif", bands=[4, 3, 2]) as scene:
        assert [s.index for s in scene.sources] == [4, 3, 2]
        rgb, valid = scene.read_rgb(Window(0, 0, 300, 300))
    with open_scene(GEO / "ms1.tif", bands=[2]) as grey:
        g, _ = grey.read_rgb(Window(0, 0, 300, 300))
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    np.testing.assert_array_equal(g[..., 0][valid], rgb[..., 2][valid])  # band 2 is blue in 4,3,2
    with pytest.raises(RasterError, match=r"ms1.tif: has 4 band\(s\); --bands 5,3,2 asks for band 5"):
        open_scene(GEO / "ms1.tif", bands=[5, 3, 2])


def test_sentinel2_band_folder_composes_rgb_and_resamples_20m_bands():
    with open_scene(S2, RGB) as scene:
        assert (scene.width, scene.height, scene.res) == (1536, 768, (10.0, 10.0))
        assert scene.date == "2017-02-16" and scene.crs.to_epsg() == 32633
        rgb, valid = scene.read_rgb(Window(0, 0, 1536, 768))
    for i, band in enumerate(RGB):
        with open_scene(next(S2.glob(f"*_{band}.jp2"))) as single:
            grey, _ = single.read_rgb(Window(0, 0, 1536, 768))
        np.testing.assert_array_equal(rgb[..., i], grey[..., 0])  # each band keeps its own stretch
    with open_scene(S2, ["B8A", "B03", "B02"]) as mixed:  # B8A is 20 m: resampled onto the 10 m grid
        nir, _ = mixed.read_rgb(Window(0, 0, 1536, 768))
    assert nir.shape == (768, 1536, 3) and nir[..., 0].std() > 10
    # the footprint of the whole scene is in Brandenburg, Germany (tile T33UUU)
    ring, lonlat = open_scene(S2, RGB).footprint(Window(0, 0, 1536, 768))
    lons, lats = [p[0] for p in lonlat], [p[1] for p in lonlat]
    assert 12 < min(lons) < max(lons) < 13.5 and 52 < min(lats) < max(lats) < 53


def test_stac_item_with_local_assets(tmp_path):
    assets = {b: {"href": str((S2 / f"T33UUU_20170216T102101_{b}.jp2").resolve()),
                  "eo:bands": [{"name": b, "common_name": c}]}
              for b, c in zip(RGB, ["red", "green", "blue"])}
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "x",
            "properties": {"datetime": "2017-02-16T10:21:01Z"}, "assets": assets}
    (tmp_path / "item.json").write_text(json.dumps(item))
    with open_scene(tmp_path / "item.json", ["red", "green", "blue"]) as scene, open_scene(S2, RGB) as folder:
        assert scene.date == "2017-02-16"
        w = Window(500, 200, 64, 64)
        np.testing.assert_array_equal(scene.read_rgb(w)[0], folder.read_rgb(w)[0])
    assets["B04"]["href"] = "https://example.com/B04.jp2"
    (tmp_path / "remote.json").write_text(json.dumps(item))
    with pytest.raises(RasterError, match="asset B04 is remote .*download it"):
        open_scene(tmp_path / "remote.json", RGB)


def test_fixed_scale():
    with open_scene(S2, RGB, scale=(0.0, 3000.0)) as scene:
        rgb, _ = scene.read_rgb(Window(0, 0, 100, 100))
    with rasterio.open(next(S2.glob("*_B04.jp2"))) as ds:
        raw = ds.read(1, window=Window(0, 0, 100, 100)).astype(np.float64)
    np.testing.assert_array_equal(rgb[..., 0], np.clip(np.rint(raw * 255 / 3000), 0, 255).astype(np.uint8))


def test_tile_windows_cover_every_pixel_once_or_more():
    wins = tile_windows(500, 300, 224, 112)
    cover = np.zeros((300, 500), int)
    for w in wins:
        cover[w.row_off:w.row_off + 224, w.col_off:w.col_off + 224] += 1
        assert w.col_off + 224 <= 500 and w.row_off + 224 <= 300
    assert cover.min() >= 1
    assert [w.col_off for w in wins[:4]] == [0, 112, 224, 276]


@pytest.mark.parametrize("call, message", [
    (lambda: tile_windows(100, 100, 224, 112), r"--tile 224: the scene is only 100 x 100"),
    (lambda: tile_windows(500, 500, 224, 0), r"--stride 0: must be at least 1"),
    (lambda: parse_bands("4,,2"), r"empty entry"),
    (lambda: parse_bands("4,B03,2"), r"mixes indexes and names"),
    (lambda: parse_bands("0,1,2"), r"start at 1"),
    (lambda: parse_bands("1,2"), r"give 1 band .* or 3 bands"),
    (lambda: parse_scale("3000,0"), r"MAX must be greater"),
    (lambda: open_scene(S2, ["B04", "B03", "B07"]), r"no band file for B07"),
    (lambda: open_scene(S2), r"needs band names"),
    (lambda: open_scene(SOLARIS, RGB), r"names bands, which needs a folder"),
    (lambda: open_scene(GEO / "missing.tif"), r"missing.tif: no such raster file"),
    (lambda: read_image(S2 / "T33UUU_20170216T102101_B04.jp2", max_pixels=1000), r"too large to read whole"),
])
def test_bad_input_names_the_value(call, message):
    with pytest.raises(RasterError, match=message):
        call()


def test_embed_and_classify_take_band_choices(tmp_path, tiny_checkpoint, capsys):
    from rsclip_jax.cli import main

    base = ["--checkpoint", str(tiny_checkpoint)]
    # a folder of Sentinel-2 band files is one scene with named bands, not a list of grey images
    assert main(["classify", *base, str(S2), "--bands", "B04,B03,B02", "--labels", "forest,farmland", "--gamma",
                 "1.5", "--json", str(tmp_path / "c.json")]) == 0
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    assert [r["image"] for r in results] == [str(S2)]
    capsys.readouterr()
    runs = {}
    for name, extra in (("default", []), ("scaled", ["--scale", "0,4000"]), ("nir", ["--bands", "1"])):
        out = tmp_path / f"{name}.npz"
        assert main(["embed", *base, "--images", str(SOLARIS), str(GEO / "ms1.tif"), "--out", str(out), *extra]) == 0
        with np.load(out) as f:
            runs[name] = f["image_embeddings"]
            assert list(f["image_paths"]) == [str(SOLARIS), str(GEO / "ms1.tif")]
    assert not np.allclose(runs["default"], runs["scaled"], atol=1e-4)
    np.testing.assert_allclose(runs["default"][0], runs["nir"][0], atol=1e-5)  # solaris has one band: the same
    assert not np.allclose(runs["default"][1], runs["nir"][1], atol=1e-4)  # ms1: band 1 alone is another image
