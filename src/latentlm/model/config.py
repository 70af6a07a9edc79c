"""Settings of the transformer core (``model:`` in a config), beside the model they describe."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from latentlm.errors import LatentLMError
from latentlm.settings import positive, setting

GPT2_VOCAB = 50257  # model.vocab_size when neither the config nor any data gives one


# What each ``model.arch`` gives the settings left ``None`` (docs/METHODS.md §0).
ARCH_PRESETS: dict[str, dict[str, object]] = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", tie_embeddings=True, bias=True,
                 parallel_residual=False, rotary_pct=1.0),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False,
                  parallel_residual=False, rotary_pct=1.0),
    # GPT-NeoX as Pythia configures it (Hugging Face GPTNeoXConfig: hidden_act gelu, rotary_pct 0.25,
    # use_parallel_residual true, tie_word_embeddings false, layer_norm_eps 1e-5).
    "neox": dict(pos="rope", norm="layernorm", mlp="gelu_exact", tie_embeddings=False, bias=True,
                 parallel_residual=True, rotary_pct=0.25),
}


@dataclass
class ModelConfig:
    """The transformer core. ``arch`` picks the docs/METHODS.md §0 preset; the ``None`` fields
    take that preset's value (:data:`ARCH_PRESETS`: gpt2: learned positions, LayerNorm, GELU
    (tanh), tied, biases; llama: RoPE, RMSNorm, SwiGLU, untied, no biases; neox (GPT-NeoX /
    Pythia): parallel residual, RoPE on the first 25% of each head's dims, LayerNorm, exact GELU,
    untied, biases)."""

    arch: Literal["gpt2", "llama", "neox"] = setting("gpt2", "the preset the null fields below follow (gpt2: "
                                                     "learned positions, LayerNorm, GELU, tied, biases; llama: "
                                                     "RoPE, RMSNorm, SwiGLU, untied, no biases; neox: GPT-NeoX/"
                                                     "Pythia, parallel residual, 25% rotary, LayerNorm, GELU, "
                                                     "untied, biases)")
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
    mlp: Literal["gelu", "gelu_exact", "swiglu"] | None = setting(None, "MLP kind (gelu: tanh approximation; "
                                                                  "gelu_exact: erf); null = the arch's")
    tie_embeddings: bool | None = setting(None, "LM head shares the token embedding; null = the arch's")
    bias: bool | None = setting(None, "biases in linear layers and norms; null = the arch's")
    parallel_residual: bool | None = setting(None, "x + attn(norm1(x)) + mlp(norm2(x)) instead of one after the "
                                                   "other; null = the arch's")
    rotary_pct: float | None = setting(None, "RoPE on the first int(head_dim * rotary_pct) dims of each head; "
                                             "null = the arch's")
    norm_eps: float = setting(1e-5, "epsilon of the norms")
    rope_theta: float = setting(10000.0, "RoPE base")
    dropout: float = setting(0.0, "dropout probability (attention, residual, embedding)")
    embed_scale: float = setting(1.0, "multiplies token embeddings (PonderLM-2 uses sqrt(2.5 d))")
    init: Literal["normal", "trunc_normal", "hf_normal"] = setting("normal", "weight init (docs/METHODS.md §0): "
        "normal = Normal(0, init_std), residual outputs / sqrt(2L) (GPT-2); trunc_normal = the PonderLM-2 authors' "
        "std sqrt(2/(5d)) cut at +-3 std, residual outputs / sqrt(2L); hf_normal = Normal(0, init_std) everywhere")
    init_std: float = setting(0.02, "standard deviation of the initial weights")
    vocab_multiple: int = setting(64, "embedding / head rows are padded to a multiple of this (speed)")

    def resolved(self) -> "ModelConfig":
        """A copy with every preset-dependent ``None`` filled in."""
        c = dataclasses.replace(self)
        for key, value in ARCH_PRESETS[c.arch].items():
            if getattr(c, key) is None:
                setattr(c, key, value)
        c.vocab_size = GPT2_VOCAB if c.vocab_size is None else c.vocab_size
        c.n_kv_head = c.n_kv_head or c.n_head
        if c.ffn_hidden is None:
            c.ffn_hidden = 64 * math.ceil(8 * c.n_embd / 3 / 64) if c.mlp == "swiglu" else 4 * c.n_embd
        return c

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (Hugging Face GPTNeoX's rounding)."""
        return int(self.n_embd // self.n_head * self.resolved().rotary_pct)

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
        if not 0.0 < r.rotary_pct <= 1.0:
            raise LatentLMError(f"model.rotary_pct={self.rotary_pct} must be in (0, 1]: the fraction of each "
                                "head's dims that RoPE rotates")
        if r.pos == "rope" and (r.rotary_dim == 0 or r.rotary_dim % 2):
            raise LatentLMError(f"RoPE needs an even, positive number of rotary dims, got int(head size "
                                f"{self.n_embd // self.n_head} x model.rotary_pct {r.rotary_pct}) = {r.rotary_dim}; "
                                "choose another model.rotary_pct or head size")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise LatentLMError(f"model.ffn_hidden={self.ffn_hidden} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise LatentLMError(f"model.dropout={self.dropout} must be in [0, 1)")
