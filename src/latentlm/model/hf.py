"""Exact mapping between our core :class:`~latentlm.model.transformer.Transformer` and Hugging Face
``GPT2LMHeadModel`` / ``LlamaForCausalLM`` / ``GPTNeoXForCausalLM`` (config.json and tensor names),
without ``transformers``.

Layout facts the mapping relies on (docs/INTEROP.md):

* GPT-2's ``Conv1D`` stores ``[in, out]``: every projection is transposed, and q, k, v are one
  ``c_attn`` matrix concatenated along the output dimension.
* GPT-NeoX fuses q, k, v into one ``query_key_value`` ``nn.Linear`` whose output rows are grouped
  per head: ``[q_0, k_0, v_0, q_1, k_1, v_1, ...]`` (each ``head_dim`` rows), not ``[q | k | v]``.
* Our RoPE pairs dimension ``i`` with ``i + rotary_dim/2`` (rotate-half) within the first
  ``rotary_dim`` dims of a head, which is the layout of Hugging Face Llama and GPT-NeoX weights,
  so q/k projections are copied without permutation.
* The vocabulary is the tokenizer's: padded rows (``vocab_multiple``) are dropped on export and
  zero-filled on import; they are never scored, so logits over real tokens are identical.
* ``embed_scale`` folds into untied input embeddings (exact); tied ones cannot carry it.

Reading and writing directories is :mod:`latentlm.interop`'s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from latentlm.errors import LatentLMError
from latentlm.model.config import ModelConfig

HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
# Our MLP activation <-> Hugging Face's name for it (GPT-2's activation_function, GPT-NeoX's hidden_act).
HF_GELU = {"gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu"}
GELU_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
_GELUS = ("gelu", "gelu_exact")


def hf_family(cfg: ModelConfig) -> str:
    """The Hugging Face ``model_type`` (a key of :data:`HF_CLASSES`) that represents ``cfg`` exactly,
    or a one-line error: learned positions are GPT-2; RoPE with SwiGLU is Llama, with GELU GPT-NeoX."""
    c = cfg.resolved()
    family = "gpt2" if c.pos == "learned" else "llama" if c.mlp == "swiglu" else "gpt_neox"
    need = {"gpt2": {"norm": ("layernorm",), "mlp": _GELUS, "parallel_residual": (False,)},
            "llama": {"norm": ("rmsnorm",), "mlp": ("swiglu",), "parallel_residual": (False,), "rotary_pct": (1.0,)},
            "gpt_neox": {"norm": ("layernorm",), "mlp": _GELUS}}[family]
    for key, allowed in need.items():
        if getattr(c, key) not in allowed:
            raise LatentLMError(f"model.{key}={getattr(c, key)} with model.pos={c.pos} has no Hugging Face "
                                f"counterpart ({HF_CLASSES[family]} needs model.{key}="
                                f"{' or '.join(str(a) for a in allowed)})")
    if family != "llama" and c.n_kv_head != c.n_head:
        raise LatentLMError(f"model.n_kv_head={c.n_kv_head} (grouped-query attention) has no {HF_CLASSES[family]} "
                            "counterpart; only the llama preset exports with n_kv_head < n_head")
    if c.embed_scale != 1.0 and c.tie_embeddings:
        raise LatentLMError(f"model.embed_scale={c.embed_scale} with tied embeddings has no Hugging Face "
                            "counterpart (the scale folds into untied input embeddings only)")
    return family


def to_hf(cfg: ModelConfig, core: dict[str, torch.Tensor], eot_id: int | None = None
          ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json dict, tensors)`` of the Hugging Face model equal to our core ``cfg`` with
    weights ``core`` (keys of :class:`~latentlm.model.transformer.Transformer`)."""
    family = hf_family(cfg)
    c = cfg.resolved()
    V, d = c.vocab_size, c.n_embd
    wte = core["wte.weight"][:V] * c.embed_scale if c.embed_scale != 1.0 else core["wte.weight"][:V]

    def bias(key: str, n: int) -> torch.Tensor:
        """GPT-2 and GPT-NeoX always have biases: a core without them exports exact zeros."""
        return core[key] if key in core else torch.zeros(n, dtype=wte.dtype)

    out: dict[str, torch.Tensor] = {}
    common = {"architectures": [HF_CLASSES[family]], "model_type": family, "vocab_size": V,
              "tie_word_embeddings": bool(c.tie_embeddings), "torch_dtype": str(wte.dtype).removeprefix("torch."),
              "bos_token_id": eot_id, "eos_token_id": eot_id, "initializer_range": c.init_std}
    if family == "gpt2":
        out["transformer.wte.weight"] = wte
        out["transformer.wpe.weight"] = core["wpe.weight"]
        for i in range(c.n_layer):
            s, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[h + theirs + ".weight"] = core[s + ours + ".weight"]
                out[h + theirs + ".bias"] = bias(s + ours + ".bias", d)
            qkv = [s + f"attn.{p}_proj" for p in "qkv"]
            out[h + "attn.c_attn.weight"] = torch.cat([core[k + ".weight"] for k in qkv]).t()
            out[h + "attn.c_attn.bias"] = torch.cat([bias(k + ".bias", d) for k in qkv])
            for ours, theirs, n in (("attn.o_proj", "attn.c_proj", d), ("mlp.up", "mlp.c_fc", c.ffn_hidden),
                                    ("mlp.down", "mlp.c_proj", d)):
                out[h + theirs + ".weight"] = core[s + ours + ".weight"].t()
                out[h + theirs + ".bias"] = bias(s + ours + ".bias", n)
        out["transformer.ln_f.weight"] = core["norm_f.weight"]
        out["transformer.ln_f.bias"] = bias("norm_f.bias", d)
        config = {**common, "n_positions": c.block_size, "n_embd": d, "n_layer": c.n_layer, "n_head": c.n_head,
                  "n_inner": c.ffn_hidden, "activation_function": "gelu_new" if c.mlp == "gelu" else "gelu",
                  "layer_norm_epsilon": c.norm_eps,
                  "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                  "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                  "reorder_and_upcast_attn": False}
    elif family == "gpt_neox":
        H, hd = c.n_head, d // c.n_head
        out["gpt_neox.embed_in.weight"] = wte
        for i in range(c.n_layer):
            s, h = f"blocks.{i}.", f"gpt_neox.layers.{i}."
            for ours, theirs in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
                out[h + theirs + ".weight"] = core[s + ours + ".weight"]
                out[h + theirs + ".bias"] = bias(s + ours + ".bias", d)
            qkv = [s + f"attn.{p}_proj" for p in "qkv"]  # fused per head: rows q_h, k_h, v_h for each head h
            out[h + "attention.query_key_value.weight"] = torch.stack(
                [core[k + ".weight"].view(H, hd, d) for k in qkv], dim=1).reshape(3 * d, d)
            out[h + "attention.query_key_value.bias"] = torch.stack(
                [bias(k + ".bias", d).view(H, hd) for k in qkv], dim=1).reshape(3 * d)
            for ours, theirs, n in (("attn.o_proj", "attention.dense", d),
                                    ("mlp.up", "mlp.dense_h_to_4h", c.ffn_hidden), ("mlp.down", "mlp.dense_4h_to_h", d)):
                out[h + theirs + ".weight"] = core[s + ours + ".weight"]
                out[h + theirs + ".bias"] = bias(s + ours + ".bias", n)
        out["gpt_neox.final_layer_norm.weight"] = core["norm_f.weight"]
        out["gpt_neox.final_layer_norm.bias"] = bias("norm_f.bias", d)
        config = {**common, "hidden_size": d, "intermediate_size": c.ffn_hidden, "num_hidden_layers": c.n_layer,
                  "num_attention_heads": c.n_head, "hidden_act": HF_GELU[c.mlp],
                  "max_position_embeddings": c.block_size, "layer_norm_eps": c.norm_eps,
                  "use_parallel_residual": bool(c.parallel_residual),
                  # rotary_pct / rotary_emb_base for transformers 4.x, rope_parameters for 5.x
                  "rotary_pct": c.rotary_pct, "rotary_emb_base": c.rope_theta,
                  "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta,
                                      "partial_rotary_factor": c.rotary_pct},
                  "rope_scaling": None, "attention_bias": True, "hidden_dropout": c.dropout,
                  "attention_dropout": c.dropout, "use_cache": True}
    else:
        out["model.embed_tokens.weight"] = wte
        for i in range(c.n_layer):
            s, h = f"blocks.{i}.", f"model.layers.{i}."
            names = [(f"attn.{p}_proj", f"self_attn.{p}_proj") for p in "qkvo"]
            names += [("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj"),
                      ("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")]
            for ours, theirs in names:
                for kind in ("weight", "bias"):
                    if f"{s}{ours}.{kind}" in core:
                        out[f"{h}{theirs}.{kind}"] = core[f"{s}{ours}.{kind}"]
        out["model.norm.weight"] = core["norm_f.weight"]
        config = {**common, "hidden_size": d, "intermediate_size": c.ffn_hidden, "num_hidden_layers": c.n_layer,
                  "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": d // c.n_head,
                  "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
                  # rope_theta for transformers 4.x, rope_parameters for 5.x
                  "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                  "rope_scaling": None, "attention_bias": bool(c.bias), "mlp_bias": bool(c.bias),
                  "attention_dropout": c.dropout, "pretraining_tp": 1}
    if not c.tie_embeddings:  # GPT-NeoX files (Pythia's, transformers 4.x) name the head embed_out
        out["embed_out.weight" if family == "gpt_neox" else "lm_head.weight"] = core["lm_head.weight"][:V]
    return config, {k: v.contiguous() for k, v in out.items()}


def _get(config: dict[str, Any], key: str, default: Any = None) -> Any:
    v = config.get(key, default)
    return default if v is None else v


def _refuse(path: Path, what: str) -> LatentLMError:
    return LatentLMError(f"{path} uses {what}, which latentlm's core cannot represent exactly")


def hf_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Our :class:`ModelConfig` for the shape in a Hugging Face ``config.json`` dict: GPT-2, GPT-NeoX
    (Pythia), or a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2...), with exactly ``vocab_size``
    head rows. Enough for FLOP counting of any such teacher; :func:`from_hf` adds the checks for exact weights."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        d = int(hf["n_embd"])
        return ModelConfig(arch="gpt2", vocab_size=int(hf["vocab_size"]), block_size=int(_get(hf, "n_positions", 1024)),
                           n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=d,
                           ffn_hidden=int(_get(hf, "n_inner", 4 * d)), norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
                           mlp="gelu_exact" if _get(hf, "activation_function", "gelu_new") == "gelu" else None,
                           tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)), vocab_multiple=1)
    if kind == "gpt_neox":  # transformers 4.x: rotary_pct / rotary_emb_base; 5.x: rope_parameters
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        return ModelConfig(arch="neox", vocab_size=int(hf["vocab_size"]),
                           block_size=int(_get(hf, "max_position_embeddings", 2048)),
                           n_layer=int(hf["num_hidden_layers"]), n_head=int(hf["num_attention_heads"]),
                           n_embd=int(hf["hidden_size"]), ffn_hidden=int(hf["intermediate_size"]),
                           mlp="gelu_exact" if _get(hf, "hidden_act", "gelu") == "gelu" else "gelu",
                           norm_eps=float(_get(hf, "layer_norm_eps", 1e-5)),
                           rope_theta=float(rope.get("rope_theta", _get(hf, "rotary_emb_base", 10000.0))),
                           rotary_pct=float(rope.get("partial_rotary_factor", _get(hf, "rotary_pct", 0.25))),
                           parallel_residual=bool(_get(hf, "use_parallel_residual", True)),
                           tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)), vocab_multiple=1)
    if all(k in hf for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")):
        heads = int(hf["num_attention_heads"])
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        return ModelConfig(arch="llama", vocab_size=int(hf["vocab_size"]),
                           block_size=int(_get(hf, "max_position_embeddings", 2048)),
                           n_layer=int(hf["num_hidden_layers"]), n_head=heads,
                           n_kv_head=int(_get(hf, "num_key_value_heads", heads)), n_embd=int(hf["hidden_size"]),
                           ffn_hidden=int(hf["intermediate_size"]), norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
                           rope_theta=float(rope.get("rope_theta", _get(hf, "rope_theta", 10000.0))),
                           tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
                           bias=bool(_get(hf, "attention_bias", False)), vocab_multiple=1)
    raise LatentLMError(f"unsupported Hugging Face model_type {kind!r}: latentlm understands gpt2, gpt_neox and "
                        "Llama-style decoders (hidden_size, intermediate_size, num_hidden_layers)")


def from_hf(config: dict[str, Any], tensors: dict[str, torch.Tensor], vocab_size: int, path: Path
            ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our ``(ModelConfig, core weights)`` equal to a Hugging Face GPT-2 / Llama / GPT-NeoX ``config``
    and ``tensors``; the vocabulary is cut to the tokenizer's ``vocab_size`` ids."""
    family = config.get("model_type")
    if family not in HF_CLASSES:
        raise LatentLMError(f"{path}/config.json has model_type {family!r}; latentlm imports "
                            f"{', '.join(f'{k} ({v})' for k, v in HF_CLASSES.items())}")
    # Older GPT-2 files lack the "transformer." prefix and carry causal-mask buffers (GPT-NeoX's too);
    # Llama and GPT-NeoX may carry inv_freq; GPT-NeoX files name the head embed_out (transformers 4.x).
    buffers = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")
    sd = {(k if family != "gpt2" or k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v.float()
          for k, v in tensors.items() if not k.endswith(buffers)}
    if family == "gpt_neox" and "embed_out.weight" in sd:
        sd["lm_head.weight"] = sd.pop("embed_out.weight")
    V_hf = int(config["vocab_size"])
    if vocab_size > V_hf:
        raise LatentLMError(f"the tokenizer has {vocab_size} ids but {path} has only {V_hf} embedding rows; "
                            "use the tokenizer the model was trained with")
    tied = bool(_get(config, "tie_word_embeddings", family != "gpt_neox"))  # GPTNeoXConfig's default: untied
    core: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise LatentLMError(f"{path} has no tensor {key}; the weights do not match its config.json")
        used.add(key)
        return sd[key]

    if family == "gpt2":
        d, n_layer, n_head = int(config["n_embd"]), int(config["n_layer"]), int(config["n_head"])
        act = _get(config, "activation_function", "gelu_new")
        if act not in GELU_FROM_HF:
            raise _refuse(path, f"activation_function={act!r} (our GELU is the tanh approximation or the erf form)")
        if _get(config, "scale_attn_by_inverse_layer_idx", False) or not _get(config, "scale_attn_weights", True):
            raise _refuse(path, "non-standard attention scaling")
        core["wte.weight"] = take("transformer.wte.weight")
        core["wpe.weight"] = take("transformer.wpe.weight")
        for i in range(n_layer):
            s, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                for kind in (".weight", ".bias"):
                    core[s + ours + kind] = take(h + theirs + kind)
            for name, w in zip("qkv", take(h + "attn.c_attn.weight").t().split(d)):
                core[s + f"attn.{name}_proj.weight"] = w
            for name, b in zip("qkv", take(h + "attn.c_attn.bias").split(d)):
                core[s + f"attn.{name}_proj.bias"] = b
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                core[s + ours + ".weight"] = take(h + theirs + ".weight").t()
                core[s + ours + ".bias"] = take(h + theirs + ".bias")
        core["norm_f.weight"], core["norm_f.bias"] = take("transformer.ln_f.weight"), take("transformer.ln_f.bias")
    elif family == "gpt_neox":
        d, n_layer = int(config["hidden_size"]), int(config["num_hidden_layers"])
        n_head = int(config["num_attention_heads"])
        hd = d // n_head
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise _refuse(path, f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
        act = _get(config, "hidden_act", "gelu")
        if act not in GELU_FROM_HF:
            raise _refuse(path, f"hidden_act={act!r} (our GELU is the tanh approximation or the erf form)")
        attention_bias = bool(_get(config, "attention_bias", True))  # without: exact zeros in our biased core
        core["wte.weight"] = take("gpt_neox.embed_in.weight")
        for i in range(n_layer):
            s, h = f"blocks.{i}.", f"gpt_neox.layers.{i}."
            for ours, theirs in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
                for kind in (".weight", ".bias"):
                    core[s + ours + kind] = take(h + theirs + kind)
            # query_key_value rows are grouped per head: [q_h, k_h, v_h] for each head h
            w = take(h + "attention.query_key_value.weight").view(n_head, 3, hd, d)
            b = take(h + "attention.query_key_value.bias").view(n_head, 3, hd) if attention_bias \
                else w.new_zeros(n_head, 3, hd)
            for j, name in enumerate("qkv"):
                core[s + f"attn.{name}_proj.weight"] = w[:, j].reshape(d, d)
                core[s + f"attn.{name}_proj.bias"] = b[:, j].reshape(d)
            core[s + "attn.o_proj.weight"] = take(h + "attention.dense.weight")
            core[s + "attn.o_proj.bias"] = take(h + "attention.dense.bias") if attention_bias else w.new_zeros(d)
            for ours, theirs in (("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h")):
                core[s + ours + ".weight"] = take(h + theirs + ".weight")
                core[s + ours + ".bias"] = take(h + theirs + ".bias")
        core["norm_f.weight"] = take("gpt_neox.final_layer_norm.weight")
        core["norm_f.bias"] = take("gpt_neox.final_layer_norm.bias")
    else:
        d, n_layer = int(config["hidden_size"]), int(config["num_hidden_layers"])
        n_head = int(config["num_attention_heads"])
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise _refuse(path, f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
        if _get(config, "hidden_act", "silu") != "silu":
            raise _refuse(path, f"hidden_act={config['hidden_act']!r} (our SwiGLU uses silu)")
        if _get(config, "head_dim", d // n_head) != d // n_head:
            raise _refuse(path, f"head_dim={config['head_dim']} != hidden_size / num_attention_heads")
        bias = bool(_get(config, "attention_bias", False))
        if bool(_get(config, "mlp_bias", False)) != bias:
            raise _refuse(path, "attention_bias != mlp_bias (our model.bias covers both)")
        core["wte.weight"] = take("model.embed_tokens.weight")
        for i in range(n_layer):
            s, h = f"blocks.{i}.", f"model.layers.{i}."
            names = [(f"attn.{p}_proj", f"self_attn.{p}_proj", bias) for p in "qkvo"]
            names += [(f"mlp.{p}", f"mlp.{p}_proj", bias) for p in ("gate", "up", "down")]
            names += [("norm1", "input_layernorm", False), ("norm2", "post_attention_layernorm", False)]
            for ours, theirs, has_bias in names:
                core[s + ours + ".weight"] = take(h + theirs + ".weight")
                if has_bias:
                    core[s + ours + ".bias"] = take(h + theirs + ".bias")
        core["norm_f.weight"] = take("model.norm.weight")
    mc = dataclasses.replace(hf_model_config(config), vocab_size=vocab_size, vocab_multiple=ModelConfig.vocab_multiple,
                             tie_embeddings=tied)
    mc.validate()
    if tied:
        used.add("lm_head.weight")  # some files store the tied copy too
    else:
        core["lm_head.weight"] = take("lm_head.weight")
    extra = sorted(set(sd) - used)
    if extra:
        raise LatentLMError(f"{path} has tensor {extra[0]} (and {len(extra) - 1} more) that latentlm's "
                            f"{family} core has no place for")
    padded = mc.padded_vocab_size
    for key in ("wte.weight", "lm_head.weight"):
        if key in core:
            rows = core[key][:vocab_size]
            core[key] = torch.cat([rows, rows.new_zeros(padded - vocab_size, rows.shape[1])])
    if tied:
        core["lm_head.weight"] = core["wte.weight"]
    return mc, core
