"""Prompts and their object words, and where those words sit in the text encoder's tokens (DESIGN §4).

Free-ATM turns the cross-attention map of each *object word* of a prompt into that object's mask, so
every prompt carries the character spans of its object words, and the sampler needs their token
spans in the ``input_ids`` the text encoder sees. Object words come from one of three places:

* square brackets in the prompt: ``a photo of a [dog] on a [sofa]``; the brackets are removed
  before encoding (``a photo of a dog on a sofa``); ``[traffic light]`` marks a multi-word object;
* a vocabulary file matched against unbracketed prompts (``--objects FILE``: one word or phrase a
  line; longest match first, case-insensitive, whole words only; ``class_id`` = entry index);
* built-in class templates: ``builtin:imagenet`` is the 1000 ImageNet-1k class names (package data
  ``data/imagenet_classes.txt``, in class-index order) times the templates in
  ``data/imagenet_templates.txt``; the class name is the object word and its index the ``class_id``;
* the toy world's captions (``builtin:toyworld[:N]``: the captions of caption groups ``0..N-1`` of the toy
  world's train split, N = 1000 by default), for the toy text-to-image model: each object's *colour* word is
  its object word (the word whose map finds the object best), ``label``/``class_id`` = the main object's shape
  (the toy world's class); ``builtin:toyworld-shapes`` marks the shape words instead and
  ``builtin:toyworld-words`` both (colour then shape of every object: two masks per object, for evaluation).

Prompt file format (``load_prompts(path)``): UTF-8 text, one prompt per line; surrounding
whitespace is stripped; blank lines and lines whose first non-blank character is ``#`` are skipped.
A line containing ``[`` or ``]`` is parsed for brackets (brackets are reserved: there is no escape).
Any other line is matched against the vocabulary when one is given. A prompt without any object
word is an error naming the file and line unless ``allow_no_objects=True``.

Sample index -> prompt (``PromptSource.get``): round robin, ``items[i % len(items)]``, so N images
cover the prompt list evenly and sample i always gets the same prompt, on any rank and on a rerun.
For ``builtin:imagenet`` the items are ordered so that every block of C consecutive samples (C
classes) holds each class exactly once, and the template rotates with the class within a block:
item j is class ``j % C`` with template ``(j // C + j % C) % T``. 1000 images therefore give one
image per class with all templates in use, and C·T images give every (class, template) pair once.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "BUILTIN_SOURCES",
    "ObjectWord",
    "PromptItem",
    "PromptSource",
    "Vocabulary",
    "class_prompts",
    "imagenet_classes",
    "imagenet_templates",
    "load_prompts",
    "load_vocabulary",
    "match_vocabulary",
    "object_token_columns",
    "parse_bracketed",
    "token_spans",
    "toyworld_prompts",
]

# Names accepted after "builtin:" (optionally followed by ":<N>": the first N classes / captions).
BUILTIN_SOURCES = ("imagenet", "toyworld", "toyworld-shapes", "toyworld-words")
# builtin:toyworld* without a count: the captions of the first 1000 caption groups of the toy world's train split
TOYWORLD_PROMPTS = 1000

_WORD_RUN = re.compile(r"\w+")
_WORD_CHAR = re.compile(r"\w")


# --------------------------------------------------------------------------------------------------
# data classes


@dataclass(frozen=True)
class ObjectWord:
    """One object word of a prompt.

    word: the object word or phrase exactly as it appears in ``PromptItem.text``.
    char_span: half-open character range ``(start, end)`` of the word in ``PromptItem.text``.
    class_id: the class index (built-in class templates) or vocabulary entry index, else None.
    """

    word: str
    char_span: tuple[int, int]
    class_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.word, str) or not self.word.strip():
            raise ValueError(f"ObjectWord.word must be a non-empty string, got {self.word!r}")
        if self.word != self.word.strip():
            raise ValueError(f"ObjectWord.word must not start or end with whitespace, got {self.word!r}")
        span = tuple(self.char_span)
        if len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span):
            raise ValueError(f"ObjectWord.char_span must be two ints (start, end), got {self.char_span!r}")
        start, end = span
        if not 0 <= start < end or end - start != len(self.word):
            raise ValueError(
                f"ObjectWord.char_span {span} does not fit the word {self.word!r} ({len(self.word)} characters)"
            )
        object.__setattr__(self, "char_span", span)
        if self.class_id is not None and (
            not isinstance(self.class_id, int) or isinstance(self.class_id, bool) or self.class_id < 0
        ):
            raise ValueError(f"ObjectWord.class_id must be None or an int >= 0, got {self.class_id!r}")


@dataclass(frozen=True)
class PromptItem:
    """A prompt ready to encode, with its object words.

    text: the prompt as the text encoder gets it (brackets removed).
    objects: the object words, ordered by position in ``text``, non-overlapping; the masks of a
        sample follow this order.
    label / class_id: the class name and index for built-in class templates, else None.
    origin: where the prompt came from (``"prompts.txt:12"``, ``"builtin:imagenet class 3 template 1"``),
        used in error messages.
    """

    text: str
    objects: tuple[ObjectWord, ...] = ()
    label: str | None = None
    class_id: int | None = None
    origin: str = "<prompt>"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"{self.origin}: prompt text must be a non-empty string, got {self.text!r}")
        objects = tuple(self.objects)
        previous_end = 0
        for obj in objects:
            if not isinstance(obj, ObjectWord):
                raise ValueError(f"{self.origin}: objects must be ObjectWord instances, got {obj!r}")
            start, end = obj.char_span
            if end > len(self.text) or self.text[start:end] != obj.word:
                raise ValueError(
                    f"{self.origin}: object word {obj.word!r} with span {obj.char_span} does not match the "
                    f"text {self.text!r} (which has {self.text[start:end]!r} there)"
                )
            if start < previous_end:
                raise ValueError(
                    f"{self.origin}: object words must be ordered by position and not overlap; {obj.word!r} at "
                    f"{obj.char_span} starts before the previous one ends ({previous_end}) in {self.text!r}"
                )
            previous_end = end
        object.__setattr__(self, "objects", objects)
        if self.class_id is not None and (
            not isinstance(self.class_id, int) or isinstance(self.class_id, bool) or self.class_id < 0
        ):
            raise ValueError(f"{self.origin}: class_id must be None or an int >= 0, got {self.class_id!r}")

    @property
    def words(self) -> tuple[str, ...]:
        """The object words, in mask order."""
        return tuple(obj.word for obj in self.objects)


@dataclass(frozen=True)
class PromptSource:
    """The prompts of a generation run; sample index i gets ``items[i % len(items)]`` (round robin).

    spec: what the user asked for (a path or ``builtin:...``), recorded in the shard index.
    items: the prompts, in file order (or the class-template order described in the module docstring).
    """

    spec: str
    items: tuple[PromptItem, ...] = field(repr=False)

    def __post_init__(self) -> None:
        items = tuple(self.items)
        if not items:
            raise ValueError(f"prompt source {self.spec!r} holds no prompts")
        for item in items:
            if not isinstance(item, PromptItem):
                raise ValueError(f"prompt source {self.spec!r}: items must be PromptItem instances, got {item!r}")
        object.__setattr__(self, "items", items)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> PromptItem:
        """The prompt of sample index ``i`` (any int >= 0): ``items[i % len(items)]``."""
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"sample index must be an int >= 0, got {i!r}")
        return self.items[i % len(self.items)]

    def fingerprint(self) -> str:
        """A short hex digest of the prompts and their object spans.

        A resumed run compares it with the one in the shard index: the same sample index must keep
        the same prompt, so a changed prompt file must not be mixed into an existing output.
        """
        payload = [
            [it.text, [[o.word, *o.char_span, o.class_id] for o in it.objects], it.class_id] for it in self.items
        ]
        blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# brackets


def parse_bracketed(line: str, *, origin: str | None = None) -> PromptItem:
    """Parse ``a photo of a [dog] on a [sofa]`` into the text without brackets and its object words.

    The line is stripped of surrounding whitespace first; spaces just inside the brackets are not part
    of the word (``[ dog ]`` marks ``dog``). Raises ValueError naming the line (and ``origin`` when
    given) for an unbalanced, nested or empty bracket pair. A line without brackets gives an item
    without objects.
    """
    if not isinstance(line, str):
        raise ValueError(f"prompt line must be a string, got {type(line).__name__}")
    where = f"{origin}: " if origin else ""
    stripped = line.strip()
    out: list[str] = []  # characters of the text without brackets
    objects: list[ObjectWord] = []
    open_column = -1  # column of the open '[' in the stripped line, -1 when none is open
    open_out = 0  # len(out) when the open '[' was seen
    for column, ch in enumerate(stripped):
        if ch == "[":
            if open_column >= 0:
                raise ValueError(
                    f"{where}nested '[' at column {column + 1} (the '[' at column {open_column + 1} is still "
                    f"open) in prompt {line!r}"
                )
            open_column, open_out = column, len(out)
        elif ch == "]":
            if open_column < 0:
                raise ValueError(f"{where}unbalanced ']' at column {column + 1} in prompt {line!r}")
            inner = "".join(out[open_out:])
            if not inner.strip():
                raise ValueError(f"{where}empty brackets at column {open_column + 1} in prompt {line!r}")
            start = open_out + (len(inner) - len(inner.lstrip()))
            end = len(out) - (len(inner) - len(inner.rstrip()))
            objects.append(ObjectWord(inner.strip(), (start, end)))
            open_column = -1
        else:
            out.append(ch)
    if open_column >= 0:
        raise ValueError(f"{where}unbalanced '[' at column {open_column + 1} (never closed) in prompt {line!r}")
    text = "".join(out)
    if not text.strip():
        raise ValueError(f"{where}empty prompt {line!r}")
    # "[ dog ] runs" leaves a leading space once the brackets are gone: strip it and shift the spans.
    shift = len(text) - len(text.lstrip())
    objects = [ObjectWord(o.word, (o.char_span[0] - shift, o.char_span[1] - shift)) for o in objects]
    return PromptItem(text=text.strip(), objects=tuple(objects), origin=origin or "<prompt>")


# --------------------------------------------------------------------------------------------------
# vocabulary


class Vocabulary:
    """Object words or phrases to find in unbracketed prompts; entry i has ``class_id`` i.

    Matching is case-insensitive and on whole words (the characters around a match are not letters,
    digits or ``_``); whitespace inside a phrase matches any run of whitespace. Overlapping
    candidates are resolved longest match first (ties: the earlier one), so with ``hot dog`` and
    ``dog`` in the vocabulary, ``a hot dog`` yields ``hot dog``. Every non-overlapping occurrence
    becomes an object word, repeats included.

    entries: the words/phrases; each must start and end with a word character.
    sources: optional name of each entry for error messages (``"objects.txt:4"``).
    """

    def __init__(self, entries: Sequence[str], *, sources: Sequence[str] | None = None) -> None:
        if isinstance(entries, str):
            raise ValueError("vocabulary must be a sequence of strings, not one string")
        entries = list(entries)
        if sources is None:
            sources = [f"vocabulary entry {i}" for i in range(len(entries))]
        elif len(sources) != len(entries):
            raise ValueError(f"vocabulary: {len(sources)} sources given for {len(entries)} entries")
        if not entries:
            raise ValueError("vocabulary is empty")
        seen: dict[str, int] = {}
        # first word (lower case) -> [(compiled pattern, class id)]: a prompt word only tries the
        # entries that start with it, so matching costs O(words), not O(vocabulary), per prompt.
        self._by_first: dict[str, list[tuple[re.Pattern[str], int]]] = {}
        for class_id, (entry, source) in enumerate(zip(entries, sources, strict=True)):
            if not isinstance(entry, str) or not entry.strip():
                raise ValueError(f"{source}: vocabulary entry must be a non-empty string, got {entry!r}")
            entry = entry.strip()
            if not (_WORD_CHAR.match(entry[0]) and _WORD_CHAR.match(entry[-1])):
                raise ValueError(
                    f"{source}: vocabulary entry {entry!r} must start and end with a letter or digit "
                    "(matches are whole words)"
                )
            key = " ".join(entry.lower().split())
            if key in seen:
                raise ValueError(f"{source}: vocabulary entry {entry!r} repeats {sources[seen[key]]}")
            seen[key] = class_id
            pattern = re.compile(r"\s+".join(re.escape(p) for p in entry.split()) + r"(?!\w)", re.IGNORECASE)
            first = _WORD_RUN.match(entry).group(0).lower()
            self._by_first.setdefault(first, []).append((pattern, class_id))
        self.entries: tuple[str, ...] = tuple(e.strip() for e in entries)
        self._class_ids = seen

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, text: str) -> tuple[ObjectWord, ...]:
        """The object words of ``text``, ordered by position (see the class docstring for the rules)."""
        candidates: list[tuple[int, int, int]] = []  # (start, end, class_id)
        for run in _WORD_RUN.finditer(text):
            # A maximal \w run starts at a word boundary, so only the end needs the (?!\w) check.
            for pattern, class_id in self._by_first.get(run.group(0).lower(), ()):
                m = pattern.match(text, run.start())
                if m is not None:
                    candidates.append((m.start(), m.end(), class_id))
        candidates.sort(key=lambda c: (c[0] - c[1], c[0]))  # longest first, then leftmost
        taken: list[tuple[int, int, int]] = []
        for start, end, class_id in candidates:
            if all(end <= s or start >= e for s, e, _ in taken):
                taken.append((start, end, class_id))
        taken.sort()
        return tuple(ObjectWord(text[s:e], (s, e), class_id) for s, e, class_id in taken)

    def class_id_of(self, word: str) -> int | None:
        """The entry index of ``word`` (case- and whitespace-insensitive), or None."""
        return self._class_ids.get(" ".join(word.lower().split()))


def match_vocabulary(line: str, vocab: Sequence[str] | Vocabulary, *, origin: str | None = None) -> PromptItem:
    """Find the vocabulary's words/phrases in an unbracketed prompt line (longest match first,
    case-insensitive, whole words); each match is an object word with ``class_id`` = entry index.

    Pass a ``Vocabulary`` to reuse its compiled patterns across many lines.
    """
    if not isinstance(vocab, Vocabulary):
        vocab = Vocabulary(vocab)
    text = line.strip()
    if not text:
        raise ValueError(f"{origin + ': ' if origin else ''}empty prompt {line!r}")
    return PromptItem(text=text, objects=vocab.find(text), origin=origin or "<prompt>")


def load_vocabulary(path: str | os.PathLike) -> Vocabulary:
    """Read a vocabulary file: one word or phrase a line; blank lines and ``#`` lines skipped.

    The class id of an entry is its index among the entries (comment and blank lines not counted).
    """
    lines = _read_lines(path)
    return Vocabulary([text for _, text in lines], sources=[f"{path}:{n}" for n, _ in lines])


# --------------------------------------------------------------------------------------------------
# built-in class templates


def _data_text(name: str) -> str:
    return importlib.resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order (package data, torchvision's names)."""
    names = tuple(line.strip() for line in _data_text("imagenet_classes.txt").splitlines())
    if len(names) != 1000 or not all(names):
        raise RuntimeError(f"package data imagenet_classes.txt is damaged: {len(names)} lines, expected 1000 names")
    return names


def imagenet_templates() -> tuple[str, ...]:
    """The prompt templates of ``builtin:imagenet`` (package data; ``{}`` marks the class name)."""
    lines = [line.strip() for line in _data_text("imagenet_templates.txt").splitlines()]
    templates = tuple(line for line in lines if line and not line.startswith("#"))
    for t in templates:
        _check_template(t, "package data imagenet_templates.txt")
    return templates


def _check_template(template: str, where: str) -> None:
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise ValueError(f"{where}: template {template!r} must contain exactly one '{{}}' and no other braces")


def class_prompts(class_names: Sequence[str], templates: Sequence[str], *, origin: str) -> tuple[PromptItem, ...]:
    """Every (class, template) pair as a prompt whose object word is the class name.

    Item j is class ``c = j % C`` with template ``(j // C + c) % T`` (C classes, T templates): each
    block of C consecutive items holds every class once, with the templates rotating inside the
    block, and the C·T items hold every pair exactly once.
    """
    num_classes, num_templates = len(class_names), len(templates)
    if num_classes == 0 or num_templates == 0:
        raise ValueError(f"{origin}: needs at least one class and one template, got {num_classes} and {num_templates}")
    for t in templates:
        _check_template(t, origin)
    items = []
    for j in range(num_classes * num_templates):
        c = j % num_classes
        t = (j // num_classes + c) % num_templates
        name = class_names[c].strip()
        prefix, suffix = templates[t].split("{}")
        text = prefix + name + suffix
        obj = ObjectWord(name, (len(prefix), len(prefix) + len(name)), class_id=c)
        items.append(
            PromptItem(text, (obj,), label=name, class_id=c, origin=f"{origin} class {c} ({name}) template {t}")
        )
    return tuple(items)


def toyworld_prompts(count: int = TOYWORLD_PROMPTS, *, mark: str = "colour", seed: int = 0) -> tuple[PromptItem, ...]:
    """The captions of the toy world's train-split caption groups ``0..count-1`` as prompts (module docstring);
    ``mark``: "colour", "shape" or "both" object words per object."""
    from freeatm_fast.data.toyworld import CLASSES, caption_plan, caption_text

    if mark not in ("colour", "shape", "both"):
        raise ValueError(f"toyworld_prompts: mark must be colour, shape or both, got {mark!r}")
    items = []
    for group in range(count):
        plan = caption_plan(seed, "train", group)
        text, spans = caption_text(plan["objects"], plan["background"])
        words = text.split(" ")
        starts = [sum(len(w) + 1 for w in words[:k]) for k in range(len(words))]
        objects = []
        for start, _end in spans:  # word spans [colour, shape] of each object
            for k in {"colour": (start,), "shape": (start + 1,), "both": (start, start + 1)}[mark]:
                word = words[k].rstrip(",")
                objects.append(ObjectWord(word, (starts[k], starts[k] + len(word))))
        label = plan["label"]
        origin = f"builtin:toyworld caption group {group}"
        items.append(PromptItem(text, tuple(objects), label=CLASSES[label], class_id=label, origin=origin))
    return tuple(items)


def _builtin_source(spec: str) -> PromptSource:
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    if name not in BUILTIN_SOURCES or len(parts) > 3:
        choices = ", ".join(f"builtin:{n}[:N]" for n in BUILTIN_SOURCES)
        raise ValueError(f"unknown built-in prompt source {spec!r}; choices: {choices}")
    if name.startswith("toyworld"):
        count = TOYWORLD_PROMPTS
        if len(parts) == 3:
            if not parts[2].isdigit() or int(parts[2]) < 1:
                raise ValueError(f"{spec!r}: the caption count must be an integer >= 1, got {parts[2]!r}")
            count = int(parts[2])
        mark = {"toyworld": "colour", "toyworld-shapes": "shape", "toyworld-words": "both"}[name]
        return PromptSource(spec, toyworld_prompts(count, mark=mark))
    classes = imagenet_classes()
    if len(parts) == 3:
        count = parts[2]
        if not count.isdigit() or not 1 <= int(count) <= len(classes):
            raise ValueError(f"{spec!r}: the class count must be an integer in 1..{len(classes)}, got {count!r}")
        classes = classes[: int(count)]
    return PromptSource(spec, class_prompts(classes, imagenet_templates(), origin=f"builtin:{name}"))


# --------------------------------------------------------------------------------------------------
# prompt files


def _read_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank, non-comment lines of a UTF-8 file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt/vocabulary file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    out = []
    for number, line in enumerate(raw.splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            out.append((number, text))
    return out


def load_prompts(
    spec: str | os.PathLike,
    *,
    objects_file: str | os.PathLike | None = None,
    allow_no_objects: bool = False,
) -> PromptSource:
    """Load the prompts of a run.

    spec: a prompt file (format in the module docstring), ``builtin:imagenet`` or
        ``builtin:imagenet:<N>`` (the first N classes, all templates).
    objects_file: vocabulary matched against unbracketed lines (also gives bracketed words that are
        in it their ``class_id``). Not allowed with a built-in source, whose object words are the classes.
    allow_no_objects: keep prompts with no object word (their samples get no masks) instead of raising.

    Errors name the file and line number.
    """
    spec_str = os.fspath(spec)
    if spec_str.startswith("builtin:"):
        if objects_file is not None:
            raise ValueError(f"{spec_str!r} takes its object words from the class names; do not pass objects_file")
        return _builtin_source(spec_str)
    vocab = load_vocabulary(objects_file) if objects_file is not None else None
    items = []
    for number, line in _read_lines(spec_str):
        origin = f"{spec_str}:{number}"
        if "[" in line or "]" in line:
            item = parse_bracketed(line, origin=origin)
            if vocab is not None:
                objects = tuple(ObjectWord(o.word, o.char_span, vocab.class_id_of(o.word)) for o in item.objects)
                item = PromptItem(item.text, objects, origin=origin)
        elif vocab is not None:
            item = match_vocabulary(line, vocab, origin=origin)
        else:
            item = PromptItem(line, (), origin=origin)
        if not item.objects and not allow_no_objects:
            how = (
                f"none of the {len(vocab)} words of {objects_file} occurs in it"
                if vocab is not None
                else "mark them with square brackets, e.g. 'a photo of a [dog]', or pass an objects file"
            )
            raise ValueError(f"{origin}: prompt {line!r} has no object word ({how})")
        items.append(item)
    if not items:
        raise ValueError(f"{spec_str}: no prompts (only blank or '#' comment lines)")
    return PromptSource(spec_str, tuple(items))


# --------------------------------------------------------------------------------------------------
# token spans


def _input_ids(tokenizer, text: str, **kwargs) -> list[int]:
    ids = tokenizer(text, **kwargs)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return list(ids)


def _find_subsequence(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def token_spans(tokenizer, item: PromptItem, max_length: int = 77) -> list[tuple[int, int]]:
    """Half-open token ranges ``[start, end)`` of the item's object words in ``input_ids``.

    ``input_ids`` is what the pipeline encodes: ``tokenizer(item.text, padding="max_length",
    max_length=max_length, truncation=True)``, so for CLIP index 0 is BOS and the text starts at 1.
    Pass the pipeline's ``tokenizer.model_max_length`` (77 for CLIP).

    Method (no offset mapping needed, so slow and fast tokenizers both work): the word's first token
    is at (leading special tokens) + (number of tokens of the text before the word), and its tokens
    are the tokens of the word alone. That holds for BPE tokenizers that merge only inside
    whitespace/punctuation-separated pieces (CLIP); it is then checked against the real ``input_ids``
    and a mismatch raises (e.g. ``[sofa]bed``, where ``sofa`` is not a token sequence of its own).

    Truncation: CLIP keeps ``max_length - 2`` text tokens. An object word that does not fully fit is
    an error naming the prompt, not a silent drop, because dropping it would change the number and
    order of the sample's masks; words after the last object word may be truncated freely.

    Returns one ``(start, end)`` per object word, in ``item.objects`` order.
    """
    if not isinstance(item, PromptItem):
        raise ValueError(f"token_spans needs a PromptItem, got {type(item).__name__}")
    if not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be an int >= 3, got {max_length!r}")
    if not item.objects:
        return []
    content = _input_ids(tokenizer, item.text, add_special_tokens=False)
    full = _input_ids(tokenizer, item.text)
    lead = _find_subsequence(full, content)
    if lead < 0:
        raise ValueError(
            f"{item.origin}: the tokenizer's ids with special tokens do not contain its ids without them for "
            f"{item.text!r}; cannot place the object words"
        )
    trail = len(full) - lead - len(content)  # special tokens after the text (EOS), kept by truncation
    keep_end = max_length - trail  # token positions >= keep_end hold EOS/padding after truncation
    padded = _input_ids(tokenizer, item.text, padding="max_length", max_length=max_length, truncation=True)
    if len(padded) != max_length:
        raise ValueError(
            f"{item.origin}: tokenizer returned {len(padded)} ids with padding='max_length', max_length={max_length}"
        )
    spans = []
    for obj in item.objects:
        start_char, end_char = obj.char_span
        prefix = item.text[:start_char]
        n_prefix = len(_input_ids(tokenizer, prefix, add_special_tokens=False)) if prefix.strip() else 0
        word_ids = _input_ids(tokenizer, item.text[start_char:end_char], add_special_tokens=False)
        if not word_ids:
            raise ValueError(f"{item.origin}: object word {obj.word!r} encodes to no tokens")
        start = lead + n_prefix
        end = start + len(word_ids)
        if end > keep_end:
            raise ValueError(
                f"{item.origin}: object word {obj.word!r} needs tokens [{start}, {end}) but truncation to "
                f"max_length={max_length} keeps text tokens only below {keep_end}; shorten the prompt {item.text!r}"
            )
        if padded[start:end] != word_ids:
            raise ValueError(
                f"{item.origin}: object word {obj.word!r} is not tokenised on its own in {item.text!r} "
                f"(alone: {word_ids}, at tokens [{start}, {end}) of the prompt: {padded[start:end]}); "
                "mark whole words"
            )
        spans.append((start, end))
    return spans


def object_token_columns(
    spans_batch: Sequence[Sequence[tuple[int, int]]],
    k_max: int = 16,
    *,
    prompts: Sequence[PromptItem | str] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, list[list[tuple[int, ...]]]]:
    """The token columns the map capture keeps, and which columns belong to which object word.

    spans_batch: per sample, the ``token_spans`` of its object words.
    k_max: the most columns one sample may use (the capture's accumulator is ``[B, K, N]``).
    prompts: optional, per sample, only used to name the prompt in errors.

    Returns ``tokens`` int64 ``[B, K]``: row b lists the token indices of sample b's object words
    (the union of its spans, in order), padded with 0 (BOS, whose map is ignored), where K is the
    largest count in the batch (at least 1, so the kernels never see an empty dimension); and
    ``groups``: per sample, one tuple of column indices into ``tokens[b]`` per object word, in
    object order; the capture averages the maps of those columns into the word's mask.
    """
    if not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")
    if len(spans_batch) == 0:
        raise ValueError("object_token_columns needs at least one sample")
    if prompts is not None and len(prompts) != len(spans_batch):
        raise ValueError(f"{len(prompts)} prompts given for {len(spans_batch)} samples")

    def name(b: int) -> str:
        if prompts is None:
            return f"sample {b} of the batch"
        p = prompts[b]
        return f"{p.origin} {p.text!r}" if isinstance(p, PromptItem) else repr(p)

    rows: list[list[int]] = []
    groups: list[list[tuple[int, ...]]] = []
    for b, spans in enumerate(spans_batch):
        column_of: dict[int, int] = {}  # token index -> column; a dict keeps the union ordered
        sample_groups = []
        for span in spans:
            if len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span):
                raise ValueError(f"{name(b)}: token span must be two ints (start, end), got {span!r}")
            start, end = span
            if not 0 <= start < end:
                raise ValueError(f"{name(b)}: token span {span!r} must satisfy 0 <= start < end")
            sample_groups.append(tuple(column_of.setdefault(t, len(column_of)) for t in range(start, end)))
        if len(column_of) > k_max:
            raise ValueError(
                f"{name(b)}: its object words span {len(column_of)} tokens, more than k_max={k_max}; "
                "mark fewer or shorter object words, or raise k_max"
            )
        rows.append(list(column_of))
        groups.append(sample_groups)
    width = max(1, max(len(r) for r in rows))
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return tokens, groups
