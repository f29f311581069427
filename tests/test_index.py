"""rsclip index build|add|info and rsclip search, on the bundled real images and real GeoTIFFs.

The exact index must equal brute force; a file of the index, given as the query image, comes
first; `index add` then `search` finds the added file; another model is refused by name; outputs
(GeoJSON, CSV, contact sheet) hold what they claim; scene tiles carry lon/lat footprints.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from PIL import Image

from rsclip_jax.apps import index_store
from rsclip_jax.apps.index import Options, build_index
from rsclip_jax.apps.index_vectors import exact_search, merge_top_k, recall_at_k
from rsclip_jax.apps.search import Searcher, hits_to_csv, hits_to_geojson
from rsclip_jax.cli import main
from rsclip_jax.preprocess import ImageReadError, load_image

REPO = Path(__file__).resolve().parent.parent
SCENES = REPO / "data" / "samples" / "scenes"  # 80 real Sentinel-2 crops in 4 class folders
GEO = REPO / "tests" / "fixtures" / "geo"


def all_embeddings(index_dir: Path) -> np.ndarray:
    m = index_store.read_manifest(index_dir)
    return np.concatenate([np.load(index_dir / s["name"] / "embeddings.npy") for s in m["shards"]])


def brute_force(emb: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = emb @ q
    order = np.argsort(-s, kind="stable")[:k]
    return s[order], order


@pytest.fixture(scope="module")
def scenes_index(tmp_path_factory, tiny_checkpoint) -> Path:
    """Three exact shards (shard size 30) over the 80 real scene crops."""
    out = tmp_path_factory.mktemp("idx") / "scenes.index"
    report = build_index(out, [SCENES], str(tiny_checkpoint), kind="exact", shard_size=30, progress=False)
    assert report.added == 80 and [s["count"] for s in report.shards] == [30, 30, 20]
    return out


@pytest.fixture(scope="module")
def searcher(scenes_index) -> Searcher:
    return Searcher(str(scenes_index))


def test_layout_manifest_and_geoparquet(scenes_index):
    m = index_store.read_manifest(scenes_index)
    assert m["count"] == 80 and m["embed_dim"] == 64 and m["model"] == "tiny-ViT" and len(m["fingerprint"]) == 64
    assert [s["first_id"] for s in m["shards"]] == [0, 30, 60] and m["root"] == str(SCENES)
    table = pq.read_table(scenes_index / m["shards"][1]["name"] / "metadata.parquet")
    assert table.column("id").to_pylist() == list(range(30, 60))
    assert json.loads(table.schema.metadata[b"geo"])["primary_column"] == "geometry"
    paths = [p for s in m["shards"] for p in pq.read_table(scenes_index / s["name"] / "metadata.parquet")
             .column("path").to_pylist()]
    assert paths == sorted(str(p) for p in SCENES.rglob("*.png"))  # recursive walk, sorted, each once
    assert np.allclose(np.linalg.norm(all_embeddings(scenes_index), axis=1), 1, atol=1e-5)


def test_exact_index_equals_brute_force(scenes_index, searcher):
    emb = all_embeddings(scenes_index)
    rng = np.random.default_rng(0)
    queries = [searcher.embed_texts(["a satellite image of farmland"])[0], emb[5] + emb[70], rng.standard_normal(64)]
    for q in queries:
        hits = searcher.search_vector(q, 17)
        s, ids = brute_force(emb, q.astype(np.float32), 17)
        assert [h.id for h in hits] == ids.tolist()
        assert np.allclose([h.score for h in hits], s, atol=1e-5)
        assert [h.rank for h in hits] == list(range(1, 18))
    # a text query through search() is the same as its vector
    q = searcher.embed_texts(["forest"])[0]
    assert [h.id for h in searcher.search(text="forest", k=80)] == brute_force(emb, q, 80)[1].tolist()


def test_negatives_rank_by_combined_score(scenes_index, searcher):
    emb = all_embeddings(scenes_index)
    q = searcher.embed_texts(["meadow"])[0]
    n = searcher.embed_texts(["houses", "roads"])
    hits = searcher.search(text="meadow", negative_texts=["houses", "roads"], k=10)
    combined = emb @ q - (emb @ n.T).mean(axis=1)
    order = np.argsort(-combined, kind="stable")[:10]
    assert [h.id for h in hits] == order.tolist()
    assert np.allclose([h.score for h in hits], combined[order], atol=1e-5)


def test_image_query_returns_that_file_first(searcher):
    files = sorted(SCENES.rglob("*.png"))
    for path in files[::17]:
        hits = searcher.search(image=str(path), k=3)
        assert hits[0].path == str(path) and hits[0].score == pytest.approx(1.0, abs=1e-4)
    # a PIL image and a list of texts work too; similar_to gives the item itself first
    assert searcher.search(image=load_image(files[3]), k=1)[0].path == str(files[3])
    assert searcher.search(similar_to=42, k=1)[0].id == 42
    assert len(searcher.search(text=["a forest", "trees"], k=5)) == 5


def test_search_errors(searcher, scenes_index, tmp_path, capsys):
    with pytest.raises(ValueError, match="--k 0"):
        searcher.search(text="x", k=0)
    with pytest.raises(ValueError, match="give a query"):
        searcher.search(k=3)
    with pytest.raises(ValueError, match="no item 80"):
        searcher.search(similar_to=80)
    assert main(["search", str(scenes_index)]) == 1
    assert "give --text" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "--text", "x"]) == 1
    assert "not a search index (no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", str(scenes_index), "--text", "x", "--k", "0"])
    assert "--k: must be a positive integer" in capsys.readouterr().err
    assert main(["search", str(scenes_index), "--text", "x", "--out", str(tmp_path / "h.txt")]) == 1
    assert "give a .geojson or .csv" in capsys.readouterr().err


def test_fingerprint_mismatch_names_both_models(scenes_index, tmp_path, capsys):
    from rsclip_jax.checkpoint import save_checkpoint
    from rsclip_jax.models import create_model

    other = tmp_path / "other.safetensors"
    save_checkpoint(create_model("tiny-ViT", seed=2), other)
    built_with = index_store.read_manifest(scenes_index)["checkpoint"]
    with pytest.raises(ValueError, match="not comparable") as e:
        Searcher(str(scenes_index), checkpoint=str(other)).search(text="forest")
    assert built_with in str(e.value) and str(other) in str(e.value)
    assert main(["search", str(scenes_index), "--text", "forest", "--checkpoint", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rsclip search: error: ") and built_with in err and str(other) in err
    assert main(["index", "add", str(scenes_index), str(REPO / "data/samples/tiles"), "--checkpoint", str(other)]) == 1
    assert "not comparable" in capsys.readouterr().err
    other_index = tmp_path / "other.index"
    build_index(other_index, [SCENES / "forest"], str(other), progress=False)
    assert main(["index", "merge", "--out", str(tmp_path / "m"), str(scenes_index), str(other_index)]) == 1
    err = capsys.readouterr().err
    assert "different models cannot be merged" in err and built_with in err and str(other) in err


def test_add_then_search_finds_the_added_file(tmp_path, tiny_checkpoint, capsys):
    index = tmp_path / "grow.index"
    ckpt = str(tiny_checkpoint)
    assert main(["index", "build", "--checkpoint", ckpt, "--out", str(index), str(SCENES / "forest")]) == 0
    before = index_store.read_manifest(index)
    ids_before = {h.path: h.id for h in Searcher(str(index)).search(text="x", k=100)}
    added = sorted((SCENES / "meadow").glob("*.png"))[:4]
    assert main(["index", "add", str(index), *map(str, added)]) == 0
    assert "added 4 items" in capsys.readouterr().err
    s = Searcher(str(index))
    assert len(s) == before["count"] + 4
    for path in added:
        assert s.search(image=str(path), k=1)[0].path == str(path)
    assert {h.path: h.id for h in s.search(text="x", k=100) if h.path in ids_before} == ids_before  # stable ids
    # again: nothing new, every file counted as already indexed, no new shard
    assert main(["index", "add", str(index), str(SCENES / "forest"), *map(str, added)]) == 0
    assert f"skipped {before['count'] + 4} files already in the index" in capsys.readouterr().err
    assert len(index_store.read_manifest(index)["shards"]) == 2
    # build refuses an existing index
    assert main(["index", "build", "--checkpoint", str(tiny_checkpoint), "--out", str(index), str(SCENES)]) == 1
    assert "already a search index" in capsys.readouterr().err


def test_unreadable_images_error_or_are_skipped_and_counted(tmp_path, tiny_checkpoint):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((SCENES / "farmland").glob("*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="broken.png.*--skip-bad"):
        build_index(tmp_path / "a.index", [folder], str(tiny_checkpoint), progress=False)
    assert not (tmp_path / "a.index" / "manifest.json").exists()
    report = build_index(tmp_path / "b.index", [folder, folder / "broken.png"], str(tiny_checkpoint), skip_bad=True,
                         progress=False)
    assert report.added == 3 and len(report.skipped_bad) == 1 and "broken.png" in report.skipped_bad[0]
    assert report.named_twice == 1 and "named more than once" in "\n".join(report.lines())


def _write_geotiff(path: Path, nodata_left_half: bool) -> None:
    """A 512x512 uint16 3-band GeoTIFF in UTM 32N from a real image (the left half nodata if asked)."""
    import rasterio
    from rasterio.transform import from_origin

    rgb = np.asarray(load_image(REPO / "data/samples/tiles/deepforest_pelicans_drone.jpg").resize((512, 512)))
    data = rgb.transpose(2, 0, 1).astype(np.uint16) * 40 + 1
    if nodata_left_half:
        data[:, :, :256] = 0
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=3, dtype="uint16", nodata=0,
                       crs="EPSG:32632", transform=from_origin(500_000, 5_000_000, 2.0, 2.0)) as ds:
        ds.write(data)


def test_scene_tiles_have_lonlat_footprints_and_nodata_is_skipped(tmp_path, tiny_checkpoint, capsys):
    import rasterio
    from rasterio.warp import transform as warp

    scene = tmp_path / "utm_scene_20210704.tif"
    _write_geotiff(scene, nodata_left_half=True)
    index = tmp_path / "geo.index"
    report = build_index(index, [scene, GEO / "sample_geotiff.tif"], str(tiny_checkpoint),
                         options=Options(tile=128), progress=False)
    assert report.skipped_nodata == 8  # 16 tiles of 128 px, the left 8 all nodata
    s = Searcher(str(index))
    assert len(s) == 8 + 8 * 8  # the 900 px scene: tiles at 0,128,..,768 and 772 -> 8 x 8, all valid
    hits = s.search(text="trees", k=len(s))
    for path in (scene, GEO / "sample_geotiff.tif"):
        with rasterio.open(path) as ds:
            cx, cy = ds.xy(ds.height // 2, ds.width // 2)
            lon, lat = warp(ds.crs, "EPSG:4326", [cx], [cy])
            crs = ds.crs.to_string()
        centre = shapely.Point(lon[0], lat[0])
        mine = [h for h in hits if h.path == str(path)]
        assert mine and all(h.crs == crs and h.window is not None for h in mine)
        covering = [h for h in mine if shapely.Polygon(h.footprint_lonlat).contains(centre)]
        assert covering, f"no tile footprint of {path} contains its centre"
        for h in covering:  # ... and those tiles' windows contain the centre pixel
            c, r, w, hgt = h.window
            with rasterio.open(path) as ds:
                assert c <= ds.width // 2 < c + w + 1 and r <= ds.height // 2 < r + hgt + 1
        west, south, east, north = s.extent_lonlat()
        assert west < lon[0] < east and south < lat[0] < north
    tile_hit = next(h for h in hits if h.path == str(scene))
    assert tile_hit.date == "2021-07-04"  # from the file name
    assert s.tile(tile_hit.id).size == (128, 128)
    # GeoParquet opens in geopandas, lon/lat geometry
    import geopandas

    m = index_store.read_manifest(index)
    gdf = geopandas.read_parquet(index / m["shards"][0]["name"] / "metadata.parquet")
    assert gdf.crs.to_string() == "OGC:CRS84" and gdf.geometry.notna().all()  # lon/lat

    # GeoJSON / CSV files through the CLI
    assert main(["search", str(index), "--text", "trees", "--k", "5", "--out", str(tmp_path / "h.geojson")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 5 and printed[0].split()[0] == "1"
    fc = json.loads((tmp_path / "h.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 5
    first = fc["features"][0]
    assert first["geometry"]["type"] == "Polygon" and first["properties"]["rank"] == 1
    assert first["geometry"]["coordinates"][0] == hits_for(s, "trees", 5)[0].footprint_lonlat
    assert main(["search", str(index), "--text", "trees", "--k", "5", "--out", str(tmp_path / "h.csv"),
                 "--contact-sheet", str(tmp_path / "sheet.jpg")]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "h.csv").read_text())))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    ring = first["geometry"]["coordinates"][0]
    assert shapely.from_wkt(rows[0]["footprint_lonlat_wkt"]).equals(shapely.Polygon(ring))
    with Image.open(tmp_path / "sheet.jpg") as sheet:
        assert sheet.format == "JPEG" and sheet.width > 3 * 192


def hits_for(s: Searcher, text: str, k: int):
    return s.search(text=text, k=k)


def test_outputs_without_footprints(searcher):
    hits = searcher.search(text="river", k=3)
    fc = hits_to_geojson(hits)
    assert [f["geometry"] for f in fc["features"]] == [None] * 3
    assert fc["features"][0]["properties"]["path"] == hits[0].path
    rows = list(csv.reader(io.StringIO(hits_to_csv(hits))))
    assert rows[0][:4] == ["rank", "score", "id", "path"] and len(rows) == 4 and rows[1][3] == hits[0].path
    assert hits[0].to_dict()["window"] is None
    assert searcher.extent_lonlat() is None
    assert searcher.tile(hits[0].id).tobytes() == load_image(hits[0].path).tobytes()


def test_approximate_index_reports_recall_and_finds_files(tmp_path, tiny_checkpoint):
    report = build_index(tmp_path / "approx.index", [SCENES], str(tiny_checkpoint), kind="approx", progress=False)
    (shard,) = report.shards
    assert shard["kind"] == "approx" and 0.0 <= shard["recall_at_10"] <= 1.0 and shard["nprobe"] <= shard["nlist"]
    assert "recall@10" in "\n".join(report.lines())
    s = Searcher(str(tmp_path / "approx.index"))
    path = sorted(SCENES.rglob("*.png"))[11]
    assert s.search(image=str(path), k=1)[0].path == str(path)


def test_interrupted_build_leaves_no_index(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    from rsclip_jax.apps import index as index_mod

    calls = []
    real = index_mod.write_shard

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(index_mod, "write_shard", crash_on_second)
    out = tmp_path / "crash.index"
    with pytest.raises(KeyboardInterrupt):
        build_index(out, [SCENES], str(tiny_checkpoint), shard_size=30, progress=False)
    assert not (out / "manifest.json").exists() and len(list(out.glob("shard-*"))) == 1
    with pytest.raises(FileNotFoundError, match="not a search index"):
        Searcher(str(out))
    monkeypatch.undo()
    build_index(out, [SCENES / "forest"], str(tiny_checkpoint), progress=False)  # the folder can be reused
    Searcher(str(out))
    assert "not in the manifest" in capsys.readouterr().err


def test_vector_helpers():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((200_000 // 1000, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    s, i = exact_search(emb, q, 7)
    bs = np.sort(q @ emb.T, axis=1)[:, ::-1][:, :7]
    assert np.allclose(s, bs, atol=1e-5) and recall_at_k(i, i) == 1.0
    s2, i2 = merge_top_k([s[:, :3], s[:, 3:]], [i[:, :3], i[:, 3:]], 4)
    assert (i2 == i[:, :4]).all()


def test_merge_indexes_built_separately(scenes_index, tmp_path, tiny_checkpoint, capsys):
    """Two jobs index their share of an archive; `index merge` makes one index that searches like both."""
    part = tmp_path / "part.index"
    build_index(part, [REPO / "data/samples/tiles"], str(tiny_checkpoint), progress=False)
    merged = tmp_path / "merged.index"
    assert main(["index", "merge", "--out", str(merged), str(scenes_index), str(part)]) == 0
    s, a, b = Searcher(str(merged)), Searcher(str(scenes_index)), Searcher(str(part))
    assert len(s) == len(a) + len(b) and s.root == str(REPO / "data/samples")
    q = a.embed_texts(["buildings"])[0]
    expected = sorted([(h.score, h.path, h.window) for h in a.search_vector(q, 10) + b.search_vector(q, 10)],
                      key=lambda t: -t[0])[:10]
    got = s.search_vector(q, 10)
    assert [(h.path, h.window) for h in got] == [(p, w) for _, p, w in expected]
    assert s.search(similar_to=len(a) + 2, k=1)[0].path == b.search(similar_to=2, k=1)[0].path  # ids shifted
    assert main(["index", "info", str(merged)]) == 0
    assert f"{len(s)} items" in capsys.readouterr().out
    assert main(["index", "merge", "--out", str(tmp_path / "m2"), str(merged)]) == 1


def test_band_folder_scene_then_add_with_other_tiling(tmp_path, tiny_checkpoint, capsys):
    """A Sentinel-2 band folder is one scene (--bands names); `index add` with another --tile tiles
    without overlap (the stride follows the new tile), and each shard reads its tiles back its own way."""
    index = tmp_path / "s2.index"
    ckpt = str(tiny_checkpoint)
    assert main(["index", "build", "--checkpoint", ckpt, "--out", str(index), str(GEO / "s2_T33UUU"),
                 "--bands", "B04,B03,B02", "--tile", "256"]) == 0
    assert "added 18 items from 1 files/scenes" in capsys.readouterr().err  # 1536 x 768 in 256 px tiles
    assert main(["index", "add", str(index), str(GEO / "ms1.tif"), "--bands", "1,2,3", "--tile", "128"]) == 0
    assert "added 9 items" in capsys.readouterr().err  # 300 px: tiles at 0, 128, 172
    s = Searcher(str(index))
    hits = s.search(text="a river", k=len(s))
    s2 = next(h for h in hits if h.path == str(GEO / "s2_T33UUU"))
    ms1 = next(h for h in hits if h.path == str(GEO / "ms1.tif"))
    assert s2.date == "2017-02-16" and s2.crs == "EPSG:32633" and s.tile(s2.id).size == (256, 256)
    assert ms1.crs == "EPSG:32631" and s.tile(ms1.id).size == (128, 128)
    # a named band for a single file is an error naming the file
    assert main(["index", "add", str(index), str(GEO / "OSBS_029.tif"), "--bands", "B04,B03,B02"]) == 1
    assert "OSBS_029.tif" in capsys.readouterr().err
