"""CoCoMix against the paper and the authors' procedure (issue 13, docs/COCOMIX.md "Differences from the
authors' code"): the teacher's precision, the paper's Eq. (1), the last position's labels from the
window's extra token, the per-position weighting of the concept loss, the sign of the attribution and
the hidden-state ablation of Fig. 6b. References are plain torch written from the equations here."""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentlm.concepts.attribution import concept_labels
from latentlm.concepts.labels import CachedLabels, OnTheFlyLabels, build_label_cache, label_source
from latentlm.concepts.sae import TopKSAE, load_sae, train_sae
from latentlm.concepts.teacher import LatentLMTeacher, load_teacher, teacher_dtype
from latentlm.config import config_from_dict, make_config
from latentlm.data.loader import TokenSplit, iter_eval_windows
from latentlm.data.tokenizers import ByteTokenizer
from latentlm.errors import LatentLMError
from latentlm.loading import load_config
from latentlm.methods import build_method, flops_report
from latentlm.methods.concept_head import ConceptHead, label_norm
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import Transformer
from latentlm.train.metrics import read_metrics
from latentlm.train.trainer import train

from conftest import TINY_MODEL, assert_cached_matches_parallel
from test_labels import LAYER, SEQ, run_cfg, sae_dir, small_data, teacher_run  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_HF = find_spec("transformers") is not None


def tiny_teacher(arch: str = "gpt2", dtype=torch.float64, seed: int = 0) -> LatentLMTeacher:
    over = ["--model.arch", arch, "--model.n_layer", "3", "--model.n_embd", "32", "--model.n_head", "4",
            "--model.block_size", "32", "--model.vocab_size", "257", "--model.init_std", "0.1"]
    if arch == "llama":
        over += ["--model.n_kv_head", "2"]  # grouped-query attention: the per-position mode must handle it
    torch.manual_seed(seed)
    return LatentLMTeacher.from_model(Transformer(make_config(overrides=over).model), ByteTokenizer(), dtype=dtype)


def random_sae(d: int = 32, c: int = 64, k: int = 6, dtype=torch.float64) -> TopKSAE:
    torch.manual_seed(3)
    sae = TopKSAE(d, c, k).to(dtype)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    return sae


def trunk(model: Transformer, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream after block ``layer``, from the model's pieces."""
    pos = torch.arange(idx.shape[1])
    x = model.wte(idx) + (model.wpe(pos) if model.wpe is not None else 0)
    return model.run_blocks(x, pos, 0, layer + 1)


def layer_norm_stats(h: torch.Tensor):
    mu = h.mean(-1, keepdim=True)
    s = ((h - mu).pow(2).sum(-1, keepdim=True) / (h.shape[-1] - 1)).sqrt()
    return (h - mu) / (s + 1e-5), mu, s


def top_positive(scores: torch.Tensor, k_attr: int, rows: int) -> torch.Tensor:
    """Per token of the first ``rows`` positions: the indices of the largest strictly positive scores,
    -1 fillers; later positions all -1."""
    B, T, _ = scores.shape
    out = torch.full((B, T, k_attr), -1, dtype=torch.long)
    for b in range(B):
        for t in range(rows):
            top = scores[b, t].topk(k_attr)
            keep = top.values > 0
            out[b, t, :int(keep.sum())] = top.indices[keep]
    return out


# --- 1. the teacher's precision -------------------------------------------------------------


def test_teacher_dtype_settings():
    assert make_config().teacher.dtype == "float32"
    assert teacher_dtype(None, "cuda") == teacher_dtype("float32", "cuda") == torch.float32
    assert teacher_dtype("auto", "cuda") == teacher_dtype("bfloat16", "cpu") == torch.bfloat16
    assert teacher_dtype("auto", "cpu") == torch.float32
    with pytest.raises(LatentLMError, match="not one of float32, bfloat16, auto"):
        teacher_dtype("float16", "cpu")
    with pytest.raises(LatentLMError, match="teacher.dtype"):
        make_config(overrides=["--teacher.dtype", "float16"])


def test_the_teacher_computes_in_float32_inside_a_bf16_autocast():
    """The authors' teacher runs in float32 outside autocast: a bf16 training step around it changes nothing."""
    teacher = tiny_teacher(dtype=None)
    m = teacher.model
    assert teacher.dtype == torch.float32 and next(m.parameters()).dtype == torch.float32
    idx = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = trunk(m, idx, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lowered = trunk(m, idx, 1)  # what the core gives under autocast, for contrast
    assert (lowered.float() - ref).abs().max() > 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, g = teacher.hidden_and_grad(idx, 1)
        h2 = teacher.hidden(idx, 1)
    torch.testing.assert_close(h, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(h2, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(g, teacher.hidden_and_grad(idx, 1)[1], atol=1e-7, rtol=0)


def test_a_saved_config_without_the_dtype_keeps_the_old_teacher(tmp_path):
    """Configs saved before teacher.dtype existed get `auto` (bf16 on CUDA, float32 elsewhere, what the
    teacher was then); a user's own YAML gets the new default."""
    saved = {"train": {"method": "kd"}, "teacher": {"path": "runs/t"}}
    assert config_from_dict(saved).teacher.dtype == "auto"
    assert make_config(overrides=saved).teacher.dtype == "float32"
    assert config_from_dict({**saved, "teacher": {"path": "runs/t", "dtype": "bfloat16"}}).teacher.dtype == "bfloat16"
    legacy = next((__import__("pathlib").Path(__file__).parent / "fixtures/legacy/cocomix/checkpoints").glob("step_*"))
    assert load_config(legacy).teacher.dtype == "auto"  # a 0.1 checkpoint: its teacher moved into teacher:


def test_label_caches_record_and_check_the_teacher_dtype(teacher_run, sae_dir, small_data, tmp_path):
    built = {}
    for name in ("float32", "bfloat16"):
        out = tmp_path / name
        m = build_label_cache(small_data, load_teacher(str(teacher_run), dtype=name), load_sae(sae_dir), out,
                              seq_len=SEQ, layer=LAYER, batch_size=4, limit_windows=4, progress=False)
        assert m["teacher_dtype"] == name
        built[name] = out
    cfg = run_cfg(teacher_run, sae_dir, small_data)
    for run, cache, ok in (("float32", "float32", True), ("bfloat16", "bfloat16", True),
                           ("float32", "bfloat16", False), ("bfloat16", "float32", False), ("auto", "float32", True)):
        cfg.teacher.dtype = run
        if ok:
            CachedLabels(built[cache], cfg, small_data, SEQ)
            continue
        with pytest.raises(LatentLMError, match=rf"built with a {cache} teacher, this run's teacher.dtype is {run}; "
                                                rf"pass --teacher.dtype {cache}, or re-run `latentlm concepts label` "
                                                rf"with --teacher-dtype {run}") as e:
            CachedLabels(built[cache], cfg, small_data, SEQ)
        assert "\n" not in str(e.value)
    cfg.teacher.dtype = "auto"
    with pytest.raises(LatentLMError, match="built with a float32 teacher, this run's teacher.dtype is bfloat16"):
        CachedLabels(built["float32"], cfg, small_data, SEQ, device="cuda")  # auto on CUDA = bf16 (not run there)
    # A cache written before the dtype was recorded was built in float32 (latentlm then used float32 on the CPU).
    old = tmp_path / "old"
    shutil.copytree(built["float32"], old)
    m = json.loads((old / "manifest.json").read_text())
    del m["teacher_dtype"], m["score"], m["last_position"]
    (old / "manifest.json").write_text(json.dumps(m))
    for run, ok in (("float32", True), ("auto", True), ("bfloat16", False)):
        cfg.teacher.dtype = run
        if ok:
            CachedLabels(old, cfg, small_data, SEQ, device="cuda" if run == "auto" else "cpu")
        else:
            with pytest.raises(LatentLMError, match="built with a float32 teacher"):
                CachedLabels(old, cfg, small_data, SEQ)


def test_labels_on_the_fly_use_the_configured_teacher_dtype(teacher_run, sae_dir, small_data):
    cfg = run_cfg(teacher_run, sae_dir, small_data)
    assert OnTheFlyLabels(cfg, "cpu").teacher.dtype == torch.float32
    cfg.teacher.dtype = "bfloat16"
    assert OnTheFlyLabels(cfg, "cpu").teacher.dtype == torch.bfloat16


# --- 2. the paper's Eq. (1) -------------------------------------------------------------------


def eq1_scores(teacher: LatentLMTeacher, sae: TopKSAE, idx: torch.Tensor, layer: int, targets, acts: str):
    """Eq. (1) by hand, one backward per position: with the layer replaced by the SAE reconstruction
    D(c) = (c W_dec + b_dec) s + mu of the (dense, leaf) concept vector c, the gradient of position t's
    own next-token loss w.r.t. c_t, times the pre-activations (acts=pre) or the TopK latents (post)."""
    m = teacher.model
    B, T = idx.shape
    pos = torch.arange(T)
    with torch.no_grad():
        h = trunk(m, idx, layer)
        x_hat, mu, s = layer_norm_stats(h)
        pre = (x_hat - sae.b_dec) @ sae.W_enc + sae.b_enc
        v, i = pre.topk(sae.k, dim=-1)
        c = torch.zeros_like(pre).scatter(-1, i, v.relu())
    scores = torch.zeros_like(pre)
    for t in range(T if targets is not None else T - 1):
        leaf = c.clone().requires_grad_()
        rec = (leaf @ sae.W_dec + sae.b_dec) * s + mu
        logits = m.head(m.run_blocks(rec, pos, layer + 1, None))
        target = targets[:, t] if targets is not None else idx[:, t + 1]
        (grad,) = torch.autograd.grad(F.cross_entropy(logits[:, t].double(), target, reduction="sum"), leaf)
        scores[:, t] = (pre if acts == "pre" else c)[:, t] * grad[:, t]
    return scores


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("acts", ["pre", "post"])
@pytest.mark.parametrize("extra", [False, True])
def test_eq1_labels_equal_the_papers_equation(arch, acts, extra):
    teacher, sae = tiny_teacher(arch), random_sae()
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 257, (2, 10), generator=g)
    targets = torch.randint(0, 257, (2, 10), generator=g) if extra else None
    for layer in (0, 1):
        scores = eq1_scores(teacher, sae, idx, layer, targets, acts)
        labels = concept_labels(teacher, sae, idx, layer, acts=acts, score="eq1", targets=targets)
        expected = top_positive(scores, 4, 10 if extra else 9)
        assert torch.equal(labels, expected)
        assert (labels >= 0).sum() > labels.numel() // 4
        official = concept_labels(teacher, sae, idx, layer, acts=acts, targets=targets)
        assert not torch.equal(official, labels)  # the official gradient really is another one


def test_the_per_position_gradient_equals_one_backward_per_position():
    """The mode behind eq1 isolates each position's own loss (checked on the summed-loss gradient too)."""
    teacher = tiny_teacher("llama")
    m = teacher.model
    idx = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(9)
    with torch.no_grad():
        h = trunk(m, idx, 0)
    ref = torch.zeros_like(h)
    for t in range(9):
        leaf = h.clone().requires_grad_()
        loss = F.cross_entropy(m.head(m.run_blocks(leaf, pos, 1, None))[:, t].double(), y[:, t], reduction="sum")
        ref[:, t] = torch.autograd.grad(loss, leaf)[0][:, t]
    _, g = teacher.hidden_and_grad(idx, 0, targets=y, per_position=True)
    torch.testing.assert_close(g.double(), ref, atol=1e-6, rtol=1e-6)
    _, summed = teacher.hidden_and_grad(idx, 0, targets=y)
    assert (summed.double() - ref).abs().max() > 1e-2


@pytest.mark.skipif(not HAS_HF, reason="needs transformers (pip install 'latentlm[hf]')")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_per_position_gradient_of_a_hugging_face_teacher(arch, tmp_path, bpe_path):
    from test_teacher import save_tiny_hf

    save_tiny_hf(arch, tmp_path, bpe_path)
    teacher = load_teacher(str(tmp_path), dtype=torch.float64)
    model = teacher.model
    layers = model.transformer.h if arch == "gpt2" else model.model.layers
    idx = torch.randint(0, teacher.tokenizer.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model(input_ids=idx, output_hidden_states=True).hidden_states[2]
    ref = torch.zeros_like(h)
    for t in range(7):
        leaf = h.clone().requires_grad_()
        handle = layers[1].register_forward_hook(lambda mod, a, out: (leaf, *out[1:]) if isinstance(out, tuple) else leaf)
        try:
            logits = model(input_ids=idx, use_cache=False).logits
        finally:
            handle.remove()
        loss = F.cross_entropy(logits[:, t].double(), idx[:, t + 1], reduction="sum")
        ref[:, t] = torch.autograd.grad(loss, leaf)[0][:, t]
    _, g = teacher.hidden_and_grad(idx, 1, per_position=True)
    torch.testing.assert_close(g.double(), ref, atol=1e-7, rtol=1e-6)


# --- 4. the last position from the extra token; the per-position concept loss ---------------------


def test_the_extra_token_labels_the_last_position():
    """With the loader's y as targets the teacher's loss covers every position: the official scores are
    the gradient of sum_t CE(logits_t, y_t) at h, and the last position gets real labels."""
    teacher, sae = tiny_teacher(), random_sae()
    g = torch.Generator().manual_seed(7)
    window = torch.randint(0, 257, (2, 11), generator=g)
    x, y = window[:, :-1], window[:, 1:]
    m = teacher.model
    with torch.no_grad():
        h = trunk(m, x, 1)
    leaf = h.clone().requires_grad_()
    logits = m.head(m.run_blocks(leaf, torch.arange(10), 2, None))
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="sum"), leaf)
    with torch.no_grad():
        x_hat = layer_norm_stats(h)[0]
        pre = (x_hat - sae.b_dec) @ sae.W_enc + sae.b_enc
        v, i = pre.topk(sae.k, dim=-1)
        c = torch.zeros_like(pre).scatter(-1, i, v.relu())
    expected = top_positive((grad @ sae.W_dec.t()) * c, 4, 10)
    labels = concept_labels(teacher, sae, x, 1, targets=y)
    assert torch.equal(labels, expected) and (labels[:, -1] >= 0).any()
    assert (concept_labels(teacher, sae, x, 1)[:, -1] == -1).all()  # mask: as before


def test_extra_token_caches_equal_on_the_fly_labels_and_are_checked(teacher_run, sae_dir, small_data, tmp_path):
    out = tmp_path / "labels"
    m = build_label_cache(small_data, load_teacher(str(teacher_run)), load_sae(sae_dir), out, seq_len=SEQ,
                          layer=LAYER, last_position="extra_token", score="eq1", batch_size=3, limit_windows=5,
                          progress=False)
    assert (m["last_position"], m["score"]) == ("extra_token", "eq1")
    cfg = run_cfg(teacher_run, sae_dir, small_data, out, last_position="extra_token", score="eq1")
    cached, live = CachedLabels(out, cfg, small_data, SEQ), OnTheFlyLabels(cfg, "cpu")
    x, y = next(iter_eval_windows(TokenSplit(small_data, "train"), SEQ, 5))
    windows = torch.arange(5).numpy()
    assert torch.equal(cached.labels(x, windows), live.labels(x, windows, y))
    assert (cached.labels(x, windows)[:, -1] >= 0).any()
    for key, value in (("last_position", "mask"), ("score", "official")):
        other = run_cfg(teacher_run, sae_dir, small_data, out, **{**{"last_position": "extra_token", "score": "eq1"},
                                                                  key: value})
        with pytest.raises(LatentLMError, match=rf"built with {key} "):
            CachedLabels(out, other, small_data, SEQ)
    with pytest.raises(LatentLMError, match="needs the batch's next tokens"):
        live.labels(x, windows)


def test_the_concept_loss_per_position_and_per_label():
    """position: sum of CE over unmasked labels / (k_attr x positions), the authors' mean over positions
    (masked labels add zero); label: / the unmasked labels. They differ by the masked fraction."""
    torch.manual_seed(0)
    z = torch.randn(3, 5, 40)
    labels = torch.randint(0, 40, (3, 5, 4)).masked_fill(torch.rand(3, 5, 4) < 0.5, -1)
    keep = labels >= 0
    ce = torch.logsumexp(z, -1, keepdim=True) - z.gather(-1, labels.clamp(min=0))
    total = (ce * keep).sum()
    head = ConceptHead(8, 40, 4, 0.02)
    per_position, _ = head.loss(z, labels, 7, label_norm(labels, "position"))
    per_label, _ = head.loss(z, labels, 7, label_norm(labels))
    torch.testing.assert_close(per_position, total / (4 * 15))
    torch.testing.assert_close(per_label, total / keep.sum())
    full = torch.randint(0, 40, (3, 5, 4))  # nothing masked: the authors' (1/K) sum_i mean_t CE
    authors = sum(F.cross_entropy(z.flatten(0, 1), full[..., i].flatten()) for i in range(4)) / 4
    torch.testing.assert_close(head.loss(z, full, 7, label_norm(full, "position"))[0], authors)
    with pytest.raises(LatentLMError, match="'label' or 'position'"):
        label_norm(labels, "token")


def test_a_student_passes_its_concept_norm_and_the_extra_token():
    captured = {}

    class Source:
        n_latents, k = 64, 4

        def labels(self, x, windows, y=None):
            captured["y"] = y
            return torch.randint(0, 64, (*x.shape, 2)).masked_fill(torch.rand(*x.shape, 2) < 0.5, -1)

    cfg = make_config(overrides=["--train.method", "cocomix", "--model.n_layer", "2", "--model.n_embd", "16",
                                 "--model.n_head", "2", "--model.vocab_size", "61", "--cocomix.insert_layer", "1",
                                 "--cocomix.n_concepts", "64", "--cocomix.k_concepts", "4", "--concepts.k_attr", "2",
                                 "--cocomix.concept_norm", "position", "--concepts.last_position", "extra_token"])
    method = build_method(cfg)
    method._labels = Source()
    x, y = torch.randint(0, 61, (2, 6)), torch.randint(0, 61, (2, 6))
    extra = method.batch_inputs(x, y, windows=None, step=0)
    assert captured["y"] is y and extra["label_norm"] == 24.0  # 2 x 6 positions x k_attr 2
    with torch.no_grad():
        _, metrics = method(x, y, **extra)
        z = method.concept_logits(x)
    labels, keep = extra["labels"], extra["labels"] >= 0
    hits = (z.topk(2).indices[..., None, :] == labels[..., None]).any(-1) & keep
    torch.testing.assert_close(metrics["concept_acc"], hits.sum() / keep.sum())  # still per unmasked label


# --- 6. the sign of the attribution -----------------------------------------------------------------


def test_zeroing_the_top_label_lowers_the_teachers_loss(tiny_config, byte_wiki):
    """On a trained tiny teacher and an SAE trained on it: removing a position's top-labelled concept from
    the residual stream (its decoder direction times its activation, in the stream's scale) lowers the
    teacher's summed loss at most positions. The selected concepts are those whose removal helps."""
    cfg = tiny_config(max_steps=60)
    train(cfg)
    teacher = load_teacher(cfg.train.out_dir)
    split = TokenSplit(byte_wiki, "train")
    batches = (teacher.hidden(x, 0) for x, _ in iter_eval_windows(split, 32, 16))
    sae, _ = train_sae(batches, 32, 128, 8, steps=150, batch_tokens=512, progress=False)
    x, y = next(iter_eval_windows(TokenSplit(byte_wiki, "val"), 32, 4))
    labels = concept_labels(teacher, sae, x, 0, targets=y)
    m = teacher.model
    pos = torch.arange(32)

    def loss(h):
        return F.cross_entropy(m.head(m.run_blocks(h, pos, 1, None)).flatten(0, 1), y.flatten(), reduction="sum")

    with torch.no_grad():
        h = trunk(m, x, 0)
        base = loss(h)
        x_hat, mu, s = layer_norm_stats(h)
        pre = (x_hat - sae.b_dec) @ sae.W_enc + sae.b_enc
        lowered = tried = 0
        for b in range(4):
            for t in range(32):
                i = int(labels[b, t, 0])
                if i < 0:
                    continue
                h2 = h.clone()
                h2[b, t] -= pre[b, t, i].relu() * s[b, t, 0] * sae.W_dec[i]
                lowered += int(loss(h2) < base)
                tried += 1
    assert tried > 40 and lowered / tried > 0.9  # measured: 120 of 121


# --- 5. the hidden-state ablation (Fig. 6b) ------------------------------------------------------------


def hidden_student(loss: str = "l2", *extra: str, arch: str = "gpt2"):
    torch.manual_seed(0)
    cfg = make_config(overrides=["--train.method", "cocomix", "--model.arch", arch, "--model.n_layer", "3",
                                 "--model.n_embd", "32", "--model.n_head", "2", "--model.block_size", "32",
                                 "--model.vocab_size", "61", "--model.init_std", "0.1", "--cocomix.insert_layer", "1",
                                 "--cocomix.concept_target", f"hidden_{loss}", "--cocomix.n_concepts", "24", *extra])
    method = build_method(cfg).eval()
    with torch.no_grad():
        for name, p in method.named_parameters():
            if not name.startswith("model.") and p.dim() == 1:
                p.normal_(0.0, 0.3)
    return method


@pytest.mark.parametrize("loss", ["l1", "l2", "cosine"])
def test_the_hidden_target_student_follows_its_equations(loss):
    method = hidden_student(loss)
    head, m = method.concept_head, method.model
    assert not method.has_concepts and method.cfg.cocomix.k_concepts == 0
    x = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(8)
    with torch.no_grad():
        h = m.run_blocks(m.wte(x) + m.wpe(pos), pos, 0, 1)
        x_hat, mu, s = layer_norm_stats(h)
        p = (x_hat - head.b) @ head.predict.weight.t() + head.predict.bias
        c_hat = (p @ head.compress_layer.weight.t() + head.compress_layer.bias + head.b) * s + mu
        seq = torch.stack([h, c_hat], 2).flatten(1, 2)
        logits = m.head(m.run_blocks(seq, pos.repeat_interleave(2), 1)[:, 1::2])
        ntp = F.cross_entropy(logits.flatten(0, 1), x.flatten())
        dist = {"l1": (p - target).abs().mean(), "l2": (p - target).pow(2).mean(),
                "cosine": (1 - (p * target).sum(-1) / (p.norm(dim=-1) * target.norm(dim=-1))).mean()}[loss]
        total, metrics = method(x, x, hidden_target=target)
    torch.testing.assert_close(metrics["ntp_loss"], ntp, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["hidden_loss"], dist, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, ntp + 0.1 * dist, atol=1e-5, rtol=1e-5)
    with pytest.raises(LatentLMError, match="hidden states"):
        method(x, x)
    with pytest.raises(LatentLMError, match="no concept to steer"):
        method.set_steering([1], [2.0])


@pytest.mark.parametrize("extra", [(), ("--cocomix.mix", "add"), ("--cocomix.mix", "none")])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_hidden_target_generates_and_counts_its_flops(extra, arch):
    method = hidden_student("l2", *extra, arch=arch)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12]]
    assert_cached_matches_parallel(method, prompts, lambda x: method.run(x, torch.arange(x.shape[1])[None])[0])
    x = torch.randint(0, 61, (2, 8))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        method(x, x, hidden_target=torch.randn(2, 8, 24))
    assert counter.get_total_flops() == method.forward_flops_per_token(8) * x.numel()


def test_latentlm_flops_counts_the_hidden_target_and_pre_activation_scores():
    base = ["--train.method", "cocomix", "--teacher.path", "gpt2-124m.yaml", "--concepts.layer", "5"]
    cfg = make_config("cocomix/cocomix-69m", base + ["--cocomix.concept_target", "hidden_cosine"])
    row = flops_report(cfg, ["cocomix"])[0]
    assert "error" not in row, row
    teacher = make_config("gpt2-124m").model
    assert row["teacher"] == forward_flops_per_slot(teacher, 1024, n_layers=6, head=False)
    assert row["params"] < sum(r["params"] for r in flops_report(make_config("cocomix/cocomix-69m", base), ["cocomix"]))
    post = flops_report(make_config("cocomix/cocomix-69m", base), ["cocomix"])[0]["teacher"]
    pre = flops_report(make_config("cocomix/cocomix-69m", base + ["--concepts.acts", "pre"]), ["cocomix"])[0]["teacher"]
    assert pre - post == 2 * 768 * 32768  # the dense g W_dec^T of pre-activation scores


def test_the_hidden_target_trains_with_a_real_teacher(tiny_config, teacher_run):
    cfg = tiny_config(method="cocomix", max_steps=25)
    cfg.teacher.path, cfg.concepts.layer, cfg.cocomix.insert_layer = str(teacher_run), 1, 1
    cfg.cocomix.concept_target, cfg.cocomix.concept_weight, cfg.data.seq_len = "hidden_l2", 1.0, 32
    train(cfg)
    assert (cfg.cocomix.n_concepts, cfg.cocomix.k_concepts) == (TINY_MODEL["n_embd"], 0)
    records = [r for r in read_metrics(f"{cfg.train.out_dir}/metrics.jsonl") if "hidden_loss" in r]
    assert len(records) == 25 and records[-1]["hidden_loss"] < 0.8 * records[0]["hidden_loss"]
    from latentlm.loading import load_method

    loaded, saved, _ = load_method(cfg.train.out_dir)
    assert saved.cocomix.concept_target == "hidden_l2" and loaded.concept_head.n_concepts == 32
    cfg.concepts.labels = "somewhere"
    with pytest.raises(LatentLMError, match="drop --concepts.labels"):
        build_method(cfg).validate_inputs(torch.device("cpu"))
    with pytest.raises(LatentLMError, match="needs cocomix.concept_loss true"):
        make_config(overrides=["--cocomix.concept_target", "hidden_l1", "--cocomix.concept_loss", "false"])


def test_a_label_cache_cannot_follow_shifted_windows(teacher_run, sae_dir, small_data, tmp_path):
    cfg = run_cfg(teacher_run, sae_dir, small_data, tmp_path / "cache")
    cfg.data.shift_windows = True
    with pytest.raises(LatentLMError, match="a label cache holds the labels of fixed windows"):
        label_source(cfg, "cpu")
