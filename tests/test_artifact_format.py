"""The artifact format refuses what it cannot trust: a damaged or hostile manifest or tensor file is
one `ArtifactError` line — never a traceback, a read outside the artifact, a foreign library loaded
or out-of-bounds memory — and generation ends cleanly at the context limit."""

from __future__ import annotations

import copy
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from g4c.artifact import ArtifactError, Manifest, read_aligned_safetensors, sha256_file
from g4c.runtime import load


@pytest.fixture(scope="module")
def manifest_json(artifacts) -> dict:
    return json.loads((artifacts["e"] / "manifest.json").read_text())


def _mutated(artifacts, tmp_path, family: str, mutate) -> str:
    art = tmp_path / "art"
    shutil.copytree(artifacts[family], art)
    manifest = json.loads((art / "manifest.json").read_text())
    mutate(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))
    return str(art)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "g4c.cli", *args], capture_output=True, text=True, timeout=300)


HOSTILE = {
    "library outside": lambda m: m.update(library="../../evil.so"),
    "absolute library": lambda m: m.update(library="/tmp/evil.so"),
    "file outside": lambda m: m["files"].update({"../../../../etc/passwd": "0" * 64}),
    "no files": lambda m: m.pop("files"),
    "weights not hashed": lambda m: m["files"].pop("weights.safetensors"),
    "runtime library outside": lambda m: m.update(runtime_libraries=["../../x.so"]),
    "negative window": lambda m: [s.update(window=-3) for s in m["kv_slots"].values() if s["ring"]],
    "ring without window": lambda m: [s.update(window=None) for s in m["kv_slots"].values() if s["ring"]],
    "kv heads as text": lambda m: [s.update(kv_heads="2") for s in m["kv_slots"].values()],
    "unknown kernel": lambda m: m["programs"]["decode"]["steps"][0].update(kernel="evil"),
    "unknown buffer": lambda m: m["programs"]["decode"]["steps"][0].update(args=["w:../../x"]),
    "an array": lambda m: m.clear(),
    "unknown field": lambda m: m.update(surprise=1),
    "two PLE tables": lambda m: m.update(host_tables=["a", "b"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifest_is_one_line(case, artifacts, tmp_path):
    art = _mutated(artifacts, tmp_path, "e", HOSTILE[case])
    if case == "an array":
        (tmp_path / "art" / "manifest.json").write_text("[]")
    result = _cli("generate", art, "--tokens", "2,17", "--max-new-tokens", "2")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, \
        result.stderr


def test_vocabulary_is_checked_against_the_embedding_rows(artifacts, tmp_path):
    """Raising the config's vocabulary must not let token ids past the real embedding table."""
    def grow(m):
        vocab = m["config"]["vocab_size"]
        m["config"]["vocab_size"] = 4 * vocab

    art = _mutated(artifacts, tmp_path, "dense", grow)
    with pytest.raises(ArtifactError, match="exceeds the embedding rows the artifact holds"):
        load(art)


def test_non_finite_logits_are_refused(artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifacts["dense"], art)
    weights = read_aligned_safetensors(art / "weights.safetensors")
    header_length = struct.unpack("<Q", (art / "weights.safetensors").read_bytes()[:8])[0]
    header = json.loads((art / "weights.safetensors").read_bytes()[8: 8 + header_length])
    name = next(n for n in weights if n.startswith("norm"))
    begin = 8 + header_length + header[name]["data_offsets"][0]
    data = bytearray((art / "weights.safetensors").read_bytes())
    data[begin: begin + 4] = np.float32(np.nan).tobytes()
    (art / "weights.safetensors").write_bytes(bytes(data))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = sha256_file(art / "weights.safetensors")  # a fixed-up hash
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="non-finite logits"):
        load(art).prefill([2, 17, 99])


def test_generation_stops_at_the_context_limit_and_keeps_its_tokens(artifacts):
    result = _cli("generate", str(artifacts["e"]), "--tokens", "2,17,99", "--max-new-tokens", "1000000000",
                  "--stop", "none", "--max-context", "24")
    assert result.returncode == 0, result.stderr
    tokens = result.stdout.strip().splitlines()[-1].split(",")
    assert len(tokens) == 24 - 3 + 1  # the last token is sampled from the logits of position 23
    assert "warning: stopped after 22 new tokens at the context limit (24 positions" in result.stderr
    expected = load(artifacts["e"], max_context=24).generate([2, 17, 99], 22)
    assert [int(t) for t in tokens] == expected


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=12),
                   st.sampled_from(["../x", "/etc/passwd", "kernels.so", "T", "float32", "int64"]),
                   st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _paths(value, prefix=()):
    """Every (path, leaf) of a JSON value, dict keys and list indices as path elements."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value[:3]):
            yield from _paths(v, (*prefix, i))
    yield prefix, value


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_manifest_fuzz_is_valid_or_one_artifact_error(manifest_json, data):
    """Any field replaced by any JSON value: the manifest reads as valid or raises ArtifactError."""
    manifest = copy.deepcopy(manifest_json)
    paths = [p for p, _ in _paths(manifest) if p and p[0] not in ("format", "format_version", "g4c_version")]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = data.draw(VALUES)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        Manifest.from_json(manifest)
    except ArtifactError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(header=st.binary(max_size=64), length=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_safetensors_header_fuzz_is_one_artifact_error(tmp_path_factory, header, length, body):
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    path.write_bytes(struct.pack("<Q", length) + header + body)
    try:
        read_aligned_safetensors(path)
    except ArtifactError as exc:
        assert "\n" not in str(exc)


def test_tokens_generated_before_a_failure_are_printed(artifacts, monkeypatch, capsys):
    """A failure mid-generation (a dropped RPC session, a device error) still prints the tokens made."""
    from g4c.cli import main
    from g4c.runtime.session import ArtifactSession

    calls = {"n": 0}
    real = ArtifactSession.decode

    def flaky(self, token):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ArtifactError("the server closed the session")
        return real(self, token)

    monkeypatch.setattr(ArtifactSession, "decode", flaky)
    assert main(["generate", str(artifacts["e"]), "--tokens", "2,17,99", "--max-new-tokens", "10", "--stop",
                 "none"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == ",".join(map(str, load(artifacts["e"]).generate([2, 17, 99], 4)))
    assert "the server closed the session" in captured.err
