"""Shard format (DESIGN §5): atomic writer, validating reader, shard-directory index, verification.

One sample is one key in a tar file (webdataset layout), three contiguous members written in this order::

    KEY.jpg        the image, JPEG (quality from the writer)
    KEY.masks.u8   K soft masks, raw uint8 bytes of a C-order [K, S, S] array (K may be 0)
    KEY.json       UTF-8 JSON object: caption (str), seed (int), model (str), size [W, H], mask_size S (int),
                   objects: K entries in mask order {word, tokens [start, end), box [x0, y0, x1, y1] pixels,
                   area, score}; extra fields are kept (prompt, class_id, label, ...)

K and S are not stored separately: the reader takes K = len(objects) and S = mask_size and checks the mask
byte length against K*S*S. KEY is the zero-padded global sample index (``sample_key``), made of
``[A-Za-z0-9_-]`` only because webdataset-style readers (DALI included) split a member name at its first dot.

A shard directory holds ``NAME.tar`` files and ``index.json``. A shard only ever appears complete:
``ShardWriter`` writes ``.NAME.tar.tmp-<pid>`` and ``os.replace``s it to ``NAME.tar`` after an fsync, so a
killed run leaves at most temporary files, which every function here ignores. ``update_index`` rebuilds
``index.json`` from the shards present on disk, so several ranks writing into one directory never lose
each other's shards.

Readers validate every sample and raise ``ShardError`` (a ``ValueError``) naming the shard file and the key,
or skip and count bad samples with ``skip_bad=True``. ``python -m freeatm_fast.data.shards DIR`` prints the
``verify_dir`` report as JSON and exits 1 when the directory has a problem.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import re
import sys
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "BadSample",
    "BadShard",
    "RawSample",
    "Sample",
    "ShardError",
    "ShardReader",
    "ShardWriter",
    "read_index",
    "read_shard",
    "sample_key",
    "scan_shards",
    "shard_keys",
    "temp_files",
    "update_index",
    "verify_dir",
    "write_index",
]

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_SUFFIX = ".tar"
# Member suffixes of one sample, in the order the writer puts them.
MEMBERS = ("jpg", "masks.u8", "json")
REQUIRED_META = ("caption", "seed", "model", "size", "mask_size", "objects")
REQUIRED_OBJECT = ("word", "tokens", "box", "area", "score")

# A ustar member name holds 100 bytes; the longest suffix ".masks.u8" is 9, so keys stop at 90.
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,90}\Z")
# Shard names never start with "." so that temporary files (".NAME.tar.tmp-PID") can never look like one.
_SHARD_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}\Z")
_TEMP_MARK = SHARD_SUFFIX + ".tmp-"
# tarfile ends an archive with two 512-byte zero blocks; their absence means the file was cut short.
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
# update_index re-lists the directory after writing and retries while other ranks keep adding shards;
# each retry only reads the new shards' headers, so this bound is never reached by honest traffic.
_MAX_INDEX_ATTEMPTS = 100


class ShardError(ValueError):
    """A shard file or one of its samples is malformed; the message names the shard (and key)."""


def sample_key(index: int) -> str:
    """The key of global sample ``index``: zero-padded to 9 digits (``123`` -> ``"000000123"``)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"sample index must be a non-negative int, got {index!r}")
    return f"{index:09d}"


class _MetaAccess:
    """Shortcuts into ``self.meta`` (the KEY.json object) shared by :class:`Sample` and :class:`RawSample`."""

    meta: dict

    @property
    def objects(self) -> list:
        return self.meta["objects"]

    @property
    def caption(self) -> str:
        return self.meta["caption"]


@dataclass(frozen=True, eq=False)  # == on numpy fields is ambiguous: compare fields explicitly
class Sample(_MetaAccess):
    """One decoded sample.

    image: PIL RGB image of size ``meta["size"]`` = (W, H), or (writer only) a uint8 numpy array [H, W, 3].
    masks: uint8 numpy array [K, S, S], K = len(meta["objects"]), S = meta["mask_size"].
    meta:  the KEY.json object (required fields in the module docstring, extra fields kept).
    """

    key: str
    image: Any
    masks: np.ndarray
    meta: dict


@dataclass(frozen=True, eq=False)
class RawSample(_MetaAccess):
    """One sample with the image left as the JPEG bytes from the shard (for GPU decoders such as DALI).

    jpeg: the KEY.jpg bytes; masks: uint8 numpy array [K, S, S]; meta: the KEY.json object.
    """

    key: str
    jpeg: bytes
    masks: np.ndarray
    meta: dict


@dataclass(frozen=True)
class BadSample:
    shard: str
    key: str
    error: str


@dataclass(frozen=True)
class BadShard:
    shard: str
    error: str


# --------------------------------------------------------------------------------------------------
# Validation shared by the writer and the reader: a sample the writer accepts is one the reader accepts.


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and math.isfinite(x))


def _meta_problem(meta: Any) -> str | None:
    """Return what is wrong with a (JSON-decoded) KEY.json object, naming the field, or None when valid."""
    if not isinstance(meta, dict):
        return f"KEY.json must hold a JSON object, got {type(meta).__name__}"
    missing = [f for f in REQUIRED_META if f not in meta]
    if missing:
        return f"missing field(s) {missing} in KEY.json"
    for field in ("caption", "model"):
        if not isinstance(meta[field], str):
            return f"field {field!r} must be a string, got {meta[field]!r}"
    if not _is_int(meta["seed"]):
        return f"field 'seed' must be an int, got {meta['seed']!r}"
    size = meta["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        return f"field 'size' must be [W, H] with positive ints, got {size!r}"
    if not (_is_int(meta["mask_size"]) and meta["mask_size"] > 0):
        return f"field 'mask_size' must be a positive int, got {meta['mask_size']!r}"
    objects = meta["objects"]
    if not isinstance(objects, list):
        return f"field 'objects' must be a list, got {type(objects).__name__}"
    width, height = size
    for i, obj in enumerate(objects):
        where = f"objects[{i}]"
        if not isinstance(obj, dict):
            return f"field {where!r} must be an object, got {obj!r}"
        missing = [f for f in REQUIRED_OBJECT if f not in obj]
        if missing:
            return f"field {where!r} lacks {missing}"
        if not isinstance(obj["word"], str):
            return f"field '{where}.word' must be a string, got {obj['word']!r}"
        tokens = obj["tokens"]
        if not (
            isinstance(tokens, list)
            and len(tokens) == 2
            and all(_is_int(t) for t in tokens)
            and 0 <= tokens[0] < tokens[1]
        ):
            return f"field '{where}.tokens' must be [start, end) ints with 0 <= start < end, got {tokens!r}"
        box = obj["box"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            return f"field '{where}.box' must be 4 finite numbers [x0, y0, x1, y1], got {box!r}"
        x0, y0, x1, y1 = box
        if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
            return f"field '{where}.box' {box!r} must satisfy 0 <= x0 <= x1 <= W={width}, 0 <= y0 <= y1 <= H={height}"
        if not (_is_number(obj["area"]) and obj["area"] >= 0):
            return f"field '{where}.area' must be a finite number >= 0, got {obj['area']!r}"
        if not _is_number(obj["score"]):
            return f"field '{where}.score' must be a finite number, got {obj['score']!r}"
    return None


def _unserialisable_field(obj: Any, path: str = "meta") -> str | None:
    """Path of the first value in ``obj`` that strict JSON cannot hold (e.g. numpy ints, NaN), or None."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else f"{path} (non-finite float {obj!r})"
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _unserialisable_field(v, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{path} (non-string key {k!r})"
            found = _unserialisable_field(v, f"{path}.{k}")
            if found:
                return found
        return None
    return f"{path} (type {type(obj).__module__}.{type(obj).__name__}: use plain int/float/str/list/dict)"


def _validate_key(key: Any) -> str | None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        return f"key must be 1-90 characters of [A-Za-z0-9_-], got {key!r}"
    return None


def _jpeg_header(data: bytes) -> tuple[int, int]:
    """(W, H) from a JPEG's header without decoding the pixels; raises on non-JPEG data."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "JPEG":
            raise ValueError(f"not a JPEG (PIL reads format {im.format!r})")
        return im.size


# --------------------------------------------------------------------------------------------------
# Writer


class _TrackedFile:
    """Thin wrapper around the temporary shard file: counts bytes, and is the one object whose ``write``
    every byte of the shard passes through (tests replace it to simulate a full disk)."""

    def __init__(self, raw: io.BufferedWriter):
        self.raw = raw
        self.bytes_written = 0

    def write(self, data: bytes) -> int:
        n = self.raw.write(data)
        self.bytes_written += len(data)
        return n

    def tell(self) -> int:
        return self.raw.tell()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Filesystems that cannot fsync a directory say EINVAL/ENOTSUP;
    there the rename is as durable as that filesystem allows, so those errors are not failures."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class ShardWriter:
    """Writes ``out_dir/<shard_name>.tar`` atomically (DESIGN §5).

    Samples go to ``out_dir/.<shard_name>.tar.tmp-<pid>``; ``close()`` (or leaving the ``with`` block without
    an exception) flushes, fsyncs and renames it to the final name. An exception inside the ``with`` block,
    or an OSError such as a full disk, removes the temporary file: a shard is complete or absent.

    One shard name has one writer at a time (generation puts the rank in the name), so temporary files of
    the same shard name left by a killed earlier run are removed on construction. An existing complete shard
    is not replaced unless ``overwrite=True`` (a rerun must skip it, not duplicate its samples).

    Use::

        with ShardWriter(out_dir, "shard-r00-000003") as w:
            w.write(Sample(key, image, masks, meta))
    """

    def __init__(self, out_dir: str | os.PathLike, shard_name: str, *, jpeg_quality: int = 95, overwrite: bool = False):
        if not isinstance(shard_name, str) or not _SHARD_NAME_RE.match(shard_name) or shard_name.endswith(".tar"):
            raise ValueError(
                f"shard_name must be 1-200 characters of [A-Za-z0-9_.-], not starting with '.', without the "
                f"'.tar' suffix; got {shard_name!r}"
            )
        if not _is_int(jpeg_quality) or not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")
        self.out_dir = Path(out_dir)
        self.shard_name = shard_name
        self.jpeg_quality = jpeg_quality
        self.path = self.out_dir / f"{shard_name}{SHARD_SUFFIX}"
        self.temp_path = self.out_dir / f".{shard_name}{_TEMP_MARK}{os.getpid()}"
        self.num_samples = 0
        self.keys_first: str | None = None
        self.keys_last: str | None = None
        self._keys: set[str] = set()
        self._state = "open"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not overwrite:
            raise FileExistsError(
                errno.EEXIST, f"shard {self.path} already exists (complete); pass overwrite=True to replace it"
            )
        for stale in self.out_dir.glob(f".{shard_name}{_TEMP_MARK}*"):
            stale.unlink(missing_ok=True)
        try:
            self._raw = open(self.temp_path, "wb")  # closed by close() or _abort()
        except OSError as exc:
            raise self._nothing_written(exc, "") from exc
        self._file = _TrackedFile(self._raw)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    # ---- public

    def write(self, sample: Sample | RawSample) -> None:
        """Validate ``sample`` and append its three members. Raises ValueError naming the key and field (the
        shard stays usable), or OSError naming the shard when the file system fails (the shard is discarded)."""
        if self._state != "open":
            raise RuntimeError(f"ShardWriter for {self.path} is {self._state}; it cannot take more samples")
        members = self._encode(sample)
        try:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                # mtime 0: the same samples give byte-identical shards, so reruns can be compared by hash.
                info.mtime = 0
                self._tar.addfile(info, io.BytesIO(data))
        except OSError as exc:
            note = self._abort()
            raise self._nothing_written(exc, note) from exc
        except BaseException:
            # A member may be half written (e.g. KeyboardInterrupt): the shard cannot be completed.
            self._abort()
            raise
        self.num_samples += 1
        self._keys.add(sample.key)
        if self.keys_first is None:
            self.keys_first = sample.key
        self.keys_last = sample.key

    def close(self) -> Path:
        """Finish the archive, fsync it and rename it to ``self.path``; returns that path. Idempotent."""
        if self._state == "closed":
            return self.path
        if self._state != "open":
            raise RuntimeError(f"ShardWriter for {self.path} was {self._state}; nothing was written for this shard")
        try:
            self._tar.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.temp_path, self.path)
        except OSError as exc:
            note = self._abort()
            raise self._nothing_written(exc, note) from exc
        try:
            _fsync_dir(self.out_dir)
        except OSError as exc:
            # The rename may not survive a crash: withdraw the shard rather than report it complete.
            self._state = "aborted"
            self.path.unlink(missing_ok=True)
            raise self._nothing_written(exc, "") from exc
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Discard the shard: close and remove the temporary file; no final file appears."""
        if self._state == "open":
            self._abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    # ---- internals

    def _encode(self, sample: Sample | RawSample) -> list[tuple[str, bytes]]:
        if not isinstance(sample, (Sample, RawSample)):
            raise TypeError(f"shard {self.path}: write() takes a Sample or RawSample, got {type(sample).__name__}")
        key = sample.key
        problem = _validate_key(key)
        if problem:
            raise ValueError(f"shard {self.path}: sample key: {problem}")

        def bad(field: str, what: str) -> ValueError:
            return ValueError(f"shard {self.path}: sample {key!r}: field {field!r}: {what}")

        if key in self._keys:
            raise bad("key", "this key was already written to this shard")

        if isinstance(sample, RawSample):
            if not isinstance(sample.jpeg, (bytes, bytearray, memoryview)):
                raise bad("jpeg", f"must be bytes, got {type(sample.jpeg).__name__}")
            jpeg = bytes(sample.jpeg)
            try:
                image_size = _jpeg_header(jpeg)
            except Exception as exc:  # PIL raises several types for undecodable data
                raise bad("jpeg", f"cannot read the JPEG header: {exc}") from exc
        else:
            image = sample.image
            if isinstance(image, np.ndarray):
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise bad("image", f"numpy image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
                image = Image.fromarray(image)  # uint8 [H, W, 3] maps to mode RGB
            elif isinstance(image, Image.Image):
                if image.mode != "RGB":
                    raise bad("image", f"PIL image must have mode 'RGB', got {image.mode!r} (use .convert('RGB'))")
            else:
                raise bad("image", f"must be a PIL.Image or a uint8 numpy [H, W, 3] array, got {type(image).__name__}")
            image_size = image.size
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=self.jpeg_quality)
            jpeg = buf.getvalue()

        masks = sample.masks
        if not isinstance(masks, np.ndarray):
            raise bad("masks", f"must be a numpy array (e.g. tensor.cpu().numpy()), got {type(masks).__name__}")
        if masks.dtype != np.uint8 or masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
            raise bad("masks", f"must be uint8 [K, S, S], got {masks.dtype} {list(masks.shape)}")

        meta = sample.meta
        if not isinstance(meta, dict):
            raise bad("meta", f"must be a dict, got {type(meta).__name__}")
        where = _unserialisable_field(meta)
        if where:
            raise ValueError(f"shard {self.path}: sample {key!r}: meta is not JSON-serialisable at {where}")
        meta_json = json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        # Validate what the reader will see (tuples become lists), so writer and reader accept the same samples.
        decoded = json.loads(meta_json)
        problem = _meta_problem(decoded)
        if problem:
            raise ValueError(f"shard {self.path}: sample {key!r}: {problem}")
        if list(image_size) != decoded["size"]:
            raise bad("size", f"meta size {decoded['size']} != image size [W, H] = {list(image_size)}")
        k, s = masks.shape[0], masks.shape[1]
        if decoded["mask_size"] != s:
            raise bad("mask_size", f"{decoded['mask_size']} != masks S = {s} (masks {list(masks.shape)})")
        if len(decoded["objects"]) != k:
            raise bad("objects", f"{len(decoded['objects'])} entries but masks hold K = {k} ({list(masks.shape)})")
        return [
            (f"{key}.jpg", jpeg),
            (f"{key}.masks.u8", masks.tobytes(order="C")),
            (f"{key}.json", meta_json.encode("utf-8")),
        ]

    def _abort(self) -> str:
        """Close and remove the temporary file; returns a note when removal itself failed."""
        self._state = "aborted"
        try:
            self._raw.close()
        except OSError:
            pass  # flushing buffered bytes of a discarded shard may fail again (full disk); they are unwanted
        try:
            self.temp_path.unlink(missing_ok=True)
        except OSError as exc:
            return f"; could not remove the temporary file {self.temp_path} ({exc}); it is ignored by readers"
        return ""

    def _nothing_written(self, exc: OSError, note: str) -> OSError:
        msg = (
            f"writing shard {self.path} failed: {exc.strerror or exc}; nothing was written for this shard "
            f"(temporary file {self.temp_path} removed){note}"
        )
        return OSError(exc.errno, msg) if exc.errno is not None else OSError(msg)


# --------------------------------------------------------------------------------------------------
# Reader


def _split_member(name: str) -> tuple[str, str]:
    key, dot, ext = name.partition(".")
    return key, (ext if dot else "")


def _iter_groups(path: Path, read_data: bool) -> Iterator[tuple[str, dict, list[str]]]:
    """Yield (key, {suffix: bytes, or (data offset, size) without read_data}, problems) for each run of
    contiguous members sharing a key.

    Raises ShardError for damage to the tar itself: unreadable, cut short, or a corrupt header (tarfile
    stops silently at a bad header or at a cut between members, so the end-of-archive blocks are checked).
    OSError from opening the file propagates: a missing file is not a malformed shard.
    """
    with open(path, "rb") as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError) as exc:
            raise ShardError(f"{path}: not a readable tar file ({exc})") from exc
        seen: set[str] = set()
        key: str | None = None
        members: dict = {}
        problems: list[str] = []
        count = 0
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, EOFError) as exc:
                raise ShardError(f"{path}: tar is truncated or corrupt after {count} members ({exc})") from exc
            if info is None:
                break
            count += 1
            tf.members.clear()  # tarfile keeps every header; a shard can hold 30k members
            name = info.name
            member_key, ext = _split_member(name)
            if member_key != key:
                if key is not None:
                    yield key, members, problems
                key, members, problems = member_key, {}, []
                if member_key in seen:
                    problems.append("key appears again later in the shard (duplicate key or non-contiguous members)")
                seen.add(member_key)
            if not info.isfile():
                problems.append(f"member {name!r} is not a regular file")
            elif ext not in MEMBERS:
                problems.append(f"unexpected member {name!r} (expected suffixes {list(MEMBERS)})")
            elif ext in members:
                problems.append(f"member {name!r} appears twice")
            elif read_data:
                try:
                    members[ext] = tf.extractfile(info).read()
                except (tarfile.TarError, EOFError) as exc:
                    raise ShardError(f"{path}: tar is truncated inside member {name!r} ({exc})") from exc
            else:
                members[ext] = (info.offset_data, info.size)
        f.seek(tf.offset)
        tail = f.read(_END_OF_ARCHIVE)
        if len(tail) < _END_OF_ARCHIVE or tail.count(0) != _END_OF_ARCHIVE:
            what = "cut short (no end-of-archive blocks)" if len(tail) < _END_OF_ARCHIVE else "corrupt tar header"
            raise ShardError(f"{path}: tar is {what} at byte {tf.offset} after {count} members")
        if key is not None:
            yield key, members, problems


def _sample_problem(key: str, members: dict, problems: list[str]) -> str | None:
    problem = _validate_key(key)
    if problem:
        return problem
    if problems:
        return "; ".join(problems)
    missing = [f"{key}.{ext}" for ext in MEMBERS if ext not in members]
    if missing:
        return f"missing member(s) {missing}"
    return None


def _build_sample(path: Path, key: str, members: dict, problems: list[str], decode: bool) -> Sample | RawSample:
    def fail(what: str) -> ShardError:
        return ShardError(f"{path}: sample {key!r}: {what}")

    problem = _sample_problem(key, members, problems)
    if problem:
        raise fail(problem)
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"{key}.json is not valid UTF-8 JSON ({exc})") from exc
    problem = _meta_problem(meta)
    if problem:
        raise fail(problem)
    k, s = len(meta["objects"]), meta["mask_size"]
    raw_masks = members["masks.u8"]
    if len(raw_masks) != k * s * s:
        raise fail(f"{key}.masks.u8 holds {len(raw_masks)} bytes, expected K*S*S = {k}*{s}*{s} = {k * s * s}")
    # Copy so callers may augment the masks in place (frombuffer over bytes is read-only).
    masks = np.frombuffer(raw_masks, dtype=np.uint8).reshape(k, s, s).copy()
    jpeg = members["jpg"]
    want = tuple(meta["size"])
    try:
        if decode:
            im = Image.open(io.BytesIO(jpeg))
            if im.format != "JPEG":
                raise ValueError(f"not a JPEG (PIL reads format {im.format!r})")
            im.load()  # decodes now, so corrupt data is reported here with the key, not later in a loader
            image = im if im.mode == "RGB" else im.convert("RGB")  # grayscale/CMYK JPEGs from other tools
            got = image.size
        else:
            got = _jpeg_header(jpeg)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for corrupt data
        raise fail(f"{key}.jpg does not decode as a JPEG ({type(exc).__name__}: {exc})") from exc
    if got != want:
        raise fail(f"image size [W, H] = {list(got)} != meta size {list(want)}")
    if decode:
        return Sample(key, image, masks, meta)
    return RawSample(key, jpeg, masks, meta)


class ShardReader:
    """Iterates the samples of one or more shard files, in order, validating each.

    Yields ``Sample`` (image decoded to PIL RGB) or, with ``decode=False``, ``RawSample`` (JPEG bytes; only
    the JPEG header is parsed, to check the size). A bad sample raises ``ShardError`` naming the shard and
    the key; a damaged tar raises ``ShardError`` naming the shard (samples before the damage were already
    yielded). With ``skip_bad=True`` both are skipped and recorded in ``bad_samples`` / ``bad_shards``.
    Single pass, like a file: ``for s in ShardReader(paths): ...``.
    """

    def __init__(
        self, shards: str | os.PathLike | Iterable[str | os.PathLike], *, skip_bad: bool = False, decode: bool = True
    ):
        if isinstance(shards, (str, os.PathLike)):
            shards = [shards]
        self.shards = [Path(p) for p in shards]
        self.skip_bad = bool(skip_bad)
        self.decode = bool(decode)
        self.num_samples = 0  # valid samples yielded so far
        self.bad_samples: list[BadSample] = []
        self.bad_shards: list[BadShard] = []
        self._it = self._iterate()

    @classmethod
    def from_dir(cls, out_dir: str | os.PathLike, *, skip_bad: bool = False, decode: bool = True) -> ShardReader:
        """Reader over every complete shard of a directory (``scan_shards`` order)."""
        out_dir = Path(out_dir)
        return cls([out_dir / f"{n}{SHARD_SUFFIX}" for n in scan_shards(out_dir)], skip_bad=skip_bad, decode=decode)

    @property
    def skipped(self) -> int:
        """Number of bad samples skipped (``skip_bad=True``); damaged shards are counted in ``bad_shards``."""
        return len(self.bad_samples)

    @property
    def skipped_keys(self) -> list[str]:
        return [b.key for b in self.bad_samples]

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> Sample | RawSample:
        return next(self._it)

    def close(self) -> None:
        """Stop early and close the open shard file."""
        self._it.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _iterate(self) -> Iterator[Sample | RawSample]:
        for path in self.shards:
            try:
                for key, members, problems in _iter_groups(path, read_data=True):
                    try:
                        sample = _build_sample(path, key, members, problems, self.decode)
                    except ShardError as exc:
                        if not self.skip_bad:
                            raise
                        self.bad_samples.append(BadSample(str(path), key, str(exc)))
                        continue
                    self.num_samples += 1
                    yield sample
            except ShardError as exc:
                # Only shard-level damage gets here with skip_bad (sample errors are caught above).
                if not self.skip_bad:
                    raise
                self.bad_shards.append(BadShard(str(path), str(exc)))


def read_shard(path: str | os.PathLike, *, skip_bad: bool = False, decode: bool = True) -> ShardReader:
    """Iterate the samples of one shard file (see ``ShardReader``; the returned reader holds the skip counts)."""
    return ShardReader([path], skip_bad=skip_bad, decode=decode)


def shard_keys(path: str | os.PathLike) -> list[str]:
    """Keys of a shard in order, from the tar headers only (no image decoding, data blocks are seeked over).

    Checks the structure (three members per key, contiguous, no duplicates, intact tar); raises ShardError
    naming the shard and key otherwise. Used by ``update_index``; full validation is ``read_shard``.
    """
    path = Path(path)
    keys = []
    for key, members, problems in _iter_groups(path, read_data=False):
        problem = _sample_problem(key, members, problems)
        if problem:
            raise ShardError(f"{path}: sample {key!r}: {problem}")
        keys.append(key)
    return keys


# --------------------------------------------------------------------------------------------------
# Shard directory: listing, index.json, verification


def scan_shards(out_dir: str | os.PathLike) -> list[str]:
    """Names (without ``.tar``) of the complete shards in ``out_dir``, sorted; temporary files are ignored."""
    names = []
    with os.scandir(out_dir) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.name.endswith(SHARD_SUFFIX):
                continue
            if entry.is_file():
                names.append(entry.name[: -len(SHARD_SUFFIX)])
    return sorted(names)


def temp_files(out_dir: str | os.PathLike) -> list[str]:
    """Temporary shard files in ``out_dir`` (shards being written, or left by a killed run), sorted."""
    with os.scandir(out_dir) as it:
        return sorted(e.name for e in it if e.name.startswith(".") and _TEMP_MARK in e.name)


def _shard_stats(out_dir: Path) -> dict[str, tuple[int, int]]:
    """{shard name: (bytes, mtime_ns)} of the complete shards; a changed pair means a changed file."""
    stats = {}
    for name in scan_shards(out_dir):
        try:
            st = os.stat(out_dir / f"{name}{SHARD_SUFFIX}")
        except FileNotFoundError:
            continue  # removed between listing and stat; the caller re-lists
        stats[name] = (st.st_size, st.st_mtime_ns)
    return stats


def _index_problem(index: Any) -> str | None:
    if not isinstance(index, dict):
        return f"must be a JSON object, got {type(index).__name__}"
    for field in ("version", "shards", "num_samples", "generator", "created"):
        if field not in index:
            return f"missing key {field!r}"
    if index["version"] != FORMAT_VERSION or not _is_int(index["version"]):
        return f"key 'version' is {index['version']!r}; this code reads version {FORMAT_VERSION}"
    if not isinstance(index["generator"], dict):
        return f"key 'generator' must be an object, got {type(index['generator']).__name__}"
    if not isinstance(index["created"], str):
        return f"key 'created' must be a string, got {index['created']!r}"
    if not isinstance(index["shards"], list):
        return f"key 'shards' must be a list, got {type(index['shards']).__name__}"
    names = set()
    total = 0
    for i, shard in enumerate(index["shards"]):
        where = f"shards[{i}]"
        if not isinstance(shard, dict):
            return f"key {where!r} must be an object"
        for field in ("name", "num_samples", "keys_first", "keys_last"):
            if field not in shard:
                return f"key '{where}.{field}' missing"
        name = shard["name"]
        if not isinstance(name, str) or not _SHARD_NAME_RE.match(name):
            return f"key '{where}.name' is not a shard name: {name!r}"
        if name in names:
            return f"shard {name!r} listed twice"
        names.add(name)
        n = shard["num_samples"]
        if not (_is_int(n) and n >= 0):
            return f"key '{where}.num_samples' must be an int >= 0, got {n!r}"
        for field in ("keys_first", "keys_last"):
            v = shard[field]
            if (n == 0 and v is not None) or (n > 0 and _validate_key(v)):
                return f"key '{where}.{field}' must be a sample key (null for an empty shard), got {v!r}"
        for field in ("bytes", "mtime_ns"):
            if field in shard and not _is_int(shard[field]):
                return f"key '{where}.{field}' must be an int, got {shard[field]!r}"
        total += n
    if not _is_int(index["num_samples"]) or index["num_samples"] != total:
        return f"key 'num_samples' is {index['num_samples']!r} but the shards sum to {total}"
    if "num_shards" in index and index["num_shards"] != len(index["shards"]):
        return f"key 'num_shards' is {index['num_shards']!r} but {len(index['shards'])} shards are listed"
    return None


def read_index(out_dir: str | os.PathLike) -> dict:
    """Load and validate ``out_dir/index.json``; ValueError naming the file and key when it is malformed."""
    path = Path(out_dir) / INDEX_NAME
    with open(path, "rb") as f:
        data = f.read()
    try:
        index = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({exc})") from exc
    problem = _index_problem(index)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return index


def write_index(out_dir: str | os.PathLike, index: dict) -> None:
    """Validate ``index`` and write it to ``out_dir/index.json`` atomically.

    Format (version 1): ``{version, created, updated?, num_samples, num_shards?, generator: {...},
    shards: [{name, num_samples, keys_first, keys_last, bytes?, mtime_ns?}]}``; one entry per shard keeps
    the file small for 1M samples (keys are contiguous ranges when generation writes them in order).
    """
    path = Path(out_dir) / INDEX_NAME
    where = _unserialisable_field(index, "index")
    if where:
        raise ValueError(f"{path}: not JSON-serialisable: {where}")
    index = json.loads(json.dumps(index))
    problem = _index_problem(index)
    if problem:
        raise ValueError(f"{path}: refusing to write an invalid index: {problem}")
    atomic_write_bytes(path, (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def update_index(out_dir: str | os.PathLike, generator_config: dict) -> dict:
    """Rebuild ``out_dir/index.json`` from the complete shards on disk and return it.

    Call after each completed shard. Shards already in the index with unchanged (bytes, mtime_ns) are taken
    from it; new ones are read from their tar headers (``shard_keys``). The result is built from the directory
    listing, never from memory, and after writing the directory is listed again and the index rebuilt if
    another rank completed a shard meanwhile, so concurrent ranks never drop each other's shards.

    Raises ValueError if the existing index was made by a different ``generator_config`` (one directory holds
    one generated data set), ShardError if a complete shard is damaged.
    """
    out_dir = Path(out_dir)
    where = _unserialisable_field(generator_config, "generator_config")
    if not isinstance(generator_config, dict) or where:
        raise ValueError(f"generator_config must be a JSON-serialisable dict ({where or type(generator_config)})")
    generator = json.loads(json.dumps(generator_config))
    index_path = out_dir / INDEX_NAME
    for _ in range(_MAX_INDEX_ATTEMPTS):
        listing = _shard_stats(out_dir)
        old = None
        if index_path.exists():
            try:
                old = read_index(out_dir)
            except ValueError:
                old = None  # a damaged index is what this call repairs; verify_dir reports it
        if old is not None and old["generator"] != generator:
            keys = sorted(
                k
                for k in set(old["generator"]) | set(generator)
                if old["generator"].get(k, "<absent>") != generator.get(k, "<absent>")
            )
            raise ValueError(
                f"{index_path}: was written for a different generator config (differing keys {keys}); a shard "
                f"directory holds one generated data set: use a new directory or the same config"
            )
        cached = {s["name"]: s for s in old["shards"]} if old else {}
        shards = []
        vanished = False
        for name, (size, mtime_ns) in sorted(listing.items()):
            entry = cached.get(name)
            if entry is None or entry.get("bytes") != size or entry.get("mtime_ns") != mtime_ns:
                try:
                    keys = shard_keys(out_dir / f"{name}{SHARD_SUFFIX}")
                except FileNotFoundError:
                    vanished = True
                    break
                entry = {
                    "name": name,
                    "num_samples": len(keys),
                    "keys_first": keys[0] if keys else None,
                    "keys_last": keys[-1] if keys else None,
                    "bytes": size,
                    "mtime_ns": mtime_ns,
                }
            shards.append(entry)
        if vanished:
            continue
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        index = {
            "version": FORMAT_VERSION,
            "created": old["created"] if old else now,
            "updated": now,
            "num_samples": sum(s["num_samples"] for s in shards),
            "num_shards": len(shards),
            "generator": generator,
            "shards": shards,
        }
        write_index(out_dir, index)
        if _shard_stats(out_dir) == listing:
            return index
    raise RuntimeError(
        f"{index_path}: the set of shards kept changing over {_MAX_INDEX_ATTEMPTS} rebuilds; call update_index again"
    )


def verify_dir(out_dir: str | os.PathLike) -> dict:
    """Read and validate every sample of every complete shard in ``out_dir`` (images decoded) and report.

    Returns a JSON-serialisable dict: ``ok`` (no bad sample or shard, no duplicate key, index consistent),
    ``num_shards``, ``num_samples`` (valid samples), ``num_unique_keys``, ``duplicate_keys`` ({key: [shard
    names]} for keys in more than one shard; a key repeated inside one shard is a bad sample),
    ``bad_samples`` [{shard, key, error}], ``bad_shards`` [{shard, error}], ``index_problems`` [str],
    ``temp_files`` [names] (not an error: a run may be writing, or a killed run left them).
    """
    out_dir = Path(out_dir)
    names = scan_shards(out_dir)
    first_shard: dict[str, int] = {}  # key -> index into names (ints keep 1M keys cheap)
    duplicates: dict[str, list[int]] = {}
    counts: dict[str, tuple[int, str | None, str | None]] = {}
    bad_samples: list[dict] = []
    bad_shards: list[dict] = []
    for i, name in enumerate(names):
        reader = read_shard(out_dir / f"{name}{SHARD_SUFFIX}", skip_bad=True)
        keys_first = keys_last = None
        n = 0
        for sample in reader:
            n += 1
            keys_first = keys_first or sample.key
            keys_last = sample.key
            j = first_shard.setdefault(sample.key, i)
            if j != i:
                duplicates.setdefault(sample.key, [j]).append(i)
        counts[name] = (n, keys_first, keys_last)
        bad_samples += [{"shard": name, "key": b.key, "error": b.error} for b in reader.bad_samples]
        bad_shards += [{"shard": name, "error": b.error} for b in reader.bad_shards]

    index_problems = []
    if not (out_dir / INDEX_NAME).exists():
        index_problems.append(f"{out_dir / INDEX_NAME} is missing")
    else:
        try:
            index = read_index(out_dir)
        except ValueError as exc:
            index_problems.append(str(exc))
        else:
            listed = {s["name"]: s for s in index["shards"]}
            for name in sorted(set(listed) - set(counts)):
                index_problems.append(f"index lists shard {name!r}, which is not in the directory")
            for name in sorted(set(counts) - set(listed)):
                index_problems.append(f"shard {name!r} is not in the index")
            bad_shard_names = {b["shard"] for b in bad_shards} | {b["shard"] for b in bad_samples}
            for name in sorted(set(counts) & set(listed)):
                got = counts[name]
                want = (listed[name]["num_samples"], listed[name]["keys_first"], listed[name]["keys_last"])
                if got != want and name not in bad_shard_names:
                    index_problems.append(
                        f"shard {name!r}: index says (num_samples, keys_first, keys_last) = {want}, "
                        f"the shard holds {got}"
                    )

    report = {
        "out_dir": str(out_dir),
        "num_shards": len(names),
        "num_samples": sum(c[0] for c in counts.values()),
        "num_unique_keys": len(first_shard),
        "duplicate_keys": {k: [names[i] for i in v] for k, v in sorted(duplicates.items())},
        "bad_samples": bad_samples,
        "bad_shards": bad_shards,
        "index_problems": index_problems,
        "temp_files": temp_files(out_dir),
    }
    report["ok"] = not (duplicates or bad_samples or bad_shards or index_problems)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m freeatm_fast.data.shards", description="validate a shard directory (DESIGN §5)"
    )
    parser.add_argument("out_dir", help="directory with NAME.tar shards and index.json")
    args = parser.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        print(f"error: {args.out_dir} is not a directory", file=sys.stderr)
        return 2
    report = verify_dir(args.out_dir)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
