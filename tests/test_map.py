"""`rsclip map` on real rasters: georeferencing kept, overlaps blended the same in any window,
nodata respected, outputs (probabilities COG, polygons, preview), accuracy against OpenStreetMap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from conftest import REPO, SAMPLES
from rsclip_jax.apps import mapping
from rsclip_jax.apps.mapping import map_scene
from rsclip_jax.checkpoint import load_checkpoint
from rsclip_jax.cli import main
from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.raster import open_scene

GEO = REPO / "tests" / "fixtures" / "geo"
SOLARIS = GEO / "sample_geotiff.tif"
OSBS = GEO / "OSBS_029.tif"
S2 = GEO / "s2_T33UUU"
LABELS = ["forest", "farmland", "river", "residential"]


def _map(args, tiny_checkpoint):
    return main(["map", "--checkpoint", str(tiny_checkpoint), *map(str, args)])


def test_map_keeps_the_scenes_grid_and_writes_every_output(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "map.tif"
    rc = _map([SOLARIS, "--labels", ",".join(LABELS), "--out", out, "--tile", 224, "--stride", 112,
               "--probs", tmp_path / "probs.tif", "--vector", tmp_path / "regions.gpkg",
               "--preview", tmp_path / "preview.png", "--report", tmp_path / "report.json"], tiny_checkpoint)
    assert rc == 0
    err = capsys.readouterr().err
    assert "sample_geotiff.tif: 900 x 900 px, EPSG:32616" in err and "mapped 64 of 64 tiles" in err
    with rasterio.open(SOLARIS) as src, rasterio.open(out) as dst:
        assert (dst.crs, dst.transform, dst.width, dst.height) == (src.crs, src.transform, src.width, src.height)
        assert dst.nodata == src.nodata == 0
        classes = dst.read(1)
        valid = src.read_masks(1) > 0
        assert set(np.unique(classes[valid])) <= {1, 2, 3, 4} and (classes[~valid] == 0).all()
        assert [dst.tags(1)[f"CLASS_{i}"] for i in range(1, 5)] == LABELS
        assert dst.colormap(1)[1][:3] == (228, 26, 28)
    with rasterio.open(tmp_path / "probs.tif") as probs:
        assert probs.count == 4 and probs.dtypes[0] == "uint8" and probs.nodata == 255
        assert probs.descriptions == tuple(LABELS) and probs.overviews(1)  # a COG: overviews, tiled
        p = probs.read().astype(int)
    ok = p[0] != 255
    assert np.abs(p[:, ok].sum(axis=0) - 100).max() <= 3  # percentages of one pixel sum to 100 (rounding)
    import geopandas as gpd

    regions = gpd.read_file(tmp_path / "regions.gpkg")
    assert regions.crs.to_epsg() == 32616 and set(regions["class"]) <= set(LABELS)
    assert regions["mean_prob"].between(0, 1).all()
    assert abs(regions.area.sum() - valid.sum() * 0.25) < 1.0  # 0.5 m pixels; polygons tile the mapped area
    assert (tmp_path / "preview.png").stat().st_size > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["embedded"] == 64 and sum(report["class_pixels"].values()) == valid.sum()
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary file left


def test_overlapping_tiles_blend_the_same_in_one_window_or_many(tiny_checkpoint, tmp_path, monkeypatch):
    model = load_checkpoint(tiny_checkpoint)
    extractor = Extractor(model, batch_size=16, progress=False)
    classes = extractor.classifier(LABELS, ["a satellite photo of {}."])
    largest = []
    real_add = mapping._Accumulator.add

    def add(self, *a, **k):  # record the rolling buffer's height: memory is bounded by rows, not scene size
        real_add(self, *a, **k)
        largest.append(self.counts.shape[0])

    monkeypatch.setattr(mapping._Accumulator, "add", add)
    outputs = {}
    for rows in (None, 1):
        with open_scene(OSBS) as scene:
            report = map_scene(scene, extractor, classes, LABELS, str(tmp_path / f"m{rows}.tif"), tile=96, stride=40,
                               probs=str(tmp_path / f"p{rows}.tif"), probs_dtype="float32", rows_per_batch=rows,
                               progress=False)
        with rasterio.open(tmp_path / f"m{rows}.tif") as m, rasterio.open(tmp_path / f"p{rows}.tif") as p:
            outputs[rows] = (m.read(1), p.read())
        # 9 x 9 tiles; the buffer never holds more than one strip of 96 rows, however large the scene
        assert report.tiles == 81 and max(largest) == 96
        largest.clear()
    np.testing.assert_array_equal(outputs[None][0], outputs[1][0])
    np.testing.assert_allclose(outputs[None][1], outputs[1][1], atol=1e-6, equal_nan=True)
    # with a stride under the tile, neighbouring pixels blend several tiles: more than one value per tile
    assert len(np.unique(outputs[1][1][0][np.isfinite(outputs[1][1][0])])) > report.embedded


def test_nodata_pixels_stay_nodata(tiny_checkpoint, tmp_path):
    assert _map([OSBS, "--labels", "trees,road", "--out", tmp_path / "m.tif", "--tile", 128, "--stride", 64],
                tiny_checkpoint) == 0
    with rasterio.open(OSBS) as src, rasterio.open(tmp_path / "m.tif") as dst:
        invalid = ~(src.read_masks() > 0).all(axis=0)
        assert dst.nodata == src.nodata == 255
        assert (dst.read(1)[invalid] == 255).all() and invalid.any()


def test_demo_model_maps_sentinel2_land_use_better_than_the_majority_class(demo_model, tmp_path, capsys):
    # The demo's scene patches come from this Sentinel-2 crop: the map is judged on the whole scene,
    # against every OpenStreetMap polygon of the four classes the demo has scene patches of.
    out = tmp_path / "s2_map.tif"
    rc = main(["map", "--checkpoint", str(demo_model), str(S2), "--bands", "B04,B03,B02", "--gamma", "1.5",
               "--labels", "farmland,forest,meadow,a residential area", "--tile", "24", "--stride", "12",
               "--templates", str(SAMPLES / "landuse_templates.txt"), "--out", str(out),
               "--truth", str(GEO / "osm_landuse_T33UUU.gpkg"), "--truth-field", "fclass",
               "--truth-classes", "farm=farmland,forest=forest,meadow=meadow,residential=a residential area",
               "--report", str(tmp_path / "report.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "report.json").read_text())["accuracy"]
    print(printed)  # the figure docs/applications.md quotes
    assert "pixel accuracy" in printed and result["majority_class"] == "farmland"
    assert result["labelled_pixels"] > 250_000
    assert result["accuracy"] > result["majority_accuracy"]
    assert result["balanced_accuracy"] > 0.25  # four classes


def test_gsd_resample_sizes_tiles_in_metres(tiny_checkpoint, tmp_path, capsys):
    # 10 m Sentinel-2 mapped at 2 m per pixel: a 112-px tile covers 224 m, i.e. 22 scene pixels (rounded)
    assert _map([S2, "--bands", "B04,B03,B02", "--labels", "forest,farmland", "--out", tmp_path / "m.tif",
                 "--tile", 112, "--stride", 112, "--gsd-resample", 2, "--report", tmp_path / "r.json"],
                tiny_checkpoint) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["tile_pixels"], report["stride_pixels"]) == (22, 22)
    with rasterio.open(tmp_path / "m.tif") as dst:
        assert (dst.width, dst.height, dst.res) == (1536, 768, (10.0, 10.0))


def test_a_scene_without_crs_is_mapped_with_a_warning(tiny_checkpoint, tmp_path, capsys):
    with rasterio.open(OSBS) as src:
        data = src.read()
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=400, height=400, count=3, dtype="uint8") as dst:
        dst.write(data)
    assert _map([plain, "--labels", "trees,road", "--out", tmp_path / "m.tif", "--tile", 200, "--stride", 200],
                tiny_checkpoint) == 0
    assert "has no CRS: the map is written on pixel coordinates, not georeferenced" in capsys.readouterr().err
    with rasterio.open(tmp_path / "m.tif") as dst:
        assert dst.crs is None and dst.width == 400


def test_labels_file_allows_commas(tiny_checkpoint, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("# classes\nforest, dense\nfarmland\n")
    assert _map([OSBS, "--labels-file", labels, "--out", tmp_path / "m.tif", "--tile", 400, "--stride", 400],
                tiny_checkpoint) == 0
    with rasterio.open(tmp_path / "m.tif") as dst:
        assert dst.tags(1)["CLASS_1"] == "forest, dense"


@pytest.mark.parametrize("args, message", [
    ([OSBS, "--labels", "", "--out", "m.tif"], "class name 1 of 1 is empty"),
    ([OSBS, "--labels", "a", "--out", "m.tif"], "at least two"),
    ([OSBS, "--labels", "a,b", "--out", "m.tif", "--stride", "0"], "--stride 0: must be at least 1"),
    ([OSBS, "--labels", "a,b", "--out", "m.tif", "--tile", "512"], "--tile 512: the scene is only 400 x 400"),
    ([OSBS, "--labels", "a,b", "--out", "m.tif", "--bands", "4,3,2"], "has 3 band(s); --bands 4,3,2 asks for band 4"),
    ([OSBS, "--labels", "a,b", "--out", "m.tif", "--vector", "m.shp"], "--vector m.shp: unknown suffix .shp"),
    ([OSBS, "--labels", "a,b", "--out", "m.tif", "--truth-classes", "farm"], "give VALUE=LABEL pairs"),
    ([GEO / "nope.tif", "--labels", "a,b", "--out", "m.tif"], "nope.tif: no such raster file"),
])
def test_bad_input_is_one_clear_line(args, message, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _map(args, tiny_checkpoint) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m.tif").exists()


def test_window_reads_match_the_tiles_the_map_embeds():
    # the strips map_scene cuts tiles from are the scene's own windows
    with open_scene(OSBS) as scene:
        strip, _ = scene.read_rgb(Window(0, 96, 400, 128))
        tile, _ = scene.read_rgb(Window(200, 96, 128, 128))
    np.testing.assert_array_equal(strip[:, 200:328], tile)


def test_a_disk_cache_never_mixes_tiles_of_two_scenes(tiny_checkpoint, tmp_path):
    # two scenes of one size have the same tile places ("row:col"): they must not share cache entries
    with rasterio.open(OSBS) as src:
        profile, data = src.profile, src.read()
    flipped = tmp_path / "flipped.tif"
    with rasterio.open(flipped, "w", **profile) as dst:
        dst.write(data[:, ::-1, ::-1])
    model = load_checkpoint(tiny_checkpoint)
    extractor = Extractor(model, batch_size=16, progress=False, cache_dir=str(tmp_path / "cache"))
    classes = extractor.classifier(LABELS, ["a satellite photo of {}."])
    maps = []
    for i, path in enumerate((OSBS, flipped)):
        with open_scene(path) as scene:
            map_scene(scene, extractor, classes, LABELS, str(tmp_path / f"m{i}.tif"), tile=200, stride=200,
                      probs=str(tmp_path / f"p{i}.tif"), probs_dtype="float32", progress=False)
        with rasterio.open(tmp_path / f"p{i}.tif") as p:
            probs = p.read()
        # one tile's probabilities per 200-px block (pixels outside nodata all carry them)
        maps.append(np.array([[np.nanmax(probs[:, r:r + 200, c:c + 200], axis=(1, 2)) for c in (0, 200)]
                              for r in (0, 200)]))
    assert not np.allclose(maps[0], maps[1], atol=1e-6)
