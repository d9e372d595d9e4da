"""Prompts, object words and their token spans (freeatm_fast/generate/prompts.py)."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
import torch

from freeatm_fast.generate.prompts import (
    ObjectWord,
    PromptItem,
    PromptSource,
    Vocabulary,
    class_prompts,
    imagenet_classes,
    imagenet_templates,
    load_prompts,
    load_vocabulary,
    match_vocabulary,
    object_token_columns,
    parse_bracketed,
    token_spans,
)

# --------------------------------------------------------------------------------------------------
# a real CLIP tokenizer, built offline from a tiny byte-level BPE vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# Whole words that become one token each ("dog</w>"), and sub-word pieces: "sofabed" -> "sofa" + "bed</w>".
WHOLE_WORDS = ["a", "photo", "of", "on", "the", "dog", "sofa", "bed", "traffic", "light", "hot", "house"]
PIECES = ["sofa"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in alphabet:  # every byte alone and at the end of a word: any text encodes
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[str] = []

    def add(symbols: list[str]) -> None:
        merged = symbols[0]
        for s in symbols[1:]:
            if f"{merged} {s}" not in merges:
                merges.append(f"{merged} {s}")
            merged += s
            vocab.setdefault(merged, len(vocab))

    for w in WHOLE_WORDS:
        add(list(w[:-1]) + [w[-1] + "</w>"])
    for w in PIECES:
        add(list(w))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["CLIPTokenizer", "CLIPTokenizerFast"])
def clip_tokenizer(request, clip_dir):
    import transformers

    cls = getattr(transformers, request.param)
    tok = cls.from_pretrained(str(clip_dir), model_max_length=77)
    # The fixture must really split "sofabed" into two pieces and keep "dog" whole, or the tests below prove less.
    assert tok.convert_ids_to_tokens(tok("sofabed", add_special_tokens=False)["input_ids"]) == ["sofa", "bed</w>"]
    assert tok.convert_ids_to_tokens(tok("dog", add_special_tokens=False)["input_ids"]) == ["dog</w>"]
    return tok


def _decoded_spans(tok, item: PromptItem, spans) -> list[str]:
    ids = tok(item.text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    return [tok.decode(ids[s:e]) for s, e in spans]


# --------------------------------------------------------------------------------------------------
# brackets


def test_parse_bracketed_removes_brackets_and_records_spans():
    item = parse_bracketed("  a photo of a [dog] on a [sofa].  ")
    assert item.text == "a photo of a dog on a sofa."
    assert item.words == ("dog", "sofa")
    assert [o.char_span for o in item.objects] == [(13, 16), (22, 26)]
    assert all(item.text[s:e] == o.word for o in item.objects for s, e in [o.char_span])
    assert all(o.class_id is None for o in item.objects)


def test_parse_bracketed_multiword_and_edges():
    item = parse_bracketed("[traffic light] near a [ hot  dog ]'s stand")
    assert item.text == "traffic light near a  hot  dog 's stand"
    assert item.words == ("traffic light", "hot  dog")
    for o in item.objects:
        assert item.text[o.char_span[0] : o.char_span[1]] == o.word
    # A leading "[ word ]" leaves a leading space behind: the text is stripped and the span shifted.
    item = parse_bracketed("[ dog ] runs")
    assert item.text == "dog  runs" and item.objects[0].char_span == (0, 3)
    assert parse_bracketed("a photo of a dog").objects == ()


@pytest.mark.parametrize(
    "line, message",
    [
        ("a photo of a [dog", "unbalanced '[' at column 14"),
        ("a photo of a dog]", "unbalanced ']' at column 17"),
        ("a [[dog]]", "nested '['"),
        ("a [dog [cat]]", "nested '['"),
        ("a [] photo", "empty brackets at column 3"),
        ("a [   ] photo", "empty brackets"),
        ("[]", "empty brackets"),
        ("[  ]  ", "empty brackets"),
    ],
)
def test_parse_bracketed_errors_name_the_line(line, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_bracketed(line, origin="prompts.txt:7")
    assert repr(line) in str(err.value) and "prompts.txt:7" in str(err.value)


def test_prompt_item_validates_spans():
    with pytest.raises(ValueError, match="does not match the text"):
        PromptItem("a photo of a dog", (ObjectWord("cat", (13, 16)),))
    with pytest.raises(ValueError, match="ordered by position"):
        PromptItem("dog cat", (ObjectWord("cat", (4, 7)), ObjectWord("dog", (0, 3))))
    with pytest.raises(ValueError, match="does not fit the word"):
        ObjectWord("dog", (0, 4))
    with pytest.raises(ValueError, match="non-empty"):
        ObjectWord("  ", (0, 2))


# --------------------------------------------------------------------------------------------------
# vocabulary


def test_vocabulary_longest_match_first_case_insensitive_whole_words():
    vocab = ["dog", "hot dog", "dog house", "traffic light", "light"]
    item = match_vocabulary("A HOT Dog by a dog  house, a Traffic   light and a dog.", vocab)
    assert item.words == ("HOT Dog", "dog  house", "Traffic   light", "dog")
    assert [o.class_id for o in item.objects] == [1, 2, 3, 0]
    # "hot dog house": "dog house" (9 characters) beats the overlapping "hot dog" (7).
    assert match_vocabulary("a hot dog house", vocab).words == ("dog house",)
    # Whole words only: no match inside "hotdog", "bulldogs", "dogma", "lightning".
    assert match_vocabulary("a hotdog, bulldogs, dogma and lightning", vocab).objects == ()
    # Punctuation is a boundary: "dog's", "(dog)", "dog-house".
    assert match_vocabulary("the dog's (dog) dog-house", vocab).words == ("dog", "dog", "dog")


def test_vocabulary_entries_are_validated():
    with pytest.raises(ValueError, match="repeats"):
        Vocabulary(["dog", "Dog"])
    with pytest.raises(ValueError, match="must start and end with a letter or digit"):
        Vocabulary(["dog", "'s"])
    with pytest.raises(ValueError, match="empty"):
        Vocabulary([])
    with pytest.raises(ValueError, match="non-empty string"):
        Vocabulary(["dog", "  "])


def test_load_vocabulary_names_file_and_line(tmp_path):
    path = tmp_path / "objects.txt"
    path.write_text("# objects\ndog\n\nhot dog\nDOG\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"objects\.txt:5.*repeats .*objects\.txt:2"):
        load_vocabulary(path)
    path.write_text("# objects\ndog\n\nhot dog\n", encoding="utf-8")
    vocab = load_vocabulary(path)
    assert vocab.entries == ("dog", "hot dog") and vocab.class_id_of("Hot  Dog") == 1


# --------------------------------------------------------------------------------------------------
# prompt files


def test_load_prompts_file_with_brackets_and_vocabulary(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\n\na photo of a [dog] on a [sofa]\n   \n  a hot dog on a sofa  \n  # indented comment\n"
        "a [traffic light] at night\n",
        encoding="utf-8",
    )
    objects = tmp_path / "objects.txt"
    objects.write_text("sofa\nhot dog\ndog\n", encoding="utf-8")
    source = load_prompts(prompts, objects_file=objects)
    assert len(source) == 3
    first, second, third = source.items
    assert first.text == "a photo of a dog on a sofa" and first.words == ("dog", "sofa")
    assert [o.class_id for o in first.objects] == [2, 0]  # bracketed words found in the vocabulary get its ids
    assert first.origin == f"{prompts}:3"
    assert second.text == "a hot dog on a sofa" and second.words == ("hot dog", "sofa")
    assert [o.class_id for o in second.objects] == [1, 0] and second.origin == f"{prompts}:5"
    assert third.words == ("traffic light",) and third.objects[0].class_id is None  # not in the vocabulary
    # Round robin over the file's prompts.
    assert [source.get(i).text for i in (0, 3, 7)] == [first.text, first.text, second.text]


def test_load_prompts_errors_name_file_and_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a [dog]\n\na photo of a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts\.txt:3: prompt 'a photo of a cat' has no object word"):
        load_prompts(prompts)
    source = load_prompts(prompts, allow_no_objects=True)
    assert [len(it.objects) for it in source.items] == [1, 0]
    objects = tmp_path / "objects.txt"
    objects.write_text("dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts\.txt:3: .*none of the 1 words of .*objects\.txt"):
        load_prompts(prompts, objects_file=objects)
    prompts.write_text("# header\na photo of a [dog]\na [cat on a mat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts\.txt:3: unbalanced '\['"):
        load_prompts(prompts)
    prompts.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(prompts)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(tmp_path / "missing.txt")
    prompts.write_bytes(b"a [dog] \xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_prompts(prompts)


def test_prompt_source_index_and_fingerprint(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("a [dog]\na [sofa]\n", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("a [dog]\na [sofa] bed\n", encoding="utf-8")
    src = load_prompts(a)
    assert src.fingerprint() == load_prompts(a).fingerprint() != load_prompts(b).fingerprint()
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="sample index"):
            src.get(bad)
    with pytest.raises(ValueError, match="holds no prompts"):
        PromptSource("x", ())


# --------------------------------------------------------------------------------------------------
# built-in ImageNet class templates


def test_imagenet_package_data():
    raw = resources.files("freeatm_fast.generate").joinpath("data", "imagenet_classes.txt").read_text("utf-8")
    lines = raw.splitlines()
    assert len(lines) == 1000 and raw.endswith("\n")
    classes = imagenet_classes()
    assert classes == tuple(lines) and len(set(classes)) == 1000
    assert classes[0] == "tench" and classes[1] == "goldfish" and classes[999] == "toilet tissue"
    assert classes[134] == "crane bird" and classes[517] == "crane"  # torchvision's de-duplicated names
    templates = imagenet_templates()
    assert len(templates) >= 5 and "a photo of a {}." in templates
    assert all(t.count("{}") == 1 for t in templates)


def test_builtin_imagenet_round_robin_and_class_ids():
    templates = imagenet_templates()
    source = load_prompts("builtin:imagenet")
    assert len(source) == 1000 * len(templates)
    first_block = [source.get(i) for i in range(1000)]
    assert [it.class_id for it in first_block] == list(range(1000))  # 1000 images: one per class
    assert {it.text[: it.text.index(it.label)] for it in first_block} == {t.split("{}")[0] for t in templates}
    for it in first_block[:50] + [source.get(7777)]:
        (obj,) = it.objects
        assert obj.word == it.label == imagenet_classes()[it.class_id] and obj.class_id == it.class_id
        assert it.text[obj.char_span[0] : obj.char_span[1]] == it.label
    assert {it.text for it in source.items} == {t.format(c) for t in templates for c in imagenet_classes()}
    assert source.get(12) == source.get(12 + len(source)) == source.get(12 + 5 * len(source))


def test_builtin_imagenet_first_n_and_errors():
    templates = imagenet_templates()
    source = load_prompts("builtin:imagenet:3")
    assert len(source) == 3 * len(templates)
    assert [source.get(i).label for i in range(4)] == ["tench", "goldfish", "great white shark", "tench"]
    assert source.get(3).text != source.get(0).text  # the next block moves on to another template
    for spec in ("builtin:imagenet:0", "builtin:imagenet:1001", "builtin:imagenet:x", "builtin:imagenet:-1"):
        with pytest.raises(ValueError, match="class count must be an integer in 1..1000"):
            load_prompts(spec)
    with pytest.raises(ValueError, match=r"unknown built-in prompt source 'builtin:coco'.*builtin:imagenet"):
        load_prompts("builtin:coco")
    with pytest.raises(ValueError, match="do not pass objects_file"):
        load_prompts("builtin:imagenet", objects_file="objects.txt")
    with pytest.raises(ValueError, match="exactly one"):
        class_prompts(["dog"], ["a {} and a {}"], origin="test")


# --------------------------------------------------------------------------------------------------
# token spans


def test_token_spans_single_and_subword_tokens(clip_tokenizer):
    item = parse_bracketed("A photo of a [DOG] on a [sofabed] and a [traffic light].")
    spans = token_spans(clip_tokenizer, item)
    # BOS=0, a=1 photo=2 of=3 a=4 dog=5 on=6 a=7 sofa+bed=8,9 and=10..12 a=13 traffic=14 light=15
    assert spans == [(5, 6), (8, 10), (14, 16)]
    assert _decoded_spans(clip_tokenizer, item, spans) == ["dog", "sofabed", "traffic light"]
    ids = clip_tokenizer(item.text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ids[0] == clip_tokenizer.bos_token_id and len(ids) == 77


def test_token_spans_builtin_prompts_decode_back(clip_tokenizer):
    # Class names outside the tiny vocabulary encode byte by byte: many tokens per word, still exact.
    source = load_prompts("builtin:imagenet:40")
    for i in range(0, len(source), 7):
        item = source.get(i)
        (span,) = token_spans(clip_tokenizer, item)
        assert _decoded_spans(clip_tokenizer, item, [span]) == [item.label.lower()]


def test_token_spans_rejects_partial_words(clip_tokenizer):
    item = parse_bracketed("a photo of a [sofa]bed", origin="prompts.txt:4")
    with pytest.raises(ValueError, match=r"prompts\.txt:4: object word 'sofa' is not tokenised on its own"):
        token_spans(clip_tokenizer, item)


def test_token_spans_truncation(clip_tokenizer):
    # CLIP keeps BOS + 75 text tokens + EOS in 77: text token positions 1..75.
    fits = parse_bracketed("a " * 74 + "[dog] on a sofa", origin="long.txt:1")
    assert token_spans(clip_tokenizer, fits) == [(75, 76)]
    assert _decoded_spans(clip_tokenizer, fits, [(75, 76)]) == ["dog"]
    too_long = parse_bracketed("a " * 75 + "[dog]", origin="long.txt:2")
    with pytest.raises(ValueError, match=r"long\.txt:2: object word 'dog' needs tokens \[76, 77\).*below 76"):
        token_spans(clip_tokenizer, too_long)
    straddles = parse_bracketed("a " * 74 + "[traffic light]", origin="long.txt:3")
    with pytest.raises(ValueError, match=r"needs tokens \[75, 77\)"):
        token_spans(clip_tokenizer, straddles)
    # Words past the limit that are not object words are simply truncated.
    early = parse_bracketed("a [dog] " + "on a sofa " * 40)
    assert token_spans(clip_tokenizer, early) == [(2, 3)]
    # A smaller max_length moves the limit.
    with pytest.raises(ValueError, match="max_length=4"):
        token_spans(clip_tokenizer, parse_bracketed("a photo [dog]"), max_length=4)
    assert token_spans(clip_tokenizer, parse_bracketed("a photo [dog]"), max_length=5) == [(3, 4)]


def test_token_spans_no_objects(clip_tokenizer):
    assert token_spans(clip_tokenizer, PromptItem("a photo of a dog")) == []


class _PositionalTokenizer:
    """A word-level tokenizer without offsets whose first word gets other ids than later words, like
    BPE vocabularies that fold the preceding space into the token: the prefix method must detect it."""

    bos, eos, pad = 1, 2, 0

    def __init__(self, positional: bool, with_bos: bool = True):
        self.positional = positional
        self.with_bos = with_bos  # T5-style tokenizers add only EOS: the text starts at token 0

    def _word_id(self, word: str, first: bool) -> int:
        return 10 + 2 * (sum(map(ord, word)) % 1000) + int(first and self.positional)

    def __call__(self, text, add_special_tokens=True, padding=False, max_length=None, truncation=False):
        words = text.split()
        ids = [self._word_id(w, i == 0) for i, w in enumerate(words)]
        if add_special_tokens:
            lead = [self.bos] if self.with_bos else []
            if truncation:
                ids = ids[: max_length - 1 - len(lead)]
            ids = [*lead, *ids, self.eos]
            if padding == "max_length":
                ids += [self.pad] * (max_length - len(ids))
        return {"input_ids": ids}


def test_token_spans_other_tokenizers():
    item = parse_bracketed("a photo of a [dog] on a [sofa]")
    assert token_spans(_PositionalTokenizer(positional=False), item) == [(5, 6), (8, 9)]
    with pytest.raises(ValueError, match="'dog' is not tokenised on its own"):
        token_spans(_PositionalTokenizer(positional=True), item)
    assert token_spans(_PositionalTokenizer(positional=True), parse_bracketed("[dog] runs")) == [(1, 2)]
    assert token_spans(_PositionalTokenizer(positional=False, with_bos=False), item) == [(4, 5), (7, 8)]
    with pytest.raises(ValueError, match=r"needs tokens \[3, 4\)"):  # EOS takes the last of 4 positions
        token_spans(_PositionalTokenizer(positional=False, with_bos=False), parse_bracketed("a b c [dog]"), 4)


# --------------------------------------------------------------------------------------------------
# token columns for the capture


def test_object_token_columns_shapes_and_groups():
    tokens, groups = object_token_columns([[(5, 6), (8, 10)], [(2, 3)], [(1, 4), (6, 7), (9, 10)]])
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 5)
    assert tokens.tolist() == [[5, 8, 9, 0, 0], [2, 0, 0, 0, 0], [1, 2, 3, 6, 9]]
    assert groups == [[(0,), (1, 2)], [(0,)], [(0, 1, 2), (3,), (4,)]]
    for b, sample in enumerate(groups):  # every group's columns hold that word's tokens
        spans = [[(5, 6), (8, 10)], [(2, 3)], [(1, 4), (6, 7), (9, 10)]][b]
        for cols, (s, e) in zip(sample, spans, strict=True):
            assert tokens[b, list(cols)].tolist() == list(range(s, e))


def test_object_token_columns_edges():
    tokens, groups = object_token_columns([[], []])
    assert tokens.shape == (2, 1) and tokens.tolist() == [[0], [0]] and groups == [[], []]
    tokens, _ = object_token_columns([[(1, 17)]], k_max=16)
    assert tokens.shape == (1, 16)
    item = parse_bracketed("a [dog] and a [sofa]", origin="p.txt:9")
    with pytest.raises(ValueError, match=r"p\.txt:9 'a dog and a sofa': .*17 tokens, more than k_max=16"):
        object_token_columns([[(1, 2)], [(1, 17), (18, 19)]], prompts=[item, item])
    with pytest.raises(ValueError, match="sample 0 of the batch: .*3 tokens, more than k_max=2"):
        object_token_columns([[(1, 4)]], k_max=2)
    with pytest.raises(ValueError, match="0 <= start < end"):
        object_token_columns([[(3, 3)]])
    with pytest.raises(ValueError, match="at least one sample"):
        object_token_columns([])
    with pytest.raises(ValueError, match="2 prompts given for 1 samples"):
        object_token_columns([[(1, 2)]], prompts=["a", "b"])


def test_spans_to_columns_end_to_end(clip_tokenizer):
    items = [parse_bracketed("a [dog] on a [sofabed]"), parse_bracketed("the [traffic light]")]
    spans = [token_spans(clip_tokenizer, it) for it in items]
    tokens, groups = object_token_columns(spans, prompts=items)
    assert tokens.shape == (2, 3)
    ids = clip_tokenizer([it.text for it in items], padding="max_length", max_length=77, truncation=True)["input_ids"]
    words = [[clip_tokenizer.decode([ids[b][tokens[b, c]] for c in cols]) for cols in groups[b]] for b in range(2)]
    assert words == [["dog", "sofabed"], ["traffic light"]]
