"""The generation loop: cached decoding, padded batches, sampling rules, stopping, limits."""

from __future__ import annotations

import pytest
import torch

from latentlm.config import make_config
from latentlm.errors import LatentLMError
from latentlm.generate import generate, sample_next
from latentlm.methods import build_method

VOCAB = 300


def tiny_method(arch: str, seed: int = 0):
    """A 2-layer model; a larger init spread keeps greedy choices far from ties."""
    torch.manual_seed(seed)
    cfg = make_config(overrides=["--model.arch", arch, "--model.n_layer", "2", "--model.n_embd", "64",
                                 "--model.n_head", "4", "--model.block_size", "64",
                                 "--model.vocab_size", str(VOCAB), "--model.init_std", "0.1"])
    return build_method(cfg)


def record_steps(method) -> list[torch.Tensor]:
    """Make ``method.step`` keep a copy of the last-slot logits of every call."""
    seen, step = [], method.step

    def recording(idx, position_ids, valid, cache):
        logits = step(idx, position_ids, valid, cache)
        seen.append(logits[:, -1].clone())
        return logits

    method.step = recording
    return seen


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_cached_decoding_matches_full_forward(arch):
    method = tiny_method(arch)
    [prompt] = prompts_of([7])
    seen = record_steps(method)
    [out] = generate(method, [prompt], max_new_tokens=12, temperature=0.0)
    assert len(out) == 12 and len(seen) == 12  # prefill + 11 decode steps
    with torch.no_grad():
        full = method.model(torch.tensor([prompt + out]))[0]
    for i, logits in enumerate(seen):
        torch.testing.assert_close(logits[0], full[len(prompt) - 1 + i], atol=1e-4, rtol=0)
        assert int(logits[0].argmax()) == out[i]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_padded_batch_matches_each_prompt_alone(arch):
    method = tiny_method(arch)
    prompts = prompts_of([3, 9, 5, 9])
    seen_batch = record_steps(method)
    batched = generate(method, prompts, max_new_tokens=10, temperature=0.0)
    for row, prompt in enumerate(prompts):
        method = tiny_method(arch)
        seen_alone = record_steps(method)
        assert generate(method, [prompt], max_new_tokens=10, temperature=0.0) == [batched[row]]
        for b, a in zip(seen_batch, seen_alone, strict=True):
            torch.testing.assert_close(b[row], a[0], atol=1e-4, rtol=0)
    assert all(len(out) == 10 for out in batched)


def test_equal_lengths_batch_needs_no_padding_and_agrees():
    method = tiny_method("llama")
    prompts = prompts_of([6, 6])
    batched = generate(method, prompts, max_new_tokens=6, temperature=0.0)
    alone = [generate(method, [p], max_new_tokens=6, temperature=0.0)[0] for p in prompts]
    assert batched == alone


def test_top_k_1_and_tiny_top_p_are_greedy():
    method = tiny_method("llama")
    prompts = prompts_of([4, 8])
    greedy = generate(method, prompts, max_new_tokens=8, temperature=0.0)
    assert generate(method, prompts, max_new_tokens=8, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(method, prompts, max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=4) == greedy


def test_seeded_sampling_is_reproducible():
    method = tiny_method("gpt2")
    prompts = prompts_of([4, 8])
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(method, prompts, seed=7, **kw)
    assert a == generate(method, prompts, seed=7, **kw)
    assert a != generate(method, prompts, seed=8, **kw)
    assert a != generate(method, prompts, temperature=0.0, max_new_tokens=16)


def test_sample_next_stays_inside_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=g).expand(4000, -1)
    allowed = set(logits[0].topk(5).indices.tolist())
    drawn = sample_next(logits, temperature=3.0, top_k=5, top_p=None, generator=g)
    assert set(drawn.tolist()) == allowed  # only top-5, and all of them at a high temperature


def test_sample_next_nucleus_and_temperature_frequencies():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20000, -1)
    # top_p=0.7: {1 (0.5), 3 (0.3)} is the smallest set reaching 0.7; renormalised 0.625/0.375.
    drawn = sample_next(logits, temperature=1.0, top_k=None, top_p=0.7, generator=g)
    assert set(drawn.tolist()) == {1, 3}
    assert abs((drawn == 1).float().mean().item() - 0.625) < 0.015
    # temperature 2 samples from softmax(logits / 2) = sqrt(p), renormalised.
    drawn = sample_next(logits, temperature=2.0, top_k=None, top_p=None, generator=g)
    expected = probs.sqrt() / probs.sqrt().sum()
    freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_sample_next_greedy_and_bad_arguments():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]], dtype=torch.bfloat16)
    assert sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None).tolist() == [1, 0]
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        kw = dict(temperature=1.0, top_k=None, top_p=None) | bad
        with pytest.raises(LatentLMError):
            sample_next(logits, generator=None, **kw)


def test_stops_at_eot_per_row_and_excludes_it():
    method = tiny_method("llama")
    prompts = prompts_of([3, 6])
    eot = 17
    greedy = generate(method, prompts, max_new_tokens=20, temperature=0.0)
    force_at = {0: 3, 1: 5}  # row -> index of the new token that is forced to be EOT
    calls, step = [], method.step

    def forcing(idx, position_ids, valid, cache):
        logits = step(idx, position_ids, valid, cache)
        n_new = len(calls)  # call k produces the logits of new token k
        calls.append(n_new)
        for row, at in force_at.items():
            if n_new == at:
                logits[row, -1, eot] = 1e4
        return logits

    method.step = forcing
    out = generate(method, prompts, max_new_tokens=20, temperature=0.0, eot_id=eot)
    assert out == [greedy[0][:3], greedy[1][:5]]
    assert len(calls) == 6  # prefill + 5 decode steps, then every row is done

    calls.clear()
    kept = generate(method, prompts, max_new_tokens=20, temperature=0.0, eot_id=eot, stop_at_eot=False)
    assert len(calls) == 20 and [len(r) for r in kept] == [20, 20]
    assert kept[0][3] == eot and kept[1][5] == eot
    assert kept[0][:3] == greedy[0][:3] and kept[1][:5] == greedy[1][:5]


def test_block_size_and_bad_requests_raise():
    gpt2 = tiny_method("gpt2")
    [prompt] = prompts_of([60])
    with pytest.raises(LatentLMError, match="max-new-tokens"):
        generate(gpt2, [prompt], max_new_tokens=10)
    assert len(generate(gpt2, [prompt], max_new_tokens=4, temperature=0.0)[0]) == 4
    # RoPE has no learned position table, so it may run past block_size.
    llama = tiny_method("llama")
    assert len(generate(llama, [prompt], max_new_tokens=10, temperature=0.0)[0]) == 10
    for prompts, n in (([], 4), ([[1, 2], []], 4), ([[1, VOCAB]], 4), ([[1, 2]], 0)):
        with pytest.raises(LatentLMError):
            generate(llama, prompts, max_new_tokens=n)


def test_restores_training_mode():
    method = tiny_method("gpt2")
    method.train()
    generate(method, [[1, 2, 3]], max_new_tokens=2)
    assert method.training


def test_stops_at_any_of_several_ids_and_streams_every_step():
    """``eot_id`` may list several stop ids (a tokenizer's end-of-sequence and its document
    separator); ``on_token`` sees each step's samples as they are drawn, stop ids included."""
    method = tiny_method("llama")
    prompts = prompts_of([4, 2])
    greedy = generate(method, prompts, max_new_tokens=12, temperature=0.0)
    banned = set(greedy[0]) | set(greedy[1])
    eos, sep = [t for t in range(VOCAB) if t not in banned][:2]
    step, calls = method.step, []

    def forcing(idx, position_ids, valid, cache):
        logits = step(idx, position_ids, valid, cache)
        if len(calls) == 2:
            logits[0, -1, sep] = 1e4  # row 0 ends at its 3rd new token with the separator
        if len(calls) == 4:
            logits[1, -1, eos] = 1e4  # row 1 at its 5th with end-of-sequence
        calls.append(1)
        return logits

    method.step = forcing
    seen: list[list[int]] = []
    out = generate(method, prompts, max_new_tokens=12, temperature=0.0, eot_id=[eos, sep], on_token=seen.append)
    assert out == [greedy[0][:2], greedy[1][:4]] and len(seen) == 5
    assert seen[2][0] == sep and seen[4][1] == eos and [s[1] for s in seen[:4]] == greedy[1][:4]
    calls.clear()
    assert generate(method, prompts, max_new_tokens=12, temperature=0.0, eot_id=eos)[0][2] == sep  # not a stop id
