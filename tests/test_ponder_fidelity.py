"""Fidelity to the authors' code (issue 13), each against an independent reference written here in
plain torch from the papers' equations: a Llama stack over input embeddings (RMSNorm, RoPE, causal
attention, SwiGLU) read from the state dict, and on top of it PonderLM v1's pondering, one pause
token repeated K times, PonderLM-2's interpolated thoughts, and the authors' truncated-normal init.
Also: the old behaviours stay reachable by name, and configs / checkpoints saved before the new keys
existed load with the old behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentlm.config import config_from_dict, make_config
from latentlm.methods import build_method
from latentlm.methods.base import Method
from latentlm.methods.ponder import paper_embed_scale
from latentlm.presets import PRESET_DIR

from conftest import assert_cached_matches_parallel, k_override

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, T, D, LAYERS, HEADS = 61, 6, 32, 2, 2  # 61: the embedding has padded rows (64)
SCALE = paper_embed_scale(D)


def tiny(method: str, k: int = 1, *extra: str, seed: int = 0) -> Method:
    """A 2-layer llama of width 32 with the authors' init and embedding scale, in eval mode."""
    torch.manual_seed(seed)
    cfg = make_config(overrides=["--train.method", method, "--model.arch", "llama", "--model.n_layer", str(LAYERS),
                                 "--model.n_embd", str(D), "--model.n_head", str(HEADS), "--model.block_size", "64",
                                 "--model.vocab_size", str(VOCAB), "--model.init", "trunc_normal",
                                 "--model.embed_scale", str(SCALE), *k_override(method, k), *extra])
    return build_method(cfg).eval()


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the reference: a Llama decoder in plain torch, weights read from the method's state dict ---------

class Reference:
    """hidden(e, pos): the block stack over input embeddings e [B, S, d] at position ids pos [S]
    (causal by slot order, several slots may share a position); head(h): final RMSNorm, then the LM
    head's first V rows; norm(h): the final RMSNorm alone; W: the token embedding rows [V, d]."""

    def __init__(self, method: Method):
        self.sd = {k: v.detach() for k, v in method.state_dict().items()}
        c = method.model.cfg
        self.eps, self.theta, self.layers, self.heads = c.norm_eps, c.rope_theta, c.n_layer, c.n_head
        self.W = self.sd["model.wte.weight"][:VOCAB]

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def hidden(self, e: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, s, d = e.shape
        hd = d // self.heads
        inv_freq = 1.0 / self.theta ** (torch.arange(0, hd, 2).float() / hd)
        angle = pos.float()[:, None] * inv_freq[None]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

        def rope(t):  # rotate-half convention
            return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

        causal = torch.ones(s, s, dtype=torch.bool).tril()
        h = e
        for i in range(self.layers):
            p = lambda name: self.sd[f"model.blocks.{i}.{name}.weight"]  # noqa: E731
            a = self.rms(h, p("norm1"))
            q, k, v = ((a @ p(f"attn.{n}_proj").T).view(b, s, self.heads, hd).transpose(1, 2) for n in "qkv")
            scores = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd)
            att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
            h = h + att.transpose(1, 2).reshape(b, s, d) @ p("attn.o_proj").T
            m = self.rms(h, p("norm2"))
            h = h + (F.silu(m @ p("mlp.gate").T) * (m @ p("mlp.up").T)) @ p("mlp.down").T
        return h

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.rms(h, self.sd["model.norm_f.weight"])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) @ self.sd["model.lm_head.weight"][:VOCAB].T

    def logits(self, e: torch.Tensor) -> torch.Tensor:
        """A plain pass over T token slots at positions 0..T-1."""
        return self.head(self.hidden(e, torch.arange(e.shape[1])))


def positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1])[None].expand(x.shape[0], -1)


# --- 1. PonderLM v1 -------------------------------------------------------------------------------

def ponderlm_reference(ref: Reference, x: torch.Tensor, k: int, rule: str, multiply: bool, s: float) -> torch.Tensor:
    """PonderLM (arXiv 2505.20674): p = softmax(logits); the pondering embedding p @ (W_E s) is added
    to the previous step's input (the paper, rule "v1"; the official runs of 410M+ start from e0 K) or
    to the first input (the PonderLM-2 repo's baseline, rule "e0")."""
    e0 = ref.W[x] * SCALE
    e = e0 * k if multiply else e0
    for _ in range(k):
        ponder = ref.logits(e).softmax(-1) @ (ref.W * s)
        e = (e if rule == "v1" else e0) + ponder
    return ref.logits(e)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("options, rule, multiply, s", [
    ([], "v1", False, SCALE),  # the default: the paper's rule, the tokens' own scale
    (["--ponderlm.multiply_start", "true"], "v1", True, SCALE),
    (["--ponderlm.update", "from_e0"], "e0", False, SCALE),
    (["--ponderlm.update", "from_e0", "--ponderlm.mix_scale", "sqrt_d"], "e0", False, math.sqrt(D)),  # before
])
def test_ponderlm_matches_the_papers_equations(k, options, rule, multiply, s):
    method = tiny("ponderlm", k, *options)
    x = tokens()
    with torch.no_grad():
        got = method.logits(x, positions(x))
    torch.testing.assert_close(got, ponderlm_reference(Reference(method), x, k, rule, multiply, s), atol=2e-4, rtol=0)


def test_ponderlm_rules_agree_at_one_step_and_differ_at_three():
    """The two update rules (and so latentlm before and after this change, scale aside) give the same
    model at K = 1 and different ones at K = 3."""
    x = tokens()
    out = {}
    for k in (1, 3):
        for update in ("cumulative", "from_e0"):
            method = tiny("ponderlm", k, "--ponderlm.update", update)
            with torch.no_grad():
                out[k, update] = method.logits(x, positions(x))
    torch.testing.assert_close(out[1, "cumulative"], out[1, "from_e0"], atol=1e-5, rtol=0)
    assert (out[3, "cumulative"] - out[3, "from_e0"]).abs().max() > 0.05


# --- 2. pause tokens ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shared", [True, False])
def test_pause_matches_an_interleaved_reference(k, shared):
    """One learned pause token repeated K times after every token (Goyal et al.; the authors' code),
    or K distinct ones: slots x_t, p.., all at position t; the last pause slot predicts x_{t+1}."""
    method = tiny("pause", k, "--pause.shared", str(shared).lower())
    assert method.pause.shape == ((1 if shared else k), D)
    ref, x = Reference(method), tokens()
    pauses = method.pause.detach() * SCALE
    slots, pos = [], []
    for t in range(T):
        slots += [ref.W[x[:, t]] * SCALE] + [pauses[0 if shared else j].expand(2, -1) for j in range(k)]
        pos += [t] * (k + 1)
    expected = ref.head(ref.hidden(torch.stack(slots, 1), torch.tensor(pos))[:, k::k + 1])
    with torch.no_grad():
        torch.testing.assert_close(method.logits(x, positions(x)), expected, atol=2e-4, rtol=0)


# --- 3. the scale of pondering embeddings / interpolated thoughts, 5. interpolation thoughts -----------

def thought_reference(ref: Reference, x: torch.Tensor, k: int, kind: str, topk: int = 0) -> torch.Tensor:
    """The exact PonderLM-2 model, sequential and without a cache: before predicting x_{t+1} the model
    emits K thoughts at position t, each made from the hidden state of the slot before it: norm_f(h)
    (the default), or the softmax(logits)-weighted mix of the scaled token embeddings (the interpolation
    ablation; top-k: softmax over the k largest logits only). Logits [B, T, V] from each last thought."""
    slots, pos, out = [], [], []
    for t in range(x.shape[1]):
        slots.append(ref.W[x[:, t]] * SCALE)
        pos.append(t)
        for j in range(k + 1):
            h = ref.hidden(torch.stack(slots, 1), torch.tensor(pos))[:, -1]
            if j == k:
                out.append(ref.head(h))
                break
            if kind == "hidden":
                slots.append(ref.norm(h))
            else:
                logits = ref.head(h)
                if topk:
                    values, ids = logits.topk(topk, -1)
                    thought = torch.einsum("bk,bkd->bd", values.softmax(-1), (ref.W * SCALE)[ids])
                else:
                    thought = logits.softmax(-1) @ (ref.W * SCALE)
                slots.append(thought)
            pos.append(t)
    return torch.stack(out, 1)


INTERP = [("hidden", 0), ("interpolate", 0), ("interpolate", 5)]


def interp_options(kind: str, topk: int) -> list[str]:
    return ["--ponder.thought", kind, *(["--ponder.thought_topk", str(topk)] if topk else [])]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind, topk", INTERP)
def test_thoughts_match_the_sequential_reference(k, kind, topk):
    """Exact evaluation (cached, slot by slot) and Jacobi iteration run to full exactness both equal the
    reference model; after one Jacobi iteration only the first 1 + 1 // K positions do."""
    method = tiny("ponder", k, *interp_options(kind, topk))
    x = tokens()
    expected = thought_reference(Reference(method), x, k, kind, topk)
    with torch.no_grad():
        torch.testing.assert_close(method.exact_logits(x), expected, atol=2e-4, rtol=0)
        full, _ = method.jacobi_logits(x, k * (T - 1))
        torch.testing.assert_close(full, expected, atol=2e-4, rtol=0)
        one, residual = method.jacobi_logits(x, 1)
    m = 1 + 1 // k
    torch.testing.assert_close(one[:, :m], expected[:, :m], atol=2e-4, rtol=0)
    assert (one[:, m] - expected[:, m]).abs().max() > 1e-4 and residual > 0
    if kind == "interpolate":  # the thought mixes embeddings at the tokens' own scale, not sqrt(d)
        h = torch.randn(3, D)
        w = method.model.wte.weight[:VOCAB] * SCALE
        if not topk:
            torch.testing.assert_close(method.interpolate(h), method.model.head(h).softmax(-1) @ w)


def two_prompts() -> list[list[int]]:
    return [tokens(1, 3, seed=4)[0].tolist(), tokens(1, 6, seed=5)[0].tolist()]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("topk", [0, 5])
def test_interpolated_thoughts_generate_from_a_padded_batch(k, topk):
    """Cached generation (left-padded batch of two prompts) gives the exact model's logits at every
    position of each row alone, as for the default thought (test_ponder.py)."""
    method = tiny("ponder", k, *interp_options("interpolate", topk))
    assert_cached_matches_parallel(method, two_prompts(), method.exact_logits)


def counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind, topk", INTERP)
def test_flops_count_interpolated_thoughts(k, kind, topk):
    """Jacobi forward and a cached decode step equal their formulas; an interpolated thought adds the
    head and one V x d mix (top-k mixes densely too): K(K+1)/2 + n K of them per token in a Jacobi
    forward, K per generated token. The hidden thought's counts are those of test_ponder.py."""
    n = 2
    method = tiny("ponder", k, "--ponder.eval_iters", str(n), *interp_options(kind, topk))
    x = tokens()
    assert counted(lambda: method(x, x, nll=True)) == method.forward_flops_per_token(T, n) * x.numel()
    per_thought = 2 * D * 64 + 2 * VOCAB * D  # padded head rows, real-vocabulary mix
    assert method.thought_flops() == (per_thought if kind == "interpolate" else 0)
    hidden = tiny("ponder", k, "--ponder.eval_iters", str(n))
    assert method.forward_flops_per_token(T, n) - hidden.forward_flops_per_token(T, n) == \
        (k * (k + 1) / 2 + n * k) * method.thought_flops()
    cache = method.new_cache(1, T + 1)
    valid = torch.ones(1, T + 1, dtype=torch.bool)
    with torch.no_grad():
        method.step(x[:1, :T], torch.arange(T)[None], valid[:, :T], cache)
    got = counted(lambda: method.step(x[:1, :1], torch.tensor([[T]]), valid[:, :1], cache))
    slack = 4 * LAYERS * D * k * (k + 1) // 2  # thoughts see a cache growing by one slot (test_flops.py)
    assert got + slack == method.infer_flops_per_token(T + 1)


def test_flops_report_covers_the_new_options():
    """`latentlm flops` (flops_report) counts interpolated thoughts; the other new options leave the
    counts unchanged (their math is the same number of matmuls)."""
    from latentlm.methods import flops_report

    base = ["--model.arch", "llama", "--model.n_layer", "2", "--model.n_embd", "64", "--model.n_head", "2",
            "--model.block_size", "128", "--model.vocab_size", "1000"]
    rows = lambda *o: {r["method"]: r for r in flops_report(make_config(overrides=[*base, *o]),  # noqa: E731
                                                            ["ponder", "pause", "ponderlm"])}
    plain, interp = rows(), rows("--ponder.thought", "interpolate")
    old = rows("--pause.shared", "false", "--pause.n_pauses", "1", "--ponderlm.update", "from_e0",
               "--ponderlm.mix_scale", "sqrt_d", "--ponderlm.multiply_start", "true")
    assert interp["ponder"]["train_student"] > plain["ponder"]["train_student"]
    assert interp["ponder"]["infer"] - plain["ponder"]["infer"] == 2 * 64 * 1024 + 2 * 1000 * 64
    for name in ("pause", "ponderlm"):
        assert old[name]["train_student"] == plain[name]["train_student"] and old[name]["infer"] == plain[name]["infer"]


# --- 4. initialisation --------------------------------------------------------------------------------

def truncated_std(std: float) -> float:
    """The std of Normal(0, std) truncated at +-3 std."""
    phi3 = math.exp(-4.5) / math.sqrt(2 * math.pi)
    mass = math.erf(3 / math.sqrt(2))
    return std * math.sqrt(1 - 2 * 3 * phi3 / mass)


def test_trunc_normal_init_is_the_authors():
    """The authors' PonderLM-2 / baseline init: every linear and embedding weight from a normal of
    std s = sqrt(2 / (5 d)) truncated at +-3 s, the attention and MLP output projections at
    s / sqrt(2 L) (truncated at 3 of their std), norm gains one. A pause token is drawn like a token
    embedding."""
    torch.manual_seed(0)
    d, layers = 256, 3
    cfg = make_config(overrides=["--train.method", "pause", "--model.arch", "llama", "--model.n_layer", str(layers),
                                 "--model.n_embd", str(d), "--model.n_head", "4", "--model.vocab_size", "2048",
                                 "--model.block_size", "64", "--model.init", "trunc_normal"])
    method = build_method(cfg)
    s = math.sqrt(2 / (5 * d))
    assert cfg.model.trunc_normal_std == pytest.approx(s)
    for name, w in method.named_parameters():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_f.weight"):
            assert torch.equal(w, torch.ones_like(w)), name
            continue
        std = s / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down.weight")) else s
        assert w.abs().max() <= 3 * std * (1 + 1e-6), name
        assert w.std().item() == pytest.approx(truncated_std(std), rel=0.08 if w.numel() < 1000 else 0.03), name
        assert abs(w.mean().item()) < 0.1 * std, name
    # the preset's point: the sqrt(2.5 d)-scaled token embedding has (nearly) unit std
    assert (method.model.wte.weight * paper_embed_scale(d)).std().item() == pytest.approx(truncated_std(1.0), rel=0.03)


def test_hf_normal_and_normal_inits():
    """hf_normal: Normal(0, init_std) for every weight, no depth scaling (the authors' vanilla control);
    normal (the default, unchanged): exactly the draws of a hand-rolled GPT-2 init in module order
    (Normal(0, init_std), the residual output projections at init_std / sqrt(2 L))."""
    over = ["--model.arch", "llama", "--model.n_layer", "4", "--model.n_embd", "128", "--model.n_head", "4",
            "--model.vocab_size", "512", "--model.block_size", "32", "--model.init_std", "0.05"]
    torch.manual_seed(0)
    hf = build_method(make_config(overrides=[*over, "--model.init", "hf_normal"])).model
    for name, w in hf.named_parameters():
        if "norm" not in name:
            assert w.std().item() == pytest.approx(0.05, rel=0.1), name
    model = build_method(make_config(overrides=over)).model
    assert model.cfg.init == "normal"
    torch.manual_seed(5)
    model.reset_parameters()
    got = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                residual = name.endswith(("o_proj", "down"))
                mod.weight.normal_(0.0, 0.05 / math.sqrt(2 * 4) if residual else 0.05)
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["llama-125m", "llama-410m", "llama-834m", "llama-1.4b", "llama-2.8b", "tiny"])
def test_ponder_presets_use_the_authors_init_for_every_method(name):
    """The PonderLM-2 presets reproduce the official init, and it is a model setting: every method a
    preset trains (--train.method ponder | ntp | pause | loop | ponderlm) shares it."""
    cfg = make_config(PRESET_DIR / "ponder" / f"{name}.yaml")
    assert cfg.model.init == "trunc_normal"
    assert cfg.model.embed_scale == pytest.approx(math.sqrt(2.5 * cfg.model.n_embd), rel=1e-6)
    assert "trunc_normal" in cfg.model.init_description()


# --- backward compatibility -------------------------------------------------------------------------

def saved_before(method: str, k: int) -> dict:
    """A config as latentlm saved it before the new keys existed: today's to_dict without them."""
    cfg = make_config(overrides=["--train.method", method, *k_override(method, k)])
    data = cfg.to_dict()
    for section, key in (("ponderlm", "update"), ("ponderlm", "multiply_start"), ("ponderlm", "mix_scale"),
                         ("pause", "shared"), ("ponder", "thought"), ("ponder", "thought_topk"), ("model", "init")):
        data.get(section, {}).pop(key, None)
    return data


def test_configs_saved_before_load_with_the_old_behaviour():
    pondered = config_from_dict(saved_before("ponderlm", 3))
    assert (pondered.ponderlm.update, pondered.ponderlm.mix_scale, pondered.ponderlm.multiply_start) == \
        ("from_e0", "sqrt_d", False)
    paused = config_from_dict(saved_before("pause", 3))
    assert paused.pause.shared is False and paused.model.init == "normal"
    thought = config_from_dict(saved_before("ponder", 2))
    assert (thought.ponder.thought, thought.ponder.thought_topk) == ("hidden", 0)
    # a config written today keeps what it says; one a user writes gets today's defaults
    assert config_from_dict(make_config(overrides=["--train.method", "pause"]).to_dict()).pause.shared is True
    assert make_config(overrides=["--train.method", "ponderlm"]).ponderlm.update == "cumulative"


def test_an_old_pause_checkpoint_with_k_vectors_loads(tmp_path, monkeypatch):
    """A pause checkpoint written before ``pause.shared`` existed (K = 3 vectors, a config without the
    key) loads with its K vectors and computes what it computed."""
    from latentlm.loading import load_method
    from latentlm.train import checkpoint as ckpt_io

    method = tiny("pause", 3, "--pause.shared", "false", seed=3)
    cfg = method.cfg
    old_save = ckpt_io.save_yaml

    def save_without_new_keys(c, path):
        old_save(c, path)
        data = yaml.safe_load(open(path))
        del data["pause"]["shared"], data["model"]["init"]
        open(path, "w").write(yaml.safe_dump(data, sort_keys=False))

    monkeypatch.setattr(ckpt_io, "save_yaml", save_without_new_keys)
    ckpt_io.write_checkpoint(tmp_path, method.state_dict(), cfg, step=0, extra={"tokenizer": {"name": "byte"}})
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "shared" not in saved["pause"]
    loaded, loaded_cfg, _ = load_method(tmp_path)
    assert loaded_cfg.pause.shared is False and loaded.pause.shape == (3, D)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x[:, :-1], x[:, 1:], nll=True), method(x[:, :-1], x[:, 1:], nll=True))


# --- the comparison report says which init was used -------------------------------------------------

def test_compare_report_names_the_init(tmp_path):
    from latentlm.report import write_report

    def row(name: str, init: str, scale: float) -> dict:
        cfg = make_config(overrides=["--model.init", init, "--model.embed_scale", str(scale)])
        return {"name": name, "method": "ntp", "init": cfg.model.init_description(), "embed_scale": scale,
                "params": 1e6, "tokens": 100, "steps": 1, "flops_per_token": 1e6, "teacher_flops_per_token": 0,
                "train_flops": 1e8, "infer_flops_per_token": 1e6, "tok_per_s": 1.0,
                "val": {"loss": 1.0, "ppl": 2.7, "bpb": 1.0}, "zeroshot": {}, "curve": []}

    exp = {"name": "x", "budget": {"tokens": 100}}
    same = write_report(exp, [row("a", "trunc_normal", 2.0), row("b", "trunc_normal", 2.0)], tmp_path, 1.0)
    text = same.read_text()
    assert "the same for every run: trunc_normal: std sqrt(2/(5d)) = 0.02282 cut at +-3 std" in text  # d 768
    assert "token embeddings times 2." in text
    differs = write_report(exp, [row("a", "trunc_normal", 2.0), row("b", "hf_normal", 1.0)], tmp_path, 1.0).read_text()
    assert "Initialisation differs between runs" in differs and "b: hf_normal: Normal(0, 0.02)" in differs


def test_fidelity_benchmark_runs(tmp_path):
    """benchmarks/ponder_fidelity.py (the table of docs/PONDER.md) runs end to end at 2 steps: a row
    with a logit gap, one with the emulated padded vocabulary, and the prefill row."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "ponder_fidelity.py"
    p = subprocess.run([sys.executable, str(script), "--steps", "2", "--only", "ponderlm_update,padded_vocab,prefill"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in p.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3
    assert float(rows[0][1]) > 0.05 and all(math.isfinite(float(c)) for c in rows[0][2:])
    assert rows[1][1] == "-" and math.isfinite(float(rows[1][4]))
    assert "prefill" in rows[2][0] and "/" in rows[2][1]
