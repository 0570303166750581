"""Sampling and the generation loop: the distribution `Sampler` samples from (temperature, top-k,
top-p) equals transformers' logits warpers, seeded draws follow it, and `generate` stops at a stop /
EOS token (included), streams every token in order through `on_token`, and samples from the compiled
model's logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import PROMPT
from hf_reference import reference_greedy, reference_logits
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from g4c.errors import G4CError
from g4c.runtime import Sampler, load


def hf_probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution transformers samples from with do_sample=True (its warpers, same order)."""
    scores = torch.tensor(logits, dtype=torch.float64)[None]
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("top_k", [0, 1, 5, 40])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
def test_probabilities_match_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(int(temperature * 10) + top_k).standard_normal(40) * 3
    probs = Sampler(temperature=temperature, top_k=top_k, top_p=top_p).probabilities(logits)
    expected = hf_probabilities(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(probs, expected, rtol=1e-9, atol=1e-12)
    assert np.array_equal(probs > 0, expected > 0)  # the same support
    assert abs(probs.sum() - 1) < 1e-12


def test_top_p_is_the_smallest_nucleus_of_the_top_k_renormalised_distribution():
    logits = np.log([0.05, 0.4, 0.1, 0.3, 0.15])  # order by mass: 1, 3, 4, 2, 0
    support = lambda **kw: set(np.flatnonzero(Sampler(temperature=1.0, **kw).probabilities(logits)))  # noqa: E731
    assert support(top_p=0.39) == {1}
    assert support(top_p=0.69) == {1, 3}
    assert support(top_p=0.71) == {1, 3, 4}
    assert support(top_p=1.0) == {0, 1, 2, 3, 4}
    assert support(top_k=2) == {1, 3}
    # top-k first, then the nucleus of the renormalised top-2 (0.4/0.7 = 0.57 ≥ 0.5): one token
    assert support(top_k=2, top_p=0.5) == {1}
    np.testing.assert_allclose(Sampler(temperature=1.0, top_k=3).probabilities(logits)[[1, 3, 4]],
                               np.array([0.4, 0.3, 0.15]) / 0.85)
    np.testing.assert_allclose(Sampler(temperature=0.5).probabilities(logits),
                               np.array([0.05, 0.4, 0.1, 0.3, 0.15]) ** 2 / np.sum(np.array([.05, .4, .1, .3, .15]) ** 2))


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=6, top_p=0.9),
                                     dict(temperature=2.0, top_p=0.6)])
def test_seeded_draws_follow_the_distribution(options):
    logits = np.random.default_rng(3).standard_normal(12) * 2
    sampler = Sampler(seed=42, **options)
    probs = sampler.probabilities(logits)
    n = 20000
    counts = np.bincount([sampler(logits) for _ in range(n)], minlength=logits.size)
    assert counts[probs == 0].sum() == 0  # nothing outside top-k / the nucleus
    freq = counts / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-9), (freq, probs)
    chi2 = np.sum((counts - n * probs)[probs > 0] ** 2 / (n * probs[probs > 0]))
    assert chi2 < 40  # ≤ 11 degrees of freedom: p < 1e-4 for a correct sampler


def test_seeds_reproduce_and_differ():
    logits = np.random.default_rng(5).standard_normal(30)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(temperature=1.0, seed=seed)
        return [sampler(logits) for _ in range(64)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 5


def test_greedy_is_argmax_whatever_the_filters():
    logits = np.array([0.1, 2.0, -1.0, 2.0, 1.9])
    assert Sampler()(logits) == 1  # first of a tie, like numpy / torch argmax
    assert Sampler(temperature=0.0, top_k=1, top_p=0.1, seed=3)(logits) == 1
    assert Sampler().greedy and not Sampler(temperature=0.5).greedy
    assert {Sampler(temperature=5.0, top_k=1, seed=s)(logits) for s in range(20)} == {1}  # top-1: always the max


def test_bad_sampler_options_are_refused():
    for kwargs, message in [(dict(temperature=-0.1), "--temperature must be >= 0"), (dict(top_k=-1), "--top-k must"),
                            (dict(top_p=0.0), "--top-p must be in \\(0, 1\\]"), (dict(top_p=1.5), "--top-p must")]:
        with pytest.raises(G4CError, match=message):
            Sampler(**kwargs)


# --- the generation loop on a compiled artifact -------------------------------------------------------

@pytest.fixture(scope="module")
def greedy_e(artifacts, references):
    prompt = PROMPT[:5]
    tokens = reference_greedy(references["e"], prompt, 16)
    assert load(artifacts["e"]).generate(prompt, 16) == tokens
    return prompt, tokens


def _first_repeat_free_index(tokens: list[int], at_least: int) -> int:
    """An index k ≥ at_least whose token does not occur earlier in `tokens`."""
    return next(k for k in range(at_least, len(tokens)) if tokens[k] not in tokens[:k])


def test_generation_stops_at_a_stop_token_and_includes_it(artifacts, greedy_e):
    prompt, tokens = greedy_e
    session = load(artifacts["e"])
    k = _first_repeat_free_index(tokens, 3)
    never = next(t for t in range(300) if t not in tokens)
    assert session.generate(prompt, 16, stop_tokens=[never, tokens[k]]) == tokens[: k + 1]
    assert session.position == len(prompt) + k  # no decode step after the stop token
    session.reset()
    assert session.generate(prompt, 16, stop_tokens=[tokens[0]]) == tokens[:1]
    session.reset()
    assert session.generate(prompt, 16, stop_tokens=[never]) == tokens
    session.reset()
    assert session.generate(prompt, 0, stop_tokens=[tokens[0]]) == []


def test_on_token_streams_every_token_in_order_before_the_next_step(artifacts, greedy_e):
    prompt, tokens = greedy_e
    session = load(artifacts["e"])
    seen: list[tuple[int, int]] = []  # (token, tokens in the cache when it arrived)
    k = _first_repeat_free_index(tokens, 6)
    new = session.generate(prompt, 16, stop_tokens=[tokens[k]], on_token=lambda t: seen.append((t, session.position)))
    assert [t for t, _ in seen] == new == tokens[: k + 1]
    # each token is delivered as soon as it is sampled, before it is fed back
    assert [p for _, p in seen] == [len(prompt) + i for i in range(len(new))]
    session.reset()
    seen.clear()
    assert session.generate(prompt, 0, on_token=lambda t: seen.append((t, 0))) == [] and seen == []


def test_sampled_generation_draws_from_the_compiled_logits(artifacts, references):
    """Seeded sampling reproduces across sessions, differs from greedy, and every token lies in the
    top-k / nucleus of transformers' logits at its step."""
    prompt = PROMPT[:4]
    options = dict(temperature=1.5, top_k=8, top_p=0.95)
    runs = [load(artifacts["moe"]).generate(prompt, 20, Sampler(seed=11, **options)) for _ in range(2)]
    assert runs[0] == runs[1]
    tokens = runs[0]
    assert tokens != reference_greedy(references["moe"], prompt, 20)
    logits = reference_logits(references["moe"], prompt + tokens[:-1])[len(prompt) - 1:]
    for token, row in zip(tokens, logits):
        assert Sampler(**options).probabilities(row)[token] > 0
    # top-k 1 at any temperature is greedy
    assert load(artifacts["moe"]).generate(prompt, 20, Sampler(temperature=3.0, top_k=1, seed=1)) == \
        reference_greedy(references["moe"], prompt, 20)


def test_cli_stops_at_the_configs_eos_or_the_given_ids(checkpoints, references, tmp_path, capsys):
    """`g4c generate` stops at the checkpoint's EOS ids (a list in config.json), carried into the
    compiled artifact, unless `--stop none`; `--stop IDS` names others."""
    from g4c.cli import main

    prompt = PROMPT[:5]
    tokens = reference_greedy(references["dense"], prompt, 16)
    k = _first_repeat_free_index(tokens, 4)
    j = _first_repeat_free_index(tokens, 1)
    never = next(t for t in range(260) if t not in tokens)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["dense"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["eos_token_id"] = [never, tokens[k]]
    (ckpt / "config.json").write_text(json.dumps(config))
    art = tmp_path / "art"
    assert main(["compile", str(ckpt), "-o", str(art), "--no-check"]) == 0
    capsys.readouterr()

    def generate(*options: str) -> list[int]:
        assert main(["generate", str(art), "--tokens", ",".join(map(str, prompt)), "--max-new-tokens", "16",
                     *options]) == 0
        return [int(t) for t in capsys.readouterr().out.strip().splitlines()[-1].split(",")]

    assert generate() == tokens[: k + 1]
    assert generate("--stop", "none") == tokens
    assert generate("--stop", f"{never},{tokens[j]}") == tokens[: j + 1]
