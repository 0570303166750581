"""Gemma 4 tokenizer.json from a llama.cpp GGUF vocabulary.

No Gemma 4 tokenizer can be downloaded here, but llama.cpp ships the real vocabulary
(`models/ggml-vocab-gemma-4.gguf`: 262144 tokens, 514906 merges, token types). This module turns it into
a Hugging Face `tokenizers` tokenizer with the layout llama.cpp documents for Gemma 4 (src/llama-vocab.cpp,
LLAMA_VOCAB_PRE_TYPE_GEMMA4): spaces become "▁", the text is split into runs of newlines and runs of
everything else, BPE merges run on raw UTF-8 with <0xXX> byte fallback, and `<bos>` is prepended.
tests/test_tokenizer.py checks it against llama.cpp's own encoding of its vocabulary test set.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from g4c.errors import G4CError

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def read_gguf_vocab(path: Path) -> dict:
    """tokens, token types, merges and special ids of a GGUF file (needs the `gguf` package)."""
    try:
        import gguf
    except ImportError as exc:
        raise G4CError("reading a GGUF vocabulary needs the `gguf` package (pip install gguf)") from exc
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise G4CError(f"{path}: not a readable GGUF file ({exc})") from exc

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

    types = field("tokenizer.ggml.token_type")
    return {
        "tokens": strings("tokenizer.ggml.tokens"),
        "types": [int(types.parts[i][0]) for i in types.data],
        "merges": strings("tokenizer.ggml.merges"),
        "bos": scalar("tokenizer.ggml.bos_token_id"),
        "unk": scalar("tokenizer.ggml.unknown_token_id"),
    }


def tokenizer_from_gguf(path: Path) -> Tokenizer:
    """A Gemma 4 BPE tokenizer built from the vocabulary stored in a GGUF file."""
    vocab = read_gguf_vocab(Path(path))
    tokens = vocab["tokens"]
    model = BPE(vocab={t: i for i, t in enumerate(tokens)},
                merges=[tuple(m.split(" ", 1)) for m in vocab["merges"]],
                unk_token=tokens[vocab["unk"]], fuse_unk=True, byte_fallback=True)
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
