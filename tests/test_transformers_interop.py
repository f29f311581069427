"""Hugging Face transformers CLIP folders, in and out, checked against transformers itself.

Folders written by `transformers.CLIPModel.save_pretrained` (random weights, tiny sizes, one per
architecture family) embed here exactly as `get_image_features`/`get_text_features` embed them;
folders written by `rsclip convert --to hf` load in `CLIPModel`/`CLIPProcessor` without missing or
unexpected keys and round-trip back to OpenCLIP state_dicts that `open_clip` loads strictly.
Everything is offline: transformers reads only the folders written here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import REPO, TILES
from openclip_reference import build, randomize_, state_dict_numpy
from PIL import Image

from rsclip_jax.checkpoint import (
    CheckpointMismatchError,
    TransformersFormatError,
    load_checkpoint,
    load_checkpoint_with_info,
    load_state_dict_into,
    save_checkpoint,
)
from rsclip_jax.checkpoint.transformers_tokenizer import openai_clip_tokenizer
from rsclip_jax.cli import main
from rsclip_jax.models import create_model, get_model_config
from rsclip_jax.models.config import with_sigmoid_head
from rsclip_jax.preprocess import OPENAI_STD, load_and_preprocess, normalize_images
from rsclip_jax.tokenizer import EOT_TOKEN_ID, tokenize

# The square RGB sample tiles (400 and 500 px): shortest-side resize + centre crop is then one
# resize, so transformers' processor and ours see the same geometry.
SQUARE_TILES = sorted(str(p) for p in TILES.iterdir() if p.suffix in (".png", ".jpg"))
TEXTS = [
    "Many planes are parked next to a long runway .",
    "naïve 東京 🚀 café",
    "Tom &amp; Jerry &lt;3 the river",
    "tree " * 120,  # > 77 tokens: truncated, the end token kept
    "A residential area with houses, roads and green trees.",
    "ROUNDABOUT   with\tthree exits",
]
# One 8-bit level after normalisation, at the smallest OpenAI std.
ONE_LEVEL = 1 / 255 / min(OPENAI_STD)


def _hf_config(*, text: dict, vision: dict, projection: int, act: str, eos: int, bos: int = 49406,
               pad: int = 1) -> transformers.CLIPConfig:
    text = dict(vocab_size=49408, max_position_embeddings=77, hidden_act=act, eos_token_id=eos, bos_token_id=bos,
                pad_token_id=pad, projection_dim=projection, **text)
    vision = dict(hidden_act=act, projection_dim=projection, num_channels=3, **vision)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


# Tiny stand-ins of the released families. ViT-B/32's hub config is an old-style one (bos 0, eos 2,
# pad 1: pool at the largest id); ViT-B/16's here is new-style (eos 49407, the vocabulary's largest).
FAMILIES = {
    "ViT-B-32-like-quickgelu": _hf_config(
        text={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
        vision={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 64, "patch_size": 32},
        projection=64, act="quick_gelu", eos=2, bos=0, pad=1),
    "ViT-B-16-like-gelu": _hf_config(
        text={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
        vision={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 64, "patch_size": 16},
        projection=64, act="gelu", eos=49407),
    # head widths 16 and 32, MLPs 2.5x and 2.083x, projection 40, a 3x3 patch grid
    "custom-size": _hf_config(
        text={"hidden_size": 48, "intermediate_size": 120, "num_hidden_layers": 2, "num_attention_heads": 3},
        vision={"hidden_size": 96, "intermediate_size": 200, "num_hidden_layers": 3, "num_attention_heads": 3,
                "image_size": 48, "patch_size": 16},
        projection=40, act="gelu", eos=49407, pad=49407),
}


def _hf_folder(folder: Path, config: transformers.CLIPConfig, seed: int = 0, tokenizer: bool = True):
    """A random-weight CLIPModel (every weight non-trivial) saved by transformers, with OpenAI's tokenizer."""
    torch.manual_seed(seed)
    model = randomize_(transformers.CLIPModel(config), seed)
    model.save_pretrained(str(folder))
    if tokenizer:
        openai_clip_tokenizer(config.text_config.max_position_embeddings).save_pretrained(str(folder))
    return model


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object (pooler_output), transformers 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_embed(model, pixel_values=None, input_ids=None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """transformers' own L2-normalised features, float32."""
    model.eval()
    image = text = None
    with torch.no_grad():
        if pixel_values is not None:
            image = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixel_values)),
                                                  dim=-1).numpy()
        if input_ids is not None:
            text = torch.nn.functional.normalize(_features(model.get_text_features(input_ids=input_ids)),
                                                 dim=-1).numpy()
    return image, text


def _our_pixels(size: int, paths=SQUARE_TILES) -> np.ndarray:
    """NHWC float32, normalised: what `rsclip embed` feeds the image tower."""
    return np.asarray(normalize_images(np.stack([load_and_preprocess(p, size) for p in paths])))


def _nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels).transpose(0, 3, 1, 2))


def _hf_ids(folder: Path, texts) -> torch.Tensor:
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tok(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]


def _embed(checkpoint: Path, out: Path, texts=TEXTS, images=SQUARE_TILES, extra=()) -> dict[str, np.ndarray]:
    (out.parent / f"{out.stem}_texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    args = ["embed", "--checkpoint", str(checkpoint), "--out", str(out), *extra]
    if images:
        args += ["--images", *images]
    if texts:
        args += ["--texts", str(out.parent / f"{out.stem}_texts.txt")]
    assert main(args) == 0
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


# 1. save_pretrained folders of each family: `rsclip embed` equals transformers' features


@pytest.mark.parametrize("family", list(FAMILIES))
def test_embed_equals_transformers_features(family, tmp_path, capsys):
    config = FAMILIES[family]
    folder = tmp_path / "hf"
    hf_model = _hf_folder(folder, config, seed=len(family))
    got = _embed(folder, tmp_path / "out.npz")
    err = capsys.readouterr().err
    assert "warning" not in err and "folder's tokenizer" in err, err

    # our reading of the folder: its activation and pooling, not a guess
    model, info = load_checkpoint_with_info(folder)
    assert info["format"] == "transformers"
    assert model.config.quick_gelu == (config.text_config.hidden_act == "quick_gelu")
    assert model.config.text.pool_type == "argmax"  # eos 2 (old style) and eos 49407 both pool at the largest id
    assert model.config.vision.image_size == config.vision_config.image_size
    assert model.config.embed_dim == config.projection_dim

    assert [Path(p).name for p in got["image_paths"]] == [Path(p).name for p in SQUARE_TILES]
    assert list(got["texts"]) == [t.strip() for t in TEXTS]  # the text file's lines, stripped
    assert got["image_embeddings"].dtype == np.float32 and got["text_embeddings"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got["image_embeddings"], axis=-1), 1, atol=1e-5)

    size = config.vision_config.image_size
    ids = _hf_ids(folder, got["texts"])
    image, text = _hf_embed(hf_model, _nchw(_our_pixels(size)), ids)
    np.testing.assert_allclose(got["image_embeddings"], image, atol=1e-5)
    np.testing.assert_allclose(got["text_embeddings"], text, atol=1e-5)

    # the texts tell tokenizers apart: transformers 5 keeps "&amp;" (open_clip unescapes it), so the
    # folder's own tokenizer, not open_clip's, must have made these ids
    amp = next(i for i, t in enumerate(TEXTS) if "&amp;" in t)
    theirs = ids[amp].numpy()
    ours = tokenize([TEXTS[amp]])[0]
    end = int(np.argmax(theirs == EOT_TOKEN_ID)) + 1
    assert not np.array_equal(theirs[:end], ours[:end])
    long_row = ids[next(i for i, t in enumerate(TEXTS) if t.startswith("tree tree"))].numpy()
    assert long_row[-1] == EOT_TOKEN_ID and EOT_TOKEN_ID not in long_row[:-1]  # truncated, end token kept


# 2a. OpenCLIP file -> transformers folder -> OpenCLIP file, through open_clip and transformers


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A fully random tiny-ViT-quickgelu (open_clip's module, every weight non-trivial) saved as an
    rsclip .pt, and `rsclip convert x.pt HF --to hf`."""
    root = tmp_path_factory.mktemp("converted")
    cfg = get_model_config("tiny-ViT-quickgelu")
    reference = build(cfg, seed=5)
    ours = load_state_dict_into(create_model(cfg, abstract=True), state_dict_numpy(reference))
    save_checkpoint(ours, root / "x.pt")
    assert main(["convert", str(root / "x.pt"), str(root / "hf"), "--to", "hf"]) == 0
    return root, reference


def test_openclip_file_round_trips_through_a_transformers_folder(converted, tmp_path):
    root, reference = converted
    hf = root / "hf"
    assert {"config.json", "model.safetensors", "README.md", "vocab.json", "merges.txt", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"} <= {
        p.name for p in hf.iterdir()}
    hf_model, loading = transformers.CLIPModel.from_pretrained(str(hf), output_loading_info=True,
                                                               local_files_only=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"], loading
    assert hf_model.config.text_config.hidden_act == "quick_gelu" == hf_model.config.vision_config.hidden_act
    # transformers' outputs on the folder equal open_clip's on the source weights
    pixels = _our_pixels(64)
    tokens = torch.from_numpy(tokenize(TEXTS[:1] + TEXTS[4:]).astype(np.int64))
    with torch.no_grad():
        want_image = reference.encode_image(_nchw(pixels), normalize=True).numpy()
        want_text = reference.encode_text(tokens, normalize=True).numpy()
    image, text = _hf_embed(hf_model, _nchw(pixels), tokens)
    np.testing.assert_allclose(image, want_image, atol=1e-5)
    np.testing.assert_allclose(text, want_text, atol=1e-5)
    # the model card names the source file's sha256
    assert hashlib.sha256((root / "x.pt").read_bytes()).hexdigest() in (hf / "README.md").read_text()

    # ... and back: the folder converts to an OpenCLIP file open_clip loads strictly, unchanged
    assert main(["convert", str(hf), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", map_location="cpu", weights_only=True)
    torch_model = build(get_model_config("tiny-ViT-quickgelu"), seed=99)  # other random weights, then loaded
    torch_model.load_state_dict(back, strict=True)
    original = reference.state_dict()
    assert set(back) == set(original)
    for key, value in back.items():
        np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)
    with torch.no_grad():
        np.testing.assert_allclose(torch_model.encode_image(_nchw(pixels), normalize=True).numpy(), want_image,
                                   atol=1e-6)
        np.testing.assert_allclose(torch_model.encode_text(tokens, normalize=True).numpy(), want_text, atol=1e-6)
    # the record survives the trip: back.pt loads here as the same architecture, without --model
    assert load_checkpoint(tmp_path / "back.pt").config == get_model_config("tiny-ViT-quickgelu")


def test_converted_folders_processor_matches_our_preprocessing(converted, tmp_path):
    root, _ = converted
    hf = root / "hf"
    processor = transformers.CLIPProcessor.from_pretrained(str(hf), local_files_only=True)
    images = [Image.open(p).convert("RGB") for p in SQUARE_TILES]
    ours = _our_pixels(64)
    # transformers 5's default (torchvision) backend resizes its own way: within one 8-bit level,
    # at few pixels (observed: max 1 level, 0.2% of values)
    pixel_values = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    diff = np.abs(pixel_values - ours)
    assert diff.max() <= ONE_LEVEL + 1e-5, diff.max()
    assert (diff > 1e-5).mean() < 0.01, (diff > 1e-5).mean()
    # its PIL backend is PIL's bicubic resize, as ours: the same pixels (observed: 2.4e-7)
    pil = transformers.AutoImageProcessor.from_pretrained(str(hf), backend="pil", local_files_only=True)
    pil_values = pil(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(pil_values, ours, atol=1e-5)

    # the processor's text ids and the PIL pixels give transformers' features = `rsclip embed` on the folder
    got = _embed(hf, tmp_path / "out.npz")
    inputs = processor(text=list(got["texts"]), padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt")
    hf_model = transformers.CLIPModel.from_pretrained(str(hf), local_files_only=True)
    image, text = _hf_embed(hf_model, torch.from_numpy(pil_values.transpose(0, 3, 1, 2).copy()), inputs["input_ids"])
    np.testing.assert_allclose(got["image_embeddings"], image, atol=1e-5)
    np.testing.assert_allclose(got["text_embeddings"], text, atol=1e-5)
    # and the default processor's pixels stay close in embedding space
    image_default, _ = _hf_embed(hf_model, torch.from_numpy(pixel_values.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(got["image_embeddings"], image_default, atol=1e-2)


# 2b. a transformers folder fine-tuned here and exported again


def test_train_from_a_transformers_folder_and_export_it(train_shards, tmp_path, capsys):
    config = _hf_config(  # tiny-ViT-quickgelu's sizes, with an old-style eos as on the hub
        text={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
        vision={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 64, "patch_size": 16},
        projection=64, act="quick_gelu", eos=2, bos=0)
    source = tmp_path / "hf_source"
    _hf_folder(source, config, seed=21)
    assert dataclasses.replace(load_checkpoint(source).config, init_logit_scale=0.0) == dataclasses.replace(
        get_model_config("tiny-ViT-quickgelu"), init_logit_scale=0.0)
    workdir = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs/demo.py"), "--workdir", str(workdir),
                 f"--config.model.init_from={source}", "--config.model.name=tiny-ViT-quickgelu",
                 f"--config.data.train={train_shards}", "--config.evals={}", "--config.batch_size=8",
                 "--config.total_steps=2", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
                 "--config.optim.warmup_steps=1", "--config.optim.lr=1e-5"]) == 0
    capsys.readouterr()

    out = tmp_path / "exported"
    assert main(["convert", str(workdir), str(out), "--to", "hf"]) == 0
    hf_model, loading = transformers.CLIPModel.from_pretrained(str(out), output_loading_info=True,
                                                               local_files_only=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"], loading
    assert hf_model.config.text_config.hidden_act == "quick_gelu"

    texts = [TEXTS[0], TEXTS[3], TEXTS[4]]  # texts both tokenizers read alike
    got = _embed(workdir, tmp_path / "trained.npz", texts=texts)
    ids = _hf_ids(out, got["texts"])
    ours_ids = tokenize(list(got["texts"]))
    for theirs, mine in zip(ids.numpy(), ours_ids):  # the same ids up to the pooled end token
        end = int(np.argmax(mine)) + 1
        np.testing.assert_array_equal(theirs[:end], mine[:end])
    image, text = _hf_embed(hf_model, _nchw(_our_pixels(64)), ids)
    np.testing.assert_allclose(got["image_embeddings"], image, atol=1e-5)
    np.testing.assert_allclose(got["text_embeddings"], text, atol=1e-5)

    # it trained, and from the folder's weights: two steps at lr 1e-5 moved the embeddings a little
    before = _embed(source, tmp_path / "before.npz", texts=texts)
    for key in ("image_embeddings", "text_embeddings"):
        moved = np.abs(got[key] - before[key]).max()
        assert 1e-6 < moved < 0.05, (key, moved)  # from scratch it would be ~0.5


# 3. where the text is pooled: old-style (eos 2: the largest id) and new-style (the first eos) configs


def test_old_and_new_style_eos_pool_at_the_right_token(tmp_path):
    sizes = {
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "image_size": 32, "patch_size": 16},
        "projection": 16, "act": "gelu"}
    old = _hf_config(**sizes, eos=2, bos=0)
    new = _hf_config(**sizes, eos=1000)  # not the vocabulary's largest id: the two rules differ
    weights = _hf_folder(tmp_path / "old", old, seed=3, tokenizer=False).state_dict()
    new_model = transformers.CLIPModel(new)
    new_model.load_state_dict(weights)
    new_model.save_pretrained(str(tmp_path / "new"))
    old_model = transformers.CLIPModel.from_pretrained(str(tmp_path / "old"), local_files_only=True)

    ours_old, ours_new = load_checkpoint(tmp_path / "old"), load_checkpoint(tmp_path / "new")
    assert (ours_old.config.text.pool_type, ours_old.config.text.eos_id) == ("argmax", None)
    assert (ours_new.config.text.pool_type, ours_new.config.text.eos_id) == ("eos", 1000)

    rows = np.zeros((5, 77), np.int64)
    rows[0, :6] = [49406, 320, 1000, 2368, 49407, 49407]  # first 1000 at 2, largest id at 4
    rows[1, :5] = [0, 1000, 5000, 1000, 7]               # first 1000 at 1, largest at 2; no 49407
    rows[2, :6] = [0, 2, 40000, 2, 1000, 3]              # eos 2 twice: old style still pools at the largest
    rows[3, :4] = [49406, 700, 49407, 49407]             # no 1000: new style pools at position 0
    rows[4, :6] = [5, 1000, 1000, 9, 30000, 30000]       # repeated maxima and eos: the first of each
    for position_old, position_new, row in zip([4, 2, 2, 2, 4], [2, 1, 4, 0, 1], rows):
        assert int(np.argmax(row)) == position_old and int(np.argmax(row == 1000)) == position_new
    ids = torch.from_numpy(rows)
    for ours, theirs in ((ours_old, old_model), (ours_new, new_model)):
        want = _hf_embed(theirs, input_ids=ids)[1]
        got = np.asarray(ours.encode_text(rows.astype(np.int32), normalize=True))
        np.testing.assert_allclose(got, want, atol=1e-5)
    # the rows do tell the rules apart: the same weights, pooled elsewhere, embed otherwise
    old_text, new_text = _hf_embed(old_model, input_ids=ids)[1], _hf_embed(new_model, input_ids=ids)[1]
    assert np.abs(old_text - new_text).max(axis=-1).min() > 1e-2

    # exported again, each keeps its rule
    for name, model, eos in (("old", ours_old, 49407), ("new", ours_new, 1000)):
        assert main(["convert", str(tmp_path / name), str(tmp_path / f"{name}_again"), "--to", "hf"]) == 0
        written = json.loads((tmp_path / f"{name}_again" / "config.json").read_text())
        assert written["text_config"]["eos_token_id"] == eos
        assert load_checkpoint(tmp_path / f"{name}_again").config == model.config


def test_an_mlp_width_whose_ratio_rounds_down_loads(tmp_path):
    config = _hf_config(
        text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision={"hidden_size": 112, "intermediate_size": 488, "num_hidden_layers": 1, "num_attention_heads": 2,
                "image_size": 32, "patch_size": 16},
        projection=16, act="gelu", eos=49407)
    hf_model = _hf_folder(tmp_path / "hf", config, seed=6, tokenizer=False)
    model = load_checkpoint(tmp_path / "hf")
    pixels = _our_pixels(32)[:2]
    image, _ = _hf_embed(hf_model, _nchw(pixels))
    np.testing.assert_allclose(np.asarray(model.encode_image(pixels, normalize=True)), image, atol=1e-5)


# 4. architectures CLIPModel cannot express


@pytest.mark.parametrize("kind", ["tiny-RN", "siglip-bias"])
def test_no_transformers_equivalent_writes_nothing(kind, tmp_path, capsys):
    config = get_model_config("tiny-RN") if kind == "tiny-RN" else with_sigmoid_head(get_model_config("tiny-ViT"))
    if kind == "tiny-RN":  # open_clip's weights (quick to build; initialising a ResNet here is slow on CPU)
        model = load_state_dict_into(create_model(config, abstract=True), state_dict_numpy(build(config, seed=0)))
    else:
        model = create_model(config, seed=0)
    save_checkpoint(model, tmp_path / "m.safetensors")
    assert load_checkpoint(tmp_path / "m.safetensors").config == config  # what the file records
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "m.safetensors"), str(out), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert "rsclip convert: error:" in err and "no transformers" in err, err
    if kind == "tiny-RN":
        assert "no transformers equivalent" in err and "ResNet" in err
    else:
        assert "logit bias" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no staging folder left either


# Bad input


@pytest.mark.parametrize("model_type", ["siglip", "bert"])
def test_other_model_types_are_refused_naming_model_type(model_type, tmp_path, capsys):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 64}))
    (folder / "model.safetensors").write_bytes(b"")
    assert main(["convert", str(folder), str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert f"model_type '{model_type}' is not supported" in err and "'clip'" in err, err
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(TransformersFormatError, match=r"config\.json: model_type .* 'clip'"):
        load_checkpoint(folder)


def test_a_folder_that_is_a_workdir_and_a_transformers_folder_says_which_it_loads(tmp_path, capsys):
    folder = tmp_path / "both"
    config = FAMILIES["ViT-B-16-like-gelu"]
    hf_model = _hf_folder(folder, config, seed=4)
    (folder / "checkpoints").mkdir()  # a workdir someone exported into
    got = _embed(folder, tmp_path / "out.npz", texts=TEXTS[:1])
    err = capsys.readouterr().err
    assert re.search(r"warning: .*both holds several checkpoints \(transformers, rsclip-workdir\); loading the "
                     r"transformers one; pass --step N or --best", err), err
    image, text = _hf_embed(hf_model, _nchw(_our_pixels(64)), _hf_ids(folder, TEXTS[:1]))
    np.testing.assert_allclose(got["image_embeddings"], image, atol=1e-5)
    np.testing.assert_allclose(got["text_embeddings"], text, atol=1e-5)
    # --step asks for the workdir's checkpoints, which this one lacks
    assert main(["embed", "--checkpoint", str(folder), "--step", "1", "--texts", str(tmp_path / "out_texts.txt"),
                 "--out", str(tmp_path / "step.npz")]) == 1
    assert "rsclip embed: error:" in capsys.readouterr().err
    assert not (tmp_path / "step.npz").exists()


def test_sharded_weights_read_as_unsharded(tmp_path, capsys):
    config = FAMILIES["custom-size"]
    hf_model = _hf_folder(tmp_path / "whole", config, seed=8)
    hf_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="4MB")
    openai_clip_tokenizer(77).save_pretrained(str(tmp_path / "sharded"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    whole = _embed(tmp_path / "whole", tmp_path / "whole.npz", texts=TEXTS[:3])
    sharded = _embed(tmp_path / "sharded", tmp_path / "sharded.npz", texts=TEXTS[:3])
    for key in ("image_embeddings", "text_embeddings"):
        np.testing.assert_array_equal(sharded[key], whole[key])
    _, info = load_checkpoint_with_info(tmp_path / "sharded")
    assert [Path(f).name for f in info["files"]] == ["model.safetensors.index.json", *shards]
    # the layout older transformers releases wrote: pytorch_model.bin, with position_ids buffers
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in (tmp_path / "whole").iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, legacy / f.name)
    state_dict = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    state_dict["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state_dict["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    torch.save(state_dict, legacy / "pytorch_model.bin")
    old = _embed(legacy, tmp_path / "legacy.npz", texts=TEXTS[:3])
    for key in ("image_embeddings", "text_embeddings"):
        np.testing.assert_array_equal(old[key], whole[key])

    (tmp_path / "sharded" / shards[-1]).unlink()
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "sharded"), str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert f"names the shard {shards[-1]}, which is missing" in err, err
    with pytest.raises(CheckpointMismatchError, match=re.escape(shards[-1])):
        load_checkpoint(tmp_path / "sharded")


def test_convert_to_a_new_folder_needs_to(tmp_path, capsys):
    _hf_folder(tmp_path / "hf", FAMILIES["ViT-B-16-like-gelu"], seed=1)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err
    assert "rsclip convert: error:" in err and "--to hf (transformers) or --to openclip-dir" in err, err
    assert not (tmp_path / "new").exists()
    # an existing transformers folder keeps its layout without --to
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    (tmp_path / "hf2" / "model.safetensors").unlink()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "hf2")]) == 0
    assert (tmp_path / "hf2" / "model.safetensors").is_file()
    _, loading = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf2"), output_loading_info=True,
                                                        local_files_only=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def test_convert_check_reports_image_and_text_differences(tmp_path, capsys):
    _hf_folder(tmp_path / "hf", FAMILIES["ViT-B-32-like-quickgelu"], seed=2)
    for dst, to in ((tmp_path / "again", "hf"), (tmp_path / "x.safetensors", "openclip")):
        assert main(["convert", str(tmp_path / "hf"), str(dst), "--to", to, "--check"]) == 0
        err = capsys.readouterr().err
        line = [l for l in err.splitlines() if l.startswith("check:")]
        assert len(line) == 1, err
        m = re.search(r"images (\S+), texts (\S+) \(", line[0])
        assert m, line[0]
        assert float(m.group(1)) <= 1e-5 and float(m.group(2)) <= 1e-5, line[0]
