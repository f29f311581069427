"""Tests for rsclip_jax.tokenizer: exact parity with open_clip.tokenize plus standalone checks."""

import hashlib
import importlib.resources
import random

import numpy as np
import open_clip  # reference implementation; always present in the test environment
import pytest
import regex
from open_clip import tokenizer as oc_tok

from rsclip_jax.tokenizer import (
    CONTEXT_LENGTH,
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    VOCAB_SIZE,
    Tokenizer,
    clean_text,
    get_tokenizer,
    tokenize,
)

VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

EDGE_CASES = [
    "",
    " ",
    "\t\n \u00a0",
    "Many small-vehicles in the middle of the picture .",
    "There are 15 aircrafts on the ground .",
    "4 large vehicles, a small vehicle and 5 planes at the edge of the picture .",
    "cafÃ© au lait",  # mojibake that ftfy repairs to "café"
    "naïve façade résumé Ærøskøbing Straße",
    "e\u0301cole vs \u00e9cole",  # combining acute vs precomposed
    "東京タワーの航空写真 北京 서울",
    "مطار دبي الدولي",
    "plane ✈️ ship 🚢 car 🚗 flags 🇺🇸🇨🇳 family 👨‍👩‍👧",
    "&amp;amp; &lt;b&gt;bold&lt;/b&gt; it&#39;s &quot;quoted&quot; &nbsp;x",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em\u3000ideo   spaces",
    "it's they're we'll I'd you've I'm don't IT'S THEY'RE",
    "it’s curly ’re ’ll",
    "1234567 3.14159 2024-01-01 0.5km 10,000",
    "!!! ??? ... --- ((( ))) [[x]] {y} <z> @#$%^&*_+=|\\/~`",
    "<start_of_text>",
    "<end_of_text>",
    "a <start_of_text> b <end_of_text> c",
    "!<start_of_text> x<end_of_text>y 's<end_of_text>",
    "<START_OF_TEXT> <End_Of_Text>",
    "<\ufb05art_of_text> '\u017f \u017f",  # long-s ligature / long s: case-folds to "s" in open_clip
    "x\u0345y \u0345 \u0130stanbul \u212a",  # ypogegrammeni is dropped by open_clip's regex
    "ﬁ ﬂ ﬀ ligatures",
    "\x1c\x1d\x1e\x1f separators \x85 nel \u200b zwsp \ufeff bom",
    "ＦＵＬＬＷＩＤＴＨ １２３",
    "x\u0558y\u058b \U00010940z 7\U00011de0\U00011de5",  # letters/digits newer than Oniguruma's Unicode
]

SUBJECTS = ["plane", "planes", "airplane", "aircrafts", "small-vehicles", "large vehicle", "ship",
            "boats", "storage tanks", "baseball diamond", "tennis court", "harbor", "bridge",
            "roundabout", "soccer-ball-field", "swimming pool", "helicopter", "runway", "buildings",
            "trees", "river", "farmland", "parking lot", "residential area", "dense residential"]
PLACES = ["in the middle of the picture", "at the edge of the picture", "on the ground",
          "near the river", "next to the road", "in the top left corner", "around the airport",
          "along the coast", "beside some green trees"]
TEMPLATES = ["Many {s} {p} .", "There are {n} {s} {p} .", "{n} {s} , a {s2} and {n2} {s3} {p} .",
             "a satellite image of {s} {p}", "An aerial photo: {n} {s}; {s2} ({n2})!",
             "{S} {p}", "{s} &amp; {s2} {p}", "  {s}\t{p}\n", "it's {s} {p}, they're {s2}",
             "{s}{s2}{s3}"]


def make_captions():
    """Deterministic mixed caption set: real remote-sensing styles, edge cases and long text."""
    rng = random.Random(20240601)
    caps = list(EDGE_CASES)
    for _ in range(220):
        s, s2, s3 = rng.sample(SUBJECTS, 3)
        cap = rng.choice(TEMPLATES).format(s=s, s2=s2, s3=s3, S=s.upper(), p=rng.choice(PLACES),
                                           n=rng.randint(0, 999), n2=rng.randint(1, 20))
        if rng.random() < 0.3:  # splice in an edge case
            cap = cap + " " + rng.choice(EDGE_CASES[3:])
        caps.append(cap)
    long_base = " ".join(f"{SUBJECTS[i % len(SUBJECTS)]} {i} ," for i in range(60))
    caps += [long_base, long_base.upper(), "word " * 200, "1234567890" * 20, "😀" * 100,
             "a" * 1000, ("there are 15 aircrafts on the ground . " * 8).strip()]
    return caps


CAPTIONS = make_captions()


def _mismatches(ours, ref, captions):
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    return [(captions[i], ours[i].tolist(), ref[i].tolist()) for i in bad[:5]]


def test_vocab_file_sha256():
    path = importlib.resources.files("rsclip_jax") / "resources" / "bpe_simple_vocab_16e6.txt.gz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VOCAB_SHA256


def test_caption_set_is_large_and_varied():
    assert len(set(CAPTIONS)) >= 200
    assert any(len(oc_tok._tokenizer.encode(c)) > CONTEXT_LENGTH for c in CAPTIONS)


def test_parity_with_open_clip_tokenize():
    ours = tokenize(CAPTIONS)
    ref = open_clip.tokenize(CAPTIONS).numpy()
    assert ours.shape == ref.shape == (len(CAPTIONS), CONTEXT_LENGTH)
    assert ours.dtype == np.int32
    assert not _mismatches(ours, ref, CAPTIONS)


@pytest.mark.parametrize("context_length", [2, 3, 8, 33, 100])
def test_parity_other_context_lengths(context_length):
    caps = CAPTIONS[:40] + CAPTIONS[-7:]
    ours = tokenize(caps, context_length=context_length)
    ref = open_clip.tokenize(caps, context_length=context_length).numpy()
    assert ours.shape == (len(caps), context_length)
    assert not _mismatches(ours, ref, caps)


def test_encode_and_clean_match_open_clip():
    tok = get_tokenizer()
    for cap in CAPTIONS:
        assert clean_text(cap) == oc_tok._clean_lower(cap), cap
        assert tok.encode(cap) == oc_tok._tokenizer.encode(cap), cap


def test_pre_tokenizer_matches_open_clip_regex_on_every_code_point():
    # One string holding every non-surrogate code point: any letter/digit/other/whitespace
    # classification difference between `regex` and Oniguruma changes the piece boundaries.
    chars = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    b2u = oc_tok.bytes_to_unicode()
    expected = ["".join(b2u[b] for b in p.encode()) for p in regex.findall(oc_tok._tokenizer.pat, chars)]
    got = [p for p, _ in get_tokenizer()._hf.pre_tokenizer.pre_tokenize_str(chars)]
    assert got == expected


def test_long_caption_truncated_with_eot_kept():
    cap = "many small vehicles parked " * 40
    row = tokenize(cap)[0]
    assert row[0] == SOT_TOKEN_ID and row[-1] == EOT_TOKEN_ID
    assert (row != 0).all() and (row == EOT_TOKEN_ID).sum() == 1
    assert row[1:-1].tolist() == get_tokenizer().encode(cap)[: CONTEXT_LENGTH - 2]


def test_known_ids_shape_dtype_padding():
    out = tokenize(["a photo of a cat", ""])
    assert out.shape == (2, CONTEXT_LENGTH) and out.dtype == np.int32
    assert out[0, :7].tolist() == [SOT_TOKEN_ID, 320, 1125, 539, 320, 2368, EOT_TOKEN_ID]
    assert (out[0, 7:] == 0).all()
    assert out[1, :2].tolist() == [SOT_TOKEN_ID, EOT_TOKEN_ID] and (out[1, 2:] == 0).all()
    assert tokenize("a photo of a cat").shape == (1, CONTEXT_LENGTH)
    assert tokenize([]).shape == (0, CONTEXT_LENGTH)
    assert out.max() < VOCAB_SIZE


def test_digits_contractions_and_literal_specials():
    tok = get_tokenizer()
    assert tok.encode("1234567") == [tok._hf.token_to_id(f"{d}</w>") for d in "1234567"]
    assert tok.encode("it's") == [tok._hf.token_to_id("it</w>"), tok._hf.token_to_id("'s</w>")]
    assert tok.encode("<start_of_text>") == [SOT_TOKEN_ID]
    assert tok.encode("<END_OF_TEXT>") == [EOT_TOKEN_ID]  # lower-cased first, like open_clip
    assert EOT_TOKEN_ID not in tok.encode("!<end_of_text>")  # "!<" is one punctuation run
    assert SOT_TOKEN_ID not in tok.encode("<\u017ftart_of_text>")


def test_clean_text():
    assert clean_text("  cafÃ©\t&amp;amp;  &lt;B&gt;\u00a0&#39;X\n") == "café & <b> 'x"
    assert clean_text("") == ""


def test_decode_round_trip():
    tok = get_tokenizer()
    row = tokenize("Many small-vehicles in the middle of the picture .")[0]
    assert tok.decode(row) == "many small - vehicles in the middle of the picture ."
    assert tok.decode(tok.encode("café 東京 😀")) == "café 東京 😀"
    assert tok.decode([]) == ""
    with pytest.raises(ValueError):
        tok.decode([VOCAB_SIZE + 5])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_errors():
    with pytest.raises(TypeError, match=r"texts\[2\]"):
        tokenize(["ok", "fine", b"bytes"])
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        tokenize([None])
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="context_length"):
            tokenize("x", context_length=bad)
    with pytest.raises(TypeError):
        tokenize("x", context_length=7.5)
    with pytest.raises(TypeError):
        get_tokenizer().encode(123)


def test_get_tokenizer_is_cached_and_custom_path_works():
    assert get_tokenizer() is get_tokenizer()
    path = importlib.resources.files("rsclip_jax") / "resources" / "bpe_simple_vocab_16e6.txt.gz"
    with importlib.resources.as_file(path) as p:
        tok = Tokenizer(p)
    np.testing.assert_array_equal(tok(CAPTIONS[:20]), tokenize(CAPTIONS[:20]))
