"""`rsclip embed --task-index I --task-count N`, then `--merge`: the file one run writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from rsclip_jax.cli import main

TEXTS = ["a forest", "trees along a road", "pelicans on a beach", "an industrial area", "a river"]


def test_two_tasks_and_merge_equal_one_run(tiny_checkpoint, tiles, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in tiles:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"not a png")  # skipped (--skip-bad), in input order, by task 0 or 1
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    args = ["embed", "--checkpoint", str(tiny_checkpoint), "--images", str(folder), "--texts",
            str(tmp_path / "texts.txt"), "--skip-bad", "--batch-size", "8"]
    assert main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    split = [*args, "--out", str(tmp_path / "two.npz"), "--task-count", "2"]

    assert main([*split, "--merge"]) == 1  # nothing to merge yet: names the tasks
    assert "--merge: task(s) 0, 1 of 2 have not finished" in capsys.readouterr().err
    for i in ("0", "1"):
        assert main([*split, "--task-index", i]) == 0
    assert not (tmp_path / "two.npz").exists()
    assert main([*split, "--merge"]) == 0

    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(one.files) == sorted(two.files)
    for key in ("image_paths", "skipped_images", "texts"):
        assert list(two[key]) == list(one[key]), key
    assert [Path(p).name for p in one["skipped_images"]] == ["broken.png"]
    assert len(one["image_paths"]) == len(tiles)
    np.testing.assert_allclose(two["image_embeddings"], one["image_embeddings"], atol=1e-5)
    np.testing.assert_allclose(two["text_embeddings"], one["text_embeddings"], atol=1e-5)

    # A task's part over other inputs is named, not merged.
    (folder / "zz_extra.png").write_bytes((folder / tiles[0].name).read_bytes())
    assert main([*split, "--merge"]) == 1
    assert "--merge: task 0 (" in capsys.readouterr().err
