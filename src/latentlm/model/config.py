"""Settings of the transformer core (``model:`` in a config), beside the model they describe."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from latentlm.errors import LatentLMError
from latentlm.settings import positive, setting

GPT2_VOCAB = 50257  # model.vocab_size when neither the config nor any data gives one


@dataclass
class ModelConfig:
    """The transformer core. ``arch`` picks the docs/METHODS.md §0 preset; the ``None`` fields
    take that preset's value (gpt2: learned positions, LayerNorm, GELU, tied, biases;
    llama: RoPE, RMSNorm, SwiGLU, untied, no biases)."""

    arch: Literal["gpt2", "llama"] = setting("gpt2", "the preset the null fields below follow (gpt2: learned "
                                             "positions, LayerNorm, GELU, tied, biases; llama: RoPE, RMSNorm, "
                                             "SwiGLU, untied, no biases)")
    vocab_size: int | None = setting(None, "token ids; null = the data's (data.path/manifest.json), GPT-2's "
                                           f"{GPT2_VOCAB} when there is no data to read")
    block_size: int = setting(1024, "longest sequence (in slots) the positions support")
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads")
    n_kv_head: int | None = setting(None, "key/value heads (grouped-query attention); null = n_head")
    n_embd: int = setting(768, "model width d")
    ffn_hidden: int | None = setting(None, "MLP hidden width; null = 4d for GELU, 8d/3 rounded up to 64 for SwiGLU")
    pos: Literal["learned", "rope"] | None = setting(None, "position encoding; null = the arch's")
    norm: Literal["layernorm", "rmsnorm"] | None = setting(None, "normalisation; null = the arch's")
    mlp: Literal["gelu", "swiglu"] | None = setting(None, "MLP kind; null = the arch's")
    tie_embeddings: bool | None = setting(None, "LM head shares the token embedding; null = the arch's")
    bias: bool | None = setting(None, "biases in linear layers and norms; null = the arch's")
    norm_eps: float = setting(1e-5, "epsilon of the norms")
    rope_theta: float = setting(10000.0, "RoPE base")
    dropout: float = setting(0.0, "dropout probability (attention, residual, embedding)")
    embed_scale: float = setting(1.0, "multiplies token embeddings (PonderLM-2 uses sqrt(2.5 d))")
    init_std: float = setting(0.02, "standard deviation of the initial weights")
    vocab_multiple: int = setting(64, "embedding / head rows are padded to a multiple of this (speed)")

    def resolved(self) -> "ModelConfig":
        """A copy with every preset-dependent ``None`` filled in."""
        gpt2 = self.arch == "gpt2"
        c = dataclasses.replace(self)
        c.pos = c.pos or ("learned" if gpt2 else "rope")
        c.norm = c.norm or ("layernorm" if gpt2 else "rmsnorm")
        c.mlp = c.mlp or ("gelu" if gpt2 else "swiglu")
        c.tie_embeddings = gpt2 if c.tie_embeddings is None else c.tie_embeddings
        c.bias = gpt2 if c.bias is None else c.bias
        c.vocab_size = GPT2_VOCAB if c.vocab_size is None else c.vocab_size
        c.n_kv_head = c.n_kv_head or c.n_head
        if c.ffn_hidden is None:
            c.ffn_hidden = 4 * c.n_embd if c.mlp == "gelu" else 64 * math.ceil(8 * c.n_embd / 3 / 64)
        return c

    @property
    def padded_vocab_size(self) -> int:
        m, v = self.vocab_multiple, GPT2_VOCAB if self.vocab_size is None else self.vocab_size
        return m * math.ceil(v / m)

    def validate(self) -> None:
        positive(self, "model", *(["vocab_size"] if self.vocab_size is not None else []), "block_size", "n_layer", "n_head", "n_embd",
                  "vocab_multiple", "norm_eps", "rope_theta", "embed_scale", "init_std")
        if self.n_embd % self.n_head:
            raise LatentLMError(f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}; "
                                "choose a head count that divides the width")
        kv = self.n_kv_head or self.n_head
        if kv <= 0 or self.n_head % kv:
            raise LatentLMError(f"model.n_kv_head={self.n_kv_head} must be positive and divide "
                                f"model.n_head={self.n_head}")
        r = self.resolved()
        if r.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise LatentLMError(f"RoPE needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise LatentLMError(f"model.ffn_hidden={self.ffn_hidden} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise LatentLMError(f"model.dropout={self.dropout} must be in [0, 1)")
