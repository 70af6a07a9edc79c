"""A method composed from the reusable pieces: PonderLM-2's thought passes around a stack whose
middle layer mixes in CoCoMix's concept vector (every slot, tokens and thoughts alike).

Nothing here is copied from ``Ponder`` or ``Cocomix``: the pieces are
:class:`~latentlm.methods.concept_head.ConceptHead` and the functions
:func:`~latentlm.methods.ponder.thought_pass` / ``jacobi_thoughts`` / ``sequential_thoughts``.
The checks: cached generation from a padded batch equals the method's own sequential forward,
Jacobi iteration converges to it (exactly, with enough iterations), and a training step on
concept labels lowers the combined loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from latentlm.config import make_config
from latentlm.methods import Method, register_method, unregister_method
from latentlm.methods.base import token_nll, token_positions
from latentlm.methods.concept_head import ConceptHead
from latentlm.methods.ponder import PonderSettings, jacobi_thoughts, sequential_thoughts
from latentlm.model.transformer import Transformer

from conftest import assert_cached_matches_parallel

pytestmark = pytest.mark.usefixtures("one_thread")
C, K_CONCEPTS = 24, 4


@dataclass
class ConceptThoughtSettings:
    insert_layer: int = 1
    n_concepts: int = C
    k_concepts: int = K_CONCEPTS
    concept_weight: float = 0.5

    def validate(self) -> None:
        pass


class ConceptThoughts(Method):
    """Latent thoughts (``ponder:``) over a core whose block ``insert_layer`` input gets ``+ c_hat``."""

    name = "concept_thoughts_test"
    sections = {"ponder": PonderSettings, "concept_thoughts_test": ConceptThoughtSettings}

    def __init__(self, model: Transformer, cfg):
        super().__init__(model, cfg)
        s = cfg.concept_thoughts_test
        self.n_thoughts, self.insert_layer = cfg.ponder.n_thoughts, s.insert_layer
        self.concept_head = ConceptHead(model.cfg.n_embd, s.n_concepts, s.k_concepts, model.cfg.init_std)
        self._z: list[torch.Tensor] = []

    def _run(self, x, pos, valid, cache):
        m, L = self.model, self.insert_layer
        h = m.run_blocks(m.add_positions(x, pos), pos, 0, L, cache=cache, valid=valid)
        z, mu, s = self.concept_head.logits(h)
        self._z.append(z)
        return m.run_blocks(h + self.concept_head.compress(z, mu, s).to(h.dtype), pos, L, cache=cache, valid=valid)

    def jacobi_logits(self, x, n):
        h, _ = jacobi_thoughts(self._run, self.model.norm_f, self.model.embed(x), self.n_thoughts, n,
                               torch.arange(x.shape[1]))
        return self.model.head(h)

    def exact_logits(self, x):
        cache = self.new_cache(*x.shape)
        return self.step(x, token_positions(x), None, cache)

    def eval_logits(self, x):
        return self.exact_logits(x)

    def loss(self, x, y, labels):
        self._z = []
        logits = self.jacobi_logits(x, self.cfg.ponder.train_iters_max)
        b, t = x.shape
        z = self._z[-1].view(b, t, self.n_thoughts + 1, -1)[:, :, 0]  # concepts read at the token slots
        concept, _ = self.concept_head.loss(z, labels, chunk=64)
        ntp = token_nll(logits, y).mean()
        return ntp + self.cfg.concept_thoughts_test.concept_weight * concept, {"ntp_loss": ntp.detach()}

    def cache_slots(self, n_tokens):
        return n_tokens * (self.n_thoughts + 1)

    def step(self, idx, position_ids, valid, cache):
        h = sequential_thoughts(self._run, self.model.norm_f, self.model.embed(idx), self.n_thoughts, position_ids,
                                valid, cache)
        return self.model.head(h)


@pytest.fixture(scope="module")
def method_cls():
    register_method(ConceptThoughts)
    yield ConceptThoughts
    unregister_method(ConceptThoughts.name)


def build(arch: str, k: int):
    cfg = make_config(overrides=["--model.arch", arch, "--model.vocab_size", "61", "--model.block_size", "32",
                                 "--model.n_layer", "3", "--model.n_head", "2", "--model.n_embd", "32",
                                 "--train.method", ConceptThoughts.name, "--ponder.n_thoughts", str(k)])
    torch.manual_seed(0)
    return ConceptThoughts(Transformer(cfg.model), cfg).eval()


@pytest.mark.parametrize("arch, k", [("gpt2", 1), ("llama", 2)])
def test_cached_generation_equals_the_sequential_forward(method_cls, arch, k):
    method = build(arch, k)
    prompts = [[3, 14, 15, 9, 2, 6], [5, 35], [8, 9, 7, 9]]  # unequal lengths: a left-padded batch
    assert_cached_matches_parallel(method, prompts, method.exact_logits, max_new_tokens=4)


@pytest.mark.parametrize("k", [1, 2])
def test_jacobi_reaches_the_sequential_model(method_cls, k):
    """With K (T - 1) iterations every thought has seen its exact predecessors."""
    method = build("llama", k)
    x = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(method.jacobi_logits(x, k * (x.shape[1] - 1)), method.exact_logits(x),
                                   atol=1e-4, rtol=0)
        assert not torch.allclose(method.jacobi_logits(x, 1), method.exact_logits(x), atol=1e-4)


def test_a_training_step_lowers_the_combined_loss(method_cls):
    method = build("gpt2", 1).train()
    torch.manual_seed(1)
    x, y = torch.randint(0, 61, (4, 12)), torch.randint(0, 61, (4, 12))
    labels = torch.randint(0, C, (4, 12, 2))
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss, _ = method(x, y, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert method.concept_head.predict.weight.grad.abs().sum() > 0
