"""The one validation path of the LLaVA readers: JSON files, images and webdataset tar shards.

Both reader families (``data.formats``: decoded samples; ``data.llava``: training records) read their inputs
through these three functions, so a file that one of them rejects the other rejects with the same reason:

* :func:`read_json_file`: UTF-8 JSON (a UTF-8 byte-order mark is accepted); otherwise ``DataFileError`` naming
  the file, and for bad encodings the byte offset.
* :func:`decode_image`: a full decode to 8-bit RGB (so truncated files fail here, not in a training step);
  otherwise ``ImageError`` saying why. Decompression bombs (Pillow's ``DecompressionBombWarning`` /
  ``DecompressionBombError``, over ``Image.MAX_IMAGE_PIXELS``) are refused too. 16-bit greyscale images are scaled
  to 8 bits (Pillow's own ``convert("RGB")`` clips them, which turns most of them white); 32-bit integer and float
  images are refused, since their range is unknown.
* :func:`iter_shard`: the samples of a local webdataset ``.tar`` (members grouped by the name before the first dot
  of the base name, as webdataset does); a shard that is truncated or corrupt anywhere, inside a header or inside
  member data, raises ``ShardError`` naming the shard and the byte offset, after the samples read before the
  damage have been yielded (readers that skip bad input keep them and count the loss).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["DataFileError", "ImageError", "ShardError", "read_json_file", "decode_image", "to_rgb8", "iter_shard"]

_BLOCK = 512  # tar block size
# What Pillow's decoders raise on malformed or truncated data (it does not wrap them in one exception type).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, zlib.error)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / extension split


class DataFileError(ValueError):
    """A whole input file is unusable; the message names it."""


class ImageError(ValueError):
    """An image cannot be used; the message says why (callers prefix the file, record and field)."""


class ShardError(ValueError):
    """A webdataset shard is truncated or corrupt: ``shard`` is its path, ``offset`` the byte where it breaks."""

    def __init__(self, shard: str, offset: int, problem: str) -> None:
        self.shard, self.offset, self.problem = shard, offset, problem
        super().__init__(f"{shard}: {problem}")


def read_json_file(path: str | os.PathLike) -> Any:
    """Parse a UTF-8 JSON file; ``FileNotFoundError`` if missing, ``DataFileError`` naming the file otherwise."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFileError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); JSON files must be saved as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise DataFileError(f"{path}: JSON nested too deeply to parse") from None


def to_rgb8(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image``; 16-bit greyscale is scaled (not clipped), 32-bit modes are refused."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)
        # 65535 -> 255 with rounding; Pillow's own conversion clips at 255 instead, so most pixels turn white.
        narrow = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(narrow, mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        kind = "integer" if image.mode == "I" else "floating-point"
        raise ImageError(f"has 32-bit {kind} pixels (mode {image.mode}) of unknown range; save it as 8- or 16-bit")
    return image.convert("RGB")


def decode_image(source: bytes | str | os.PathLike, *, reduced: bool = False) -> Image.Image:
    """Decode ``source`` (bytes or a path) completely into an 8-bit RGB image, or raise ``ImageError``.

    ``reduced=True`` lets JPEGs decode at 1/8 scale (the whole entropy-coded stream is still read, so truncation is
    still found) for cheap up-front checks; other formats decode at full size either way.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a skip-able error is wanted for both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                if reduced and image.format == "JPEG":
                    image.draft("RGB", (1, 1))
                image.load()
                return to_rgb8(image)
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageError(f"is too large to decode safely ({type(err).__name__}: {err})") from None
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot be decoded ({type(err).__name__}: {err})") from None


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of a local tar shard, in file order; ``ShardError`` on damage.

    Extensions are lower-cased; members without an extension and non-file members (directories, links) are
    ignored, as webdataset does. A repeated extension within one sample is damage too (webdataset refuses it).
    Compressed shards (``.tar.gz`` etc.) are read too; byte offsets then count in the uncompressed tar.
    """
    path = str(path)
    try:
        tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(path, 0, f"not a readable tar file ({err}); it is empty, truncated or not a tar") from None
    key: str | None = None
    members: dict[str, bytes] = {}
    with tar:
        stream = tar.fileobj  # the (decompressed) tar bytes
        # A plain file's size bounds every member: a header claiming more is damage, found before reading it.
        size = os.path.getsize(path) if isinstance(stream, io.BufferedReader) else None
        while True:
            offset = tar.offset
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError, OSError) as err:
                raise ShardError(path, offset, f"corrupt tar header at byte {offset} ({err})") from None
            if info is None:
                break
            if not info.isfile():
                continue
            match = _KEY_EXT.match(info.name)
            if match is None:
                continue
            name, ext = match.group(1), match.group(2).lower()
            end = info.offset_data + info.size
            if size is not None and end > size:
                raise ShardError(
                    path, size, f"truncated: member {info.name!r} needs bytes up to {end} but the file has {size}"
                )
            try:
                payload = tar.extractfile(info).read()  # type: ignore[union-attr]
            except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
                raise ShardError(path, info.offset_data, f"member {info.name!r} cannot be read ({err})") from None
            if name != key:
                if key is not None:
                    yield key, members
                key, members = name, {}
            if ext in members:
                raise ShardError(path, info.offset, f"member {info.name!r} repeats extension {ext!r} of sample {key!r}")
            members[ext] = payload
        # tarfile stops quietly at a header it cannot read past the first one; a sound shard has only zero
        # blocks (the end-of-archive marker) after its last member.
        stop = tar.offset
        trailer = _zero_trailer(stream, stop)
    if trailer < _BLOCK:
        what = "ends without the end-of-archive marker" if trailer == 0 else "is truncated or corrupt"
        raise ShardError(path, stop, f"{what} at byte {stop} (inside or after the last tar header)")
    if key is not None:
        yield key, members


def _zero_trailer(stream: Any, start: int) -> int:
    """How many bytes follow ``start`` if all are zero, else -1 (read in chunks: a damaged shard may be large)."""
    try:
        stream.seek(start)
        total = 0
        while chunk := stream.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return -1
            total += len(chunk)
    except (EOFError, OSError, zlib.error):  # a compressed shard cut short
        return -1
    return total
