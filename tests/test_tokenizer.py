"""Gemma 4 tokenizer.json from a GGUF vocabulary: a small vocabulary written with gguf's own writer (CI),
and llama.cpp's real Gemma 4 vocabulary against llama.cpp's encodings of its test strings (slow; needs
benchmarks/setup_llama_cpp.sh)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from g4c.cli import main
from g4c.tokenizer import tokenizer_from_gguf

gguf = pytest.importorskip("gguf")

LLAMA_MODELS = Path(os.environ.get("G4C_CACHE", Path.home() / ".cache" / "g4c")) / \
    "llama-cpp-python-0.3.36" / "vendor" / "llama.cpp" / "models"

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "\n", "he", "ll", "hell", "hello", "▁w", "▁wo", "▁wor", "▁worl",
          "▁world", "\n\n"]
MERGES = ["h e", "\n \n", "l l", "he ll", "hell o", "▁ w", "▁w o", "▁wo r", "▁wor l", "▁worl d"]


def write_vocab(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "gemma4")
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(SPECIAL + BYTES + PIECES)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.BYTE] * 256
                           + [gguf.TokenType.NORMAL] * len(PIECES))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def ids(*pieces: str) -> list[int]:
    vocab = SPECIAL + BYTES + PIECES
    return [vocab.index(p) for p in pieces]


def test_bpe_merges_spaces_newlines_and_byte_fallback(tmp_path):
    tok = tokenizer_from_gguf(write_vocab(tmp_path / "v.gguf"))
    assert tok.encode("hello world").ids == ids("<bos>", "hello", "▁world")
    assert tok.encode("hello\n\nworld", add_special_tokens=False).ids == ids("hello", "\n\n", "w", "o", "r", "l", "d")
    # "é" is not in the vocabulary: its two UTF-8 bytes become byte tokens
    assert tok.encode("hé", add_special_tokens=False).ids == ids("h", "<0xC3>", "<0xA9>")
    assert tok.decode(tok.encode("hello world hé\n").ids, skip_special_tokens=True) == "hello world hé\n"


def test_cli_writes_tokenizer_into_a_checkpoint_directory(tmp_path, capsys):
    vocab = write_vocab(tmp_path / "v.gguf")
    (tmp_path / "ckpt").mkdir()
    assert main(["tokenizer", str(vocab), "-o", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert main(["tokenizer", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "t.json")]) == 1
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert main(["tokenizer", str(tmp_path / "junk.gguf"), "-o", str(tmp_path / "t.json")]) == 1
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (LLAMA_MODELS / "ggml-vocab-gemma-4.gguf").is_file(),
                    reason="needs llama.cpp's vocabulary: bash benchmarks/setup_llama_cpp.sh")
def test_real_gemma4_vocabulary_matches_llama_cpp():
    tok = tokenizer_from_gguf(LLAMA_MODELS / "ggml-vocab-gemma-4.gguf")
    assert tok.get_vocab_size() == 262144
    texts = (LLAMA_MODELS / "ggml-vocab-gemma-4.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (LLAMA_MODELS / "ggml-vocab-gemma-4.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) >= 40
    for text, want in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False).ids == [int(t) for t in want.split()], repr(text)
