"""The GPU fast path, checked on CPU: attention calls the flash kernel accepts, no host reads of
device values in a training forward, a training step torch.compile captures whole, RoPE tables
and per-block checkpointing that change nothing but cost."""

import pytest
import torch

from latentlm.config import make_config
from latentlm.methods import build_method
from latentlm.perf import flash_blockers, record_attention_calls, saved_activation_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

V, T, B = 300, 16, 2
METHODS = ["ntp", "ponder", "pause", "loop", "ponderlm", "cocomix", "pause_insert", "kd", "kd_pause"]


def build(name: str, arch: str = "llama", device: str = "cpu", **ponder):
    cfg = make_config(base={"train": {"method": name},
                            "model": {"arch": arch, "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": V,
                                      "block_size": T},
                            "ponder": ponder,
                            "cocomix": {"insert_layer": 1, "n_concepts": 64, "k_concepts": 4, "concept_chunk": 8},
                            "pause_insert": {"insert_layer": 1}})
    torch.manual_seed(0)
    return build_method(cfg).train().to(device)


def batch(name: str, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, V, (B, T), generator=g).to(device) for _ in range(2))
    kw = {}
    if name == "cocomix":
        kw["labels"] = torch.randint(0, 64, (B, T, 4), generator=g).to(device)
    if name.startswith("kd"):
        kw["teacher_logits"] = torch.randn(B, T, V, generator=g).to(device)
    if name == "ponder":
        kw["iters"] = 2
    return x, y, kw


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_attention_qualifies_for_flash(name, arch):
    """Under bf16 autocast every training attention call, the interleaved (ponder, pause) and
    doubled (cocomix, pause_insert) sequences included, is is_causal with no mask, and q, k, v
    share a half dtype and a head size flash takes."""
    method = build(name, arch)
    x, y, kw = batch(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, calls = record_attention_calls(lambda: method(x, y, **kw))
    assert calls
    for call in calls:
        assert call.is_causal and flash_blockers(call) == [], (call, flash_blockers(call))
    lengths = {c.query_shape[2] for c in calls}
    longer = {"ponder": {T, 2 * T}, "pause": {2 * T}, "cocomix": {T, 2 * T}, "pause_insert": {T, 2 * T},
              "kd_pause": {T, 2 * T}}
    assert lengths == longer.get(name, {T})


def test_flash_blockers_name_the_reason():
    method = build("ntp")
    x, y, _ = batch("ntp")
    _, calls = record_attention_calls(lambda: method(x, y))  # float32: flash needs a half dtype
    assert all(any("dtype torch.float32" in r for r in flash_blockers(c)) for c in calls)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :3] = False  # left padding needs an explicit mask
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, calls = record_attention_calls(lambda: method.model.run_blocks(method.model.embed(x), torch.arange(T),
                                                                           valid=valid))
    assert all(flash_blockers(c) == ["explicit attn_mask (flash takes none; is_causal only)"] for c in calls)


@pytest.mark.parametrize("name", ["ntp", "ponder", "loop", "ponderlm", "pause", "cocomix"])
def test_generation_masks_only_where_slots_follow_a_past(name):
    """Unpadded prefill into an empty cache is plain causal and a one-slot decode step needs no
    mask; only methods that add several slots per decoded token (pause: the token and its K
    pauses, cocomix: token and concept) need the explicit mask, because is_causal is top-left aligned."""
    method = build(name).eval()
    x = torch.randint(0, V, (B, 6))
    pos = torch.arange(6)[None].expand(B, -1)
    cache = method.new_cache(B, 7)
    with torch.no_grad():
        _, prefill = record_attention_calls(lambda: method.step(x, pos, torch.ones(B, 6, dtype=torch.bool), cache))
        _, decode = record_attention_calls(lambda: method.step(x[:, :1], pos[:, :1] + 6,
                                                               torch.ones(B, 1, dtype=torch.bool), cache))
    assert not any(c.has_mask for c in prefill) and all(c.is_causal for c in prefill if c.query_shape[2] > 1)
    masked = {c.query_shape[2] for c in decode if c.has_mask}
    assert masked == {"pause": {2}, "cocomix": {2}}.get(name, set())
    assert all(c.query_shape[2] == 1 for c in decode if not c.has_mask)


@pytest.mark.parametrize("name", METHODS)
def test_training_forward_never_reads_device_values(name):
    """On the meta device a tensor has no values: .item(), .tolist(), nonzero() or a tensor in an
    `if` would raise. A whole training forward and backward running there makes no host sync."""
    with pytest.raises(Exception):
        torch.zeros(2, device="meta").sum().item()
    method = build(name, device="meta")
    x, y, kw = batch(name, device="meta")
    loss, _ = method(x, y, **kw)
    loss.backward()
    assert loss.device.type == "meta"


@pytest.mark.parametrize("name", ["ntp", "ponder"])
def test_compiled_training_step_has_no_graph_break(name):
    """fullgraph=True fails on any graph break (bf16 autocast, as on the GPU path); ponder's n comes
    from batch_inputs, outside the graph."""
    torch._dynamo.reset()
    method = build(name)
    x, y, _ = batch(name)
    compiled = torch.compile(method, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = compiled(x, y, **method.batch_inputs(x, y, windows=None, step=0))
    loss.backward()
    assert torch.isfinite(loss)


def test_ponder_draw_in_batch_inputs_matches_draw_in_forward():
    """batch_inputs carries optimizer step s's n (``iters_for_step``: a function of the seed and s);
    the forward given it is the forward at that n. A direct training call without ``iters`` runs
    ``train_iters_max``."""
    a, b = build("ponder", train_iters_min=1, train_iters_max=4), build("ponder", train_iters_min=1, train_iters_max=4)
    x, y, _ = batch("ntp")
    for step in range(4):
        inputs = b.batch_inputs(x, y, windows=None, step=step)
        assert inputs == {"iters": a.iters_for_step(step)} and 1 <= inputs["iters"] <= 4
        la, ma = a(x, y, iters=a.iters_for_step(step))
        lb, mb = b(x, y, **inputs)
        assert ma["jacobi_iters"] == mb["jacobi_iters"] == inputs["iters"] and torch.equal(la, lb)
    la, ma = a(x, y)
    lb, mb = b(x, y, iters=4)
    assert ma["jacobi_iters"] == mb["jacobi_iters"] == 4.0 and torch.equal(la, lb)


def test_rope_table_equals_direct_computation():
    from latentlm.model.transformer import rope_cos_sin

    m = build("ntp").model
    pos = torch.tensor([[0, 0, 1, 1, 15, 15], [3, 4, 5, 6, 7, 8]])
    table, direct = m.rope(pos, T), m.rope(pos, T + 1)  # within the table / past it: computed on the spot
    ref = rope_cos_sin(pos, 16, m.cfg.rope_theta, torch.float32)
    for got in (table, direct):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert m.rope(torch.arange(4), T)[0].shape == (1, 1, 4, 16)  # shared positions: no per-row copy


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ponder_checkpointing_keeps_gradients_and_saves_memory(arch):
    x, y, _ = batch("ntp")
    grads, saved = {}, {}
    for mode in ("none", "pass", "block"):
        method = build("ponder", arch, checkpoint=mode)
        loss, n = saved_activation_bytes(lambda: method(x, y, iters=2)[0], exclude=method.parameters())
        loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in method.parameters()])
        saved[mode] = n
    for mode in ("pass", "block"):
        torch.testing.assert_close(grads[mode], grads["none"], rtol=0, atol=1e-6)
    assert saved["pass"] < saved["block"] < saved["none"]
