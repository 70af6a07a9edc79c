"""Zero-shot scoring through a shared context's KV cache gives the scores of scoring every whole
sequence, for every method that can evaluate through a cache; the others keep the whole-sequence
path. The whole-sequence path is itself checked against plain log-softmax sums."""

import random

import pytest
import torch

from latentlm.config import make_config
from latentlm.errors import LatentLMError
from latentlm.eval.zeroshot import score_requests, score_tokens
from latentlm.methods import build_method
from latentlm.methods.registry import methods

pytestmark = pytest.mark.usefixtures("one_thread")

V = 300
METHODS = sorted(methods())  # every built-in method: each can evaluate through a KV cache


def build(name: str, arch: str, **ponder):
    cfg = make_config(base={"train": {"method": name},
                            "model": {"arch": arch, "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": V,
                                      "block_size": 48},
                            "cocomix": {"insert_layer": 1, "n_concepts": 64, "k_concepts": 4},
                            "pause_insert": {"insert_layer": 1}, "ponder": ponder,
                            "ponder_concepts": {"insert_layer": 1, "n_concepts": 64, "k_concepts": 4}})
    torch.manual_seed(0)
    return build_method(cfg)


def greedy_tokens(method, prefix: list[int], n: int) -> list[int]:
    out = list(prefix)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(method.eval_logits(torch.tensor([out]))[0, -1].argmax()))
    return out[len(prefix):]


def requests(method, seed: int = 0):
    """Items of 1-4 continuations sharing a context (lengths 1-20 and 1-12), some continuations the
    model's own greedy tokens (so is_greedy is True for some), one context shared by two items."""
    rnd = random.Random(seed)
    seqs, n = [], []
    shared = [rnd.randrange(V) for _ in range(9)]
    for item in range(8):
        ctx = shared if item in (2, 5) else [rnd.randrange(V) for _ in range(rnd.randint(1, 20))]
        for c in range(rnd.randint(1, 4)):
            k = rnd.randint(1, 12)
            cont = greedy_tokens(method, ctx, k) if c == 0 else [rnd.randrange(V) for _ in range(k)]
            seqs.append(ctx + cont)
            n.append(k)
    for item in range(3):  # WinoGrande-like: fillings of one sentence (a shared prefix), one continuation
        before = [rnd.randrange(V) for _ in range(rnd.randint(6, 14))]
        after = [rnd.randrange(V) for _ in range(rnd.randint(1, 6))]
        for _ in range(2):
            seqs.append(before + [rnd.randrange(V) for _ in range(rnd.randint(1, 3))] + after)
            n.append(len(after))
    return seqs, n


def test_prefix_groups_share_identical_contexts_and_a_long_common_prefix():
    from latentlm.eval.zeroshot import _prefix_groups

    a, b = list(range(1, 11)), [50, 51]
    seqs = [a + [20] + b, a + [21, 22] + b,  # two fillings after a 10-token prefix: one group, P = 10
            [7, 8, 9, 1], [7, 8, 9, 2], [7, 8, 9, 3], [7, 8, 9, 4],  # one context, four answers: P = 3
            [7, 8, 5, 3],                    # shares 2 of its 3 tokens: 2 + 4 x 1 + 1 run together > 3 + 3 apart
            [7, 8, 6, 3]]                    # with the one before: 2 + 1 + 1 < 3 + 3, so shared
    n = [2, 2, 1, 1, 1, 1, 1, 1]
    assert _prefix_groups(seqs, n, batch_size=8) == [(10, [0, 1]), (3, [2, 3, 4, 5]), (2, [6, 7])]
    # Merged groups stay within a batch; one context's requests stay together (a batch of their own).
    assert _prefix_groups(seqs, n, batch_size=1) == [(11, [0]), (12, [1]), (3, [2, 3, 4, 5]), (3, [6]), (3, [7])]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_context_scores_equal_whole_sequences(name, arch):
    method = build(name, arch, eval_mode="exact")
    assert method.cached_eval
    seqs, n = requests(method)
    for batch_size in (1, 5, 64):
        shared = score_tokens(method, seqs, n, batch_size=batch_size, greedy=True, shared_context=True)
        whole = score_tokens(method, seqs, n, batch_size=batch_size, greedy=True, shared_context=False)
        assert [g for _, g in shared] == [g for _, g in whole]
        assert max(abs(a - b) for (a, _), (b, _) in zip(shared, whole)) < 1e-4
    assert any(g for _, g in shared) and not all(g for _, g in shared)


def test_whole_sequence_scores_are_log_softmax_sums():
    method = build("ntp", "llama")
    seqs, n = requests(method, seed=3)
    got = score_tokens(method, seqs, n, batch_size=4, greedy=True)
    with torch.no_grad():
        for (lp, g), s, k in zip(got, seqs, n):
            logp = method.eval_logits(torch.tensor([s[:-1]]))[0].log_softmax(-1)
            rows = torch.arange(len(s) - 1 - k, len(s) - 1)
            target = torch.tensor(s[len(s) - k:])
            assert abs(lp - logp[rows, target].double().sum().item()) < 1e-4
            assert g == bool((logp[rows].argmax(-1) == target).all())


def test_jacobi_ponder_scores_whole_sequences():
    method = build("ponder", "llama")  # default eval_mode jacobi: logits depend on the whole sequence
    assert not method.cached_eval
    seqs, n = requests(method)
    with pytest.raises(LatentLMError, match="cannot evaluate through a KV cache"):
        score_tokens(method, seqs, n, shared_context=True)
    assert score_tokens(method, seqs, n) == score_tokens(method, seqs, n, shared_context=False)


def test_plugin_with_own_logits_keeps_whole_sequences():
    from latentlm.methods.ntp import NTP

    class Shifted(NTP):
        name = "shifted"

        def logits(self, idx, position_ids, valid=None, cache=None):
            return super().logits(idx, position_ids, valid, cache) + 1.0

    method = build("ntp", "gpt2")
    method.__class__ = Shifted
    assert not method.cached_eval


def test_score_requests_shares_contexts_and_truncates_like_before():
    """Through the text API (EOT + context, continuation), including left truncation at max_len."""
    from latentlm.data.tokenizers import load_tokenizer

    tok = load_tokenizer("byte")
    cfg = make_config(base={"train": {"method": "ntp"}, "model": {"arch": "gpt2", "n_layer": 2, "n_embd": 32,
                                                                  "n_head": 2, "vocab_size": 257, "block_size": 24}})
    torch.manual_seed(0)
    method = build_method(cfg)
    reqs = [("The cat sat on", " the mat"), ("The cat sat on", " a hat"), ("Q: why?\nA:", " because it was long"),
            ("x" * 30, " y")]
    shared = score_requests(method, tok, reqs, batch_size=3, max_len=20, greedy=True)
    seqs = [([tok.eot_id] + tok.encode(c.rstrip()) + tok.encode(c[len(c.rstrip()):] + d))[-21:] for c, d in reqs]
    n = [min(len(tok.encode(d)), 20) for _, d in reqs]
    whole = score_tokens(method, seqs, n, batch_size=3, greedy=True, shared_context=False)
    assert [g for _, g in shared] == [g for _, g in whole]
    assert max(abs(a - b) for (a, _), (b, _) in zip(shared, whole)) < 1e-4


def test_score_tokens_needs_a_token_before_the_scored_ones():
    method = build("ntp", "gpt2")
    with pytest.raises(LatentLMError, match="at least one token must precede"):
        score_tokens(method, [[1, 2, 3]], [3])
