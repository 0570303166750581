"""Gemma 4 tokenizer.json from a llama.cpp GGUF vocabulary.

No Gemma 4 tokenizer can be downloaded here, but llama.cpp ships the real vocabulary
(`models/ggml-vocab-gemma-4.gguf`: 262144 tokens, 514906 merges, token types). This module turns it into
a Hugging Face `tokenizers` tokenizer with the layout llama.cpp documents for Gemma 4 (src/llama-vocab.cpp,
LLAMA_VOCAB_PRE_TYPE_GEMMA4): spaces become "▁", the text is split into runs of newlines and runs of
everything else, BPE merges run on raw UTF-8 with <0xXX> byte fallback, and `<bos>` is prepended.
tests/test_tokenizer.py checks it against llama.cpp's own encoding of its vocabulary test set.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from g4c.errors import G4CError

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


# GGUF metadata value types (gguf.GGUFValueType): fixed sizes of the scalars, then STRING and ARRAY.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_READER_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError)


def check_gguf(path: Path) -> None:
    """Refuse, in one line and in about a second, a file that is not a complete GGUF file: walk its
    header, key/value metadata and tensor infos (no values kept) and check that everything the header
    promises — each string and array, each tensor's data — lies inside the file. gguf's reader
    memory-maps the file without this check: on a truncated vocabulary it builds a numpy view per
    string (1.3 GB, half a minute) before failing with an IndexError."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise G4CError(f"{path}: not a regular file (a GGUF vocabulary file is expected)")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise G4CError(f"{path}: not a readable GGUF file (it has {size} bytes; a GGUF header alone has 24)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk_gguf(path, data, size)
    except RecursionError:  # arrays nested thousands deep
        raise G4CError(f"{path}: not a readable GGUF file (arrays nested too deep)") from None
    except PermissionError:
        raise G4CError(f"{path}: permission denied") from None
    except FileNotFoundError:
        raise G4CError(f"{path}: no such file") from None
    except OSError as exc:
        raise G4CError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _walk_gguf(path: Path, data, size: int) -> None:
    if data[:4] != b"GGUF":
        raise G4CError(f"{path}: not a readable GGUF file (it does not start with the GGUF magic)")
    order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # byte-swapped files exist
    u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def need(offset: int, nbytes: int, what: str) -> None:
        if offset + nbytes > size:
            raise G4CError(f"{path}: not a readable GGUF file (truncated: {what} at byte {offset} needs {nbytes} "
                           f"bytes, but the file ends at byte {size})")

    def string(offset: int, what: str) -> int:
        need(offset, 8, what)
        n = u64.unpack_from(data, offset)[0]
        need(offset + 8, n, what)
        return offset + 8 + n

    def value(offset: int, kind: int, what: str) -> int:
        if kind in _SCALAR_BYTES:
            need(offset, _SCALAR_BYTES[kind], what)
            return offset + _SCALAR_BYTES[kind]
        if kind == _STRING:
            return string(offset, what)
        if kind == _ARRAY:
            need(offset, 12, what)
            item, count = u32.unpack_from(data, offset)[0], u64.unpack_from(data, offset + 4)[0]
            offset += 12
            if item in _SCALAR_BYTES:
                need(offset, count * _SCALAR_BYTES[item], f"{what} ({count} values)")
                return offset + count * _SCALAR_BYTES[item]
            need(offset, count * 8, f"{what} ({count} values)")  # a string or array takes 8 bytes at least
            for _ in range(count):
                offset = value(offset, item, what)
            return offset
        raise G4CError(f"{path}: not a readable GGUF file ({what} has unknown value type {kind})")

    tensors, kvs = u64.unpack_from(data, 8)[0], u64.unpack_from(data, 16)[0]
    offset, alignment = 24, 32
    need(offset, kvs * 12, f"{kvs} metadata entries")
    for _ in range(kvs):
        start = offset
        offset = string(offset, "a metadata key")
        key = bytes(data[start + 8: offset]).decode("utf-8", "replace")
        need(offset, 4, f"metadata {key}")
        kind = u32.unpack_from(data, offset)[0]
        if key == "general.alignment" and kind == _UINT32:
            need(offset + 4, 4, f"metadata {key}")
            alignment = u32.unpack_from(data, offset + 4)[0] or 32
        offset = value(offset + 4, kind, f"metadata {key}")
    need(offset, tensors * 24, f"{tensors} tensor infos")
    extents = []
    for _ in range(tensors):
        start = offset
        offset = string(offset, "a tensor name")
        name = bytes(data[start + 8: offset]).decode("utf-8", "replace")
        need(offset, 4, f"tensor {name}")
        dims = u32.unpack_from(data, offset)[0]
        if dims > 8:  # GGML tensors have at most 4
            raise G4CError(f"{path}: not a readable GGUF file (tensor {name} has {dims} dimensions)")
        need(offset + 4, 8 * dims + 12, f"tensor {name}")
        shape = struct.unpack_from(f"{order}{dims}Q", data, offset + 4)
        kind = u32.unpack_from(data, offset + 4 + 8 * dims)[0]
        start_of_data = u64.unpack_from(data, offset + 8 + 8 * dims)[0]
        offset += 16 + 8 * dims
        extents.append((name, start_of_data, shape, kind))
    offset += -offset % alignment
    for name, start_of_data, shape, kind in extents:
        count = 1
        for d in shape:
            count *= d
        nbytes = _tensor_bytes(kind, count)
        if nbytes is not None:
            need(offset + start_of_data, nbytes, f"the data of tensor {name}")


def _tensor_bytes(kind: int, count: int) -> int | None:
    """Bytes of `count` elements of GGML type `kind` (None when this gguf version does not know it)."""
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        return None
    return count * type_size // block


def read_gguf_vocab(path: Path) -> dict:
    """tokens, token types, merges and special ids of a GGUF file (needs the `gguf` package)."""
    try:
        import gguf
    except ImportError as exc:
        raise G4CError("reading a GGUF vocabulary needs the `gguf` package (pip install gguf)") from exc
    check_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except _READER_ERRORS as exc:
        raise G4CError(f"{path}: not a readable GGUF file ({exc})") from None

    def field(name: str):
        if name not in reader.fields:
            raise G4CError(f"{path}: GGUF has no {name}; it is not a tokenizer vocabulary")
        return reader.fields[name]

    def strings(name: str) -> list[str]:
        f = field(name)
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(name: str) -> int:
        f = field(name)
        return int(f.parts[f.data[0]][0])

    try:
        types = field("tokenizer.ggml.token_type")
        vocab = {
            "tokens": strings("tokenizer.ggml.tokens"),
            "types": [int(types.parts[i][0]) for i in types.data],
            "merges": strings("tokenizer.ggml.merges"),
            "bos": scalar("tokenizer.ggml.bos_token_id"),
            "unk": scalar("tokenizer.ggml.unknown_token_id"),
        }
    except _READER_ERRORS as exc:  # a field of the wrong type (e.g. numbers where strings belong)
        raise G4CError(f"{path}: not a valid GGUF vocabulary ({exc})") from None
    n = len(vocab["tokens"])
    if len(vocab["types"]) != n:
        raise G4CError(f"{path}: {len(vocab['types'])} token types for {n} tokens")
    for name in ("bos", "unk"):
        if not 0 <= vocab[name] < n:
            raise G4CError(f"{path}: {name} token id {vocab[name]} is outside the vocabulary (0..{n - 1})")
    return vocab


def tokenizer_from_gguf(path: Path) -> Tokenizer:
    """A Gemma 4 BPE tokenizer built from the vocabulary stored in a GGUF file."""
    vocab = read_gguf_vocab(Path(path))
    tokens = vocab["tokens"]
    try:
        model = BPE(vocab={t: i for i, t in enumerate(tokens)},
                    merges=[tuple(m.split(" ", 1)) for m in vocab["merges"]],
                    unk_token=tokens[vocab["unk"]], fuse_unk=True, byte_fallback=True)
    except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise G4CError(f"{path}: not a valid BPE vocabulary ({exc})") from None
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    # llama.cpp: "[^\n]+|[\n]+" — BPE never merges across a newline boundary.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, vocab["types"]) if ty == _CONTROL]
    visible = [AddedToken(t, special=False, normalized=False)
               for t, ty in zip(tokens, vocab["types"]) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(visible)
    bos = tokens[vocab["bos"]]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                        special_tokens=[(bos, vocab["bos"])])
    return tok


def write_tokenizer_json(gguf_path: Path, output: Path) -> Path:
    """Convert and save atomically; returns the written path."""
    from g4c.atomic import atomic_file

    tok = tokenizer_from_gguf(gguf_path)
    with atomic_file(Path(output)) as tmp:
        tok.save(str(tmp))
    return Path(output)
