"""Settings of the transformer core (``model:`` in a config), beside the model they describe."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from latentlm.errors import LatentLMError
from latentlm.settings import positive


@dataclass
class ModelConfig:
    """The transformer core. ``arch`` picks the docs/METHODS.md §0 preset; the ``None`` fields
    take that preset's value (gpt2: learned positions, LayerNorm, GELU, tied, biases;
    llama: RoPE, RMSNorm, SwiGLU, untied, no biases)."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence (in slots) the positions support
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    n_embd: int = 768
    ffn_hidden: int | None = None  # None: 4d for GELU, 8d/3 rounded up to 64 for SwiGLU
    pos: Literal["learned", "rope"] | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu"] | None = None
    tie_embeddings: bool | None = None
    bias: bool | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0
    embed_scale: float = 1.0  # multiplies token embeddings (PonderLM-2 uses sqrt(2.5 d))
    # Weight init of the core (and of a method's embedding-like parameters, e.g. pause tokens), one
    # scheme for every method (docs/METHODS.md §0): normal = Normal(0, init_std), residual output
    # projections init_std / sqrt(2 L) (GPT-2); trunc_normal = the PonderLM-2 authors' truncated normal,
    # std sqrt(2 / (5 d)) cut at +-3 std, residual outputs std / sqrt(2 L) (init_std unused by the core);
    # hf_normal = Normal(0, init_std) for every weight, no depth scaling (Hugging Face's Llama default:
    # the authors' vanilla control).
    init: Literal["normal", "trunc_normal", "hf_normal"] = "normal"
    init_std: float = 0.02
    vocab_multiple: int = 64  # pad the embedding/head rows to a multiple of this for speed

    def resolved(self) -> "ModelConfig":
        """A copy with every preset-dependent ``None`` filled in."""
        gpt2 = self.arch == "gpt2"
        c = dataclasses.replace(self)
        c.pos = c.pos or ("learned" if gpt2 else "rope")
        c.norm = c.norm or ("layernorm" if gpt2 else "rmsnorm")
        c.mlp = c.mlp or ("gelu" if gpt2 else "swiglu")
        c.tie_embeddings = gpt2 if c.tie_embeddings is None else c.tie_embeddings
        c.bias = gpt2 if c.bias is None else c.bias
        c.n_kv_head = c.n_kv_head or c.n_head
        if c.ffn_hidden is None:
            c.ffn_hidden = 4 * c.n_embd if c.mlp == "gelu" else 64 * math.ceil(8 * c.n_embd / 3 / 64)
        return c

    @property
    def trunc_normal_std(self) -> float:
        """The std of ``init: trunc_normal``: sqrt(2 / (5 d)), so a token embedding scaled by
        sqrt(2.5 d) has unit std per coordinate."""
        return math.sqrt(2.0 / (5.0 * self.n_embd))

    def init_description(self) -> str:
        """One line naming the init scheme and its stds (reports say which init a run used)."""
        if self.init == "trunc_normal":
            return (f"trunc_normal: std sqrt(2/(5d)) = {self.trunc_normal_std:.4g} cut at +-3 std, "
                    f"residual outputs / sqrt(2L)")
        if self.init == "hf_normal":
            return f"hf_normal: Normal(0, {self.init_std:g}) for every weight, no depth scaling"
        return f"normal: Normal(0, {self.init_std:g}), residual outputs / sqrt(2L)"

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return m * math.ceil(self.vocab_size / m)

    def validate(self) -> None:
        positive(self, "model", "vocab_size", "block_size", "n_layer", "n_head", "n_embd",
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
