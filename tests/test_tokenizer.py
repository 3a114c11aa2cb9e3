"""The torch-free tokenizer gives open_clip's token ids exactly: real captions, generated unicode, truncation, models."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipsearch import tokenizer as tk
from clipsearch.tokenizer import ClipTokenizer, UnsupportedTokenizer, count_tokens, for_model, from_open_clip
from conftest import TINY_MODEL, shared


@pytest.fixture(scope="module")
def reference():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer()


def assert_same(ours, reference, texts):
    got = ours(texts)
    want = reference(texts).numpy()
    assert got.dtype == np.int64 and got.shape == want.shape
    mismatched = [t for t, a, b in zip(texts, got, want) if not np.array_equal(a, b)]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"
    for text in texts:  # count_tokens is the un-truncated BPE length
        assert ours.count_tokens(text) == len(reference.encode(text))


def test_every_flickr8k_caption(ours, reference):
    rows = [json.loads(line) for line in shared("flickr8k-test1k", "captions.jsonl").read_text().splitlines()]
    captions = [c for row in rows for c in row["captions"]]
    assert len(captions) == 5000
    assert_same(ours, reference, captions)


def test_every_coco_caption(ours, reference):
    folder = shared("coco-mini")
    captions = [c for line in (folder / "captions.jsonl").read_text().splitlines() for c in json.loads(line)["captions"]]
    for name in ("captions_train2017.json", "captions_val2017.json"):
        captions += [a["caption"] for a in json.loads((folder / "annotations" / name).read_text())["annotations"]]
    assert len(captions) > 1500
    assert_same(ours, reference, captions)


HANDPICKED = [
    "", " ", "a dog", "A DOG!!", "kids on a beach at sunset", "it's what's he'd've they'll I'm we're",
    "café crème brûlée naïve Ångström", "東京の夜景", "서울 야경", "北京烤鸭 and 🦆", "🐶🐱🐭 👨‍👩‍👧‍👦 🏳️‍🌈",
    "Tom &amp; Jerry &lt;3 &amp;amp; &#39;quoted&#39; &eacute;", "fi ligature ﬁ and fullwidth ＡＢＣ",
    "mojibake: cafÃ© â€œquotesâ€\x9d", "curly ‘quotes’ and “double”", "tabs\tand\nnewlines\r\nand  spaces",
    "<start_of_text>", "a <end_of_text> b", "<START_OF_TEXT>x", "numbers 12345 3.14159 1,000,000",
    "\x1b[31mred\x1b[0m terminal", "control \x00\x07 chars", "ÃĢ", "Ġ Ċ", "x" * 300, "word " * 100,
    "a" + "ñ" * 200, "🙂" * 80, "!!!???...,,," * 20, "\u200b zero\u200bwidth \ufeff bom", "Ωμέγα Ελληνικά Русский текст",
]


def test_handpicked_edge_cases(ours, reference):
    assert_same(ours, reference, HANDPICKED)


_alphabet = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),  # printable ASCII: the fast path
    st.sampled_from(list("&;#'<>_ \t\nàéîõüçñßøÅÉ’“”…–—")),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF),  # CJK
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.characters(codec="utf-8"),  # anything encodable
)
_entity = st.sampled_from(["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&eacute;", "&amp;amp;", "&nbsp;", "&#x1F600;"])
_long = st.tuples(st.text(_alphabet, min_size=1, max_size=16), st.integers(10, 60)).map(lambda t: " ".join([t[0]] * t[1]))
_texts = st.one_of(
    st.text(_alphabet, max_size=40),
    st.lists(st.one_of(st.text(_alphabet, min_size=1, max_size=12), _entity), max_size=10).map(" ".join),
    _long,  # very long: truncated to the context (drawn as a repeated piece: hypothesis draws characters slowly)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(texts=st.lists(_texts, min_size=1, max_size=4))
def test_generated_unicode_strings(ours, reference, texts):
    assert_same(ours, reference, texts)


def test_truncation_keeps_eot_last(ours):
    long = "dog " * 200
    row = ours([long])[0]
    assert row[0] == ours.sot_token_id and row[-1] == ours.eot_token_id and (row != 0).all()
    assert count_tokens(long) == 200 and ours.count_tokens("a dog") == 2
    short = ours(["a dog"], context_length=8)[0]
    assert short.shape == (8,) and short[3] == ours.eot_token_id and list(short[4:]) == [0] * 4


def test_no_torch_no_open_clip_and_ascii_skips_ftfy():
    code = (
        "import sys; from clipsearch.tokenizer import ClipTokenizer, bpe_vocab_path; t = ClipTokenizer(); "
        "t(['a plain query, 2 dogs!']); plain = 'ftfy' in sys.modules or 'regex' in sys.modules; "
        "t(['café &amp; 🐶']); "
        "print(plain, 'ftfy' in sys.modules, 'torch' in sys.modules, 'open_clip' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "False", "False"]


def test_vocabulary_ids_match_open_clip(ours, reference):
    """Merge r has id 512 + r (all merged symbols are distinct) and the byte symbols keep open_clip's order."""
    assert (ours.vocab_size, ours.sot_token_id, ours.eot_token_id) == (
        reference.vocab_size, reference.sot_token_id, reference.eot_token_id)
    assert all(reference.encoder[pair.replace(" ", "")] == 512 + rank for pair, rank in ours._ranks.items())
    assert all(reference.encoder[symbol] == i for symbol, i in ours._single_ids.items())


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "PE-Core-B-16", "coca_ViT-B-32", TINY_MODEL])
def test_for_model_matches_open_clip_get_tokenizer(name, reference):
    import open_clip

    from clipsearch.model import register_project_configs

    register_project_configs()
    theirs = open_clip.get_tokenizer(name)
    mine = for_model(name)
    assert mine.context_length == theirs.context_length
    assert from_open_clip(theirs).context_length == theirs.context_length
    texts = ["a photo of a cat", "x " * 100]
    assert np.array_equal(mine(texts), theirs(texts).numpy())


@pytest.mark.parametrize("name, needle", [
    ("ViT-B-16-SigLIP", "Hugging Face"),
    ("xlm-roberta-base-ViT-B-32", "Hugging Face"),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf-hub"),
    ("ViT-Nope-99", "no open_clip config"),
])
def test_other_tokenizers_are_refused_clearly(name, needle):
    with pytest.raises(UnsupportedTokenizer, match=needle):
        for_model(name)


def test_local_dir_model_reads_its_config(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": {"context_length": 40}}}))
    assert for_model(f"local-dir:{tmp_path}").context_length == 40
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": {"hf_tokenizer_name": "x"}}}))
    with pytest.raises(UnsupportedTokenizer):
        for_model(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("kwargs", [{"clean": "canonicalize"}, {"reduction_mask": "simple"},
                                    {"additional_special_tokens": ["<mask>"]}])
def test_from_open_clip_refuses_non_default_settings(kwargs):
    from open_clip.tokenizer import SimpleTokenizer

    with pytest.raises(UnsupportedTokenizer):
        from_open_clip(SimpleTokenizer(**kwargs))


def test_vocab_found_without_importing_open_clip():
    code = "import sys; from clipsearch.tokenizer import bpe_vocab_path; p = bpe_vocab_path(); print(p.name, 'open_clip' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == [tk.VOCAB_FILE, "False"], proc.stderr
