"""Chat templates, streamed text, ``latentlm chat``, and what ``latentlm generate`` gained with it:
streaming, tokens/s, prompts from a file or stdin, stopping at the tokenizer's end-of-sequence.

The CPU tests use our byte tokenizer (and a byte tokenizer given a template) with tiny random
models whose step is rigged to emit a chosen token at a chosen position; tests marked ``needs_hf``
load a tiny Hugging Face tokenizer with ``transformers`` and compare with its
``apply_chat_template`` and ``generate``.
"""

from __future__ import annotations

import io
import json
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from conftest import CHATML_TEMPLATE, tiny_hf_tokenizer
from latentlm.chat import ChatSession, TextStream, rate_line, render_chat, run_chat
from latentlm.cli import main
from latentlm.config import ModelConfig
from latentlm.data.tokenizers import EOT_TEXT, ByteTokenizer
from latentlm.errors import LatentLMError
from latentlm.generate import generate
from latentlm.interop import write_core_checkpoint
from latentlm.loading import load_method
from latentlm.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
needs_hf = pytest.mark.skipif(find_spec("transformers") is None,
                              reason="needs transformers (pip install 'latentlm[hf]')")
needs_jinja = pytest.mark.skipif(find_spec("jinja2") is None, reason="needs jinja2 (pip install jinja2)")


def tiny_checkpoint(directory: Path, vocab: int = 257, tokenizer: dict | None = None, arch: str = "llama",
                    block_size: int = 64, seed: int = 0) -> Transformer:
    """A random 2-layer core saved as an ntp checkpoint (byte tokenizer unless ``tokenizer``)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                      init_std=0.1)
    model = Transformer(cfg).eval()
    directory.mkdir(parents=True, exist_ok=True)
    write_core_checkpoint(directory, cfg, dict(model.state_dict()), tokenizer or ByteTokenizer().describe(), {})
    return model


def rig(method, schedule: dict[int, int], ban: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Make ``method.step`` force token ``schedule[k]`` as the k-th new token of every generate call
    (k counts from the prefill, which yields new token 0) and never pick a ``ban`` id otherwise;
    returns the prompts each prefill saw."""
    prefills, step, k = [], method.step, [0]

    def forcing(idx, position_ids, valid, cache):
        logits = step(idx, position_ids, valid, cache)
        if int(position_ids[:, 0].max()) == 0:  # a prefill (decode steps sit at positions >= 1): a new call
            prefills.append(idx.clone())
            k[0] = 0
        logits[:, -1, list(ban)] = -1e4
        if k[0] in schedule:
            logits[:, -1, schedule[k[0]]] = 1e4
        k[0] += 1
        return logits

    method.step = forcing
    return prefills


class TemplateBytes(ByteTokenizer):
    """Our byte tokenizer given a chat template whose end of turn is the end-of-text token."""

    chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    special_tokens = {"eos_token": EOT_TEXT}

    def encode_special(self, text: str) -> list[int]:
        parts = [self.encode(p) for p in text.split(EOT_TEXT)]
        return [i for n, p in enumerate(parts) for i in ([self.eot_id] if n else []) + p]


# --- rendering and streaming ---------------------------------------------------------------------


@needs_jinja
def test_render_chat_as_transformers_renders():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}]
    out = render_chat(CHATML_TEMPLATE, msgs, {"bos_token": "<|im_start|>"})
    assert out == ("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert render_chat(CHATML_TEMPLATE, msgs[:1], {"bos_token": "B"}, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    # trim_blocks + lstrip_blocks: the newline after a block tag and the indentation before one go.
    blocks = "{% for m in messages %}\n    {{ m['content'] }}\n  {% endfor %}"
    assert render_chat(blocks, msgs[:2]) == "    Hi\n    Hello!\n"
    assert render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "é"}]) == \
        '{"role": "user", "content": "é"}'  # non-ASCII kept, as transformers' tojson
    assert render_chat("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
                       "{% endfor %}", msgs) == "Hi"  # loopcontrols
    assert render_chat("{{ strftime_now('%Y') | length }}", []) == "4"
    with pytest.raises(LatentLMError, match="failed on this conversation.*no system"):
        render_chat("{{ raise_exception('no system') }}", msgs)
    with pytest.raises(LatentLMError, match="does not compile"):
        render_chat("{% for %}", msgs)


def test_text_stream_holds_back_split_characters_and_stops():
    tok = ByteTokenizer()
    text = "héllo → 世界 ok"
    stream = TextStream(tok, stop_ids=[tok.eot_id])
    pieces = [stream.push([b]) for b in text.encode()]
    assert "".join(pieces) + stream.finish() == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[text.encode().index("世".encode())] == ""  # the first byte of a 3-byte character waits
    assert stream.push([tok.eot_id, ord("x")]) == "" and stream.stopped and stream.ids == list(text.encode())
    assert stream.push([ord("y")]) == "" and stream.finish() == ""
    assert rate_line(10, 2.0) == "[10 tokens, 2.00 s, 5.0 tokens/s]"


# --- chat sessions (in process) ------------------------------------------------------------------


@needs_jinja
def test_chat_session_template_history_stops_and_trims(tmp_path):
    tiny_checkpoint(tmp_path / "ck")
    method, _, _ = load_method(tmp_path / "ck")
    tok = TemplateBytes()
    greedy = generate(method, [tok.encode_special("user: Hi" + EOT_TEXT + "assistant: ")], max_new_tokens=8,
                      temperature=0.0)[0]
    prefills = rig(method, {3: tok.eot_id})
    session = ChatSession(method, tok, tok.stop_ids, max_new_tokens=8, temperature=0.0)
    shown: list[str] = []
    answer, n, seconds = session.reply("Hi", shown.append)
    assert n == 3 and answer == tok.decode(greedy[:3]) and "".join(shown) == answer and seconds > 0
    assert prefills[0][0].tolist() == tok.encode_special(f"user: Hi{EOT_TEXT}assistant: ")
    session.reply("Next", shown.append)  # the second prompt carries the first exchange
    assert prefills[1][0].tolist() == tok.encode_special(
        f"user: Hi{EOT_TEXT}assistant: {answer}{EOT_TEXT}user: Next{EOT_TEXT}assistant: ")
    # A window of 64 tokens: the oldest exchange goes, the budget is what the window has left.
    session.history = [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 10},
                       {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}]
    ids, budget = session.prompt("again")
    assert ids == tok.encode_special(f"user: z{EOT_TEXT}assistant: w{EOT_TEXT}user: again{EOT_TEXT}assistant: ")
    assert budget == 8
    assert session.prompt("q" * 40)[1] == 64 - len(tok.encode_special(f"user: {'q' * 40}{EOT_TEXT}assistant: "))
    with pytest.raises(LatentLMError, match="send a shorter message"):
        session.prompt("q" * 80)
    session.reset()
    assert session.history == [] and session.prompt("Hi")[0] == prefills[0][0].tolist()


def test_chat_session_without_template_continues_plain_text(tmp_path):
    tiny_checkpoint(tmp_path / "ck")
    method, _, _ = load_method(tmp_path / "ck")
    tok = ByteTokenizer()
    expected = {p: generate(method, [tok.encode(p)], max_new_tokens=5, temperature=0.0, eot_id=tok.eot_id)[0]
                for p in ("One", "Two")}
    session = ChatSession(method, tok, tok.stop_ids, max_new_tokens=5, temperature=0.0)
    out: list[str] = []
    report: list[str] = []
    assert run_chat(session, ["One\n", "\n", "/reset\n", "Two\n", "/exit\n", "Three\n"], out.append, report.append) == 2
    assert "".join(out) == tok.decode(expected["One"]) + "\n" + tok.decode(expected["Two"]) + "\n"
    assert [r for r in report if "tokens/s" in r] and "[conversation cleared]\n" in report
    assert session.history == []  # no template: every message is a prompt of its own
    with pytest.raises(LatentLMError, match="--system needs a tokenizer with a chat template"):
        ChatSession(method, tok, tok.stop_ids, system="Be brief.")


# --- the command line ----------------------------------------------------------------------------


def test_generate_streams_and_reports_tokens_per_second(tmp_path, monkeypatch, capsys):
    import latentlm.loading

    tiny_checkpoint(tmp_path / "ck")
    method, _, _ = load_method(tmp_path / "ck")
    tok = ByteTokenizer()
    [want] = generate(method, [tok.encode("Hello")], max_new_tokens=12, temperature=0.0, eot_id=tok.eot_id)
    out = io.StringIO()
    seen: list[str] = []
    real = latentlm.loading.load_method

    def load_and_watch(path, device="cpu"):  # record stdout at every model step
        m, cfg, manifest = real(path, device)
        step = m.step
        m.step = lambda *a: (seen.append(out.getvalue()), step(*a))[1]
        return m, cfg, manifest

    monkeypatch.setattr(latentlm.loading, "load_method", load_and_watch)
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "Hello", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    assert out.getvalue() == "Hello" + tok.decode(want) + "\n"
    # Streaming: before decode step k the text of the k tokens sampled so far is already out.
    assert seen[0] == "Hello" and seen[5] == "Hello" + tok.decode(want[:5]).rstrip("\ufffd")
    err = capsys.readouterr().err
    assert f"[{len(want)} tokens, " in err and "tokens/s]" in err


def test_generate_prompts_from_file_and_stdin_in_batches(tmp_path, monkeypatch, capsys):
    tiny_checkpoint(tmp_path / "ck")
    method, _, _ = load_method(tmp_path / "ck")
    tok = ByteTokenizer()
    prompts = ["The river", "A", "Snow falls on", "Ünïcode", "x"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[2:]) + "\n\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO("The river\nA\n"))
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "-", "--prompt-file", str(tmp_path / "prompts.txt"),
                 "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    blocks = captured.out.split("-" * 40 + "\n")
    assert blocks[-1] == "" and len(blocks) == 6
    for p, block in zip(prompts, blocks):  # each as generated alone (greedy, padded batches agree)
        [alone] = generate(method, [tok.encode(p)], max_new_tokens=6, temperature=0.0, eot_id=tok.eot_id)
        assert block == p + tok.decode(alone) + "\n"
    assert captured.err.count("tokens/s") == 3 and "batch of 1" in captured.err  # batches of 2, 2, 1
    assert main(["generate", str(tmp_path / "ck"), "--prompt-file", str(tmp_path / "prompts.txt"), "--quiet",
                 "--max-new-tokens", "2"]) == 0
    assert "tokens/s" not in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    for args, needle in ((["--prompt-file", str(tmp_path / "missing.txt")], "does not exist"),
                         (["--prompt-file", str(tmp_path / "empty.txt")], "holds no prompts"),
                         (["--prompt-file", str(tmp_path / "latin1.txt")], "is not UTF-8 text"),
                         (["--prompt", "-"], "read no prompts from stdin"),
                         (["--batch-size", "0"], "--batch-size 0 must be at least 1")):
        assert main(["generate", str(tmp_path / "ck"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_chat_command_plain_continuation(tmp_path, monkeypatch, capsys):
    tiny_checkpoint(tmp_path / "ck")
    method, _, _ = load_method(tmp_path / "ck")
    tok = ByteTokenizer()
    want = {p: tok.decode(generate(method, [tok.encode(p)], max_new_tokens=5, temperature=0.0,
                                   eot_id=tok.eot_id)[0]) for p in ("Hi", "Yes")}
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nYes\n"))
    assert main(["chat", str(tmp_path / "ck"), "--temperature", "0", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want["Hi"] + "\n" + want["Yes"] + "\n" and captured.err.count("tokens/s") == 2
    assert main(["chat", str(tmp_path / "ck"), "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "5",
                 "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want["Hi"] + "\n" and captured.err == ""
    assert main(["chat", str(tmp_path / "ck"), "--prompt", "Hi", "--system", "Be brief."]) == 2
    assert "needs a tokenizer with a chat template" in capsys.readouterr().err


# --- Hugging Face tokenizers: their template, their end-of-sequence ---------------------------------


def hf_checkpoint(tmp_path: Path, arch: str = "llama") -> Path:
    """A tiny random checkpoint whose tokenizer is tiny_hf_tokenizer, kept inside it like an import's."""
    from latentlm.data.tokenizers import load_tokenizer

    ck = tmp_path / "hfck"
    tiny_hf_tokenizer(ck / "tokenizer")
    desc = {**load_tokenizer("hf", ck / "tokenizer").describe(), "path": "tokenizer"}
    tiny_checkpoint(ck, vocab=259, tokenizer=desc, arch=arch)
    return ck


@needs_hf
def test_render_chat_matches_apply_chat_template(tmp_path):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(tiny_hf_tokenizer(tmp_path / "tok")))
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}]
    from latentlm.data.tokenizers import load_tokenizer

    ours = load_tokenizer("hf", tmp_path / "tok")
    assert ours.chat_template == CHATML_TEMPLATE and ours.eos_id == 2 and ours.eot_id == 0
    for n in (1, 3):
        for gen in (True, False):
            text = render_chat(ours.chat_template, msgs[:n], ours.special_tokens, add_generation_prompt=gen)
            assert text == theirs.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=gen)
            assert ours.encode_special(text) == theirs.apply_chat_template(
                msgs[:n], add_generation_prompt=gen, return_dict=True)["input_ids"]


@needs_hf
def test_chat_and_generate_stop_at_the_tokenizers_eos(tmp_path, monkeypatch, capsys):
    """SmolLM2's layout: <|im_end|> (2) ends a reply although <|endoftext|> (0) is the separator."""
    import latentlm.loading
    from transformers import AutoTokenizer

    ck = hf_checkpoint(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(ck / "tokenizer"))
    method, _, _ = load_method(ck)
    rig(method, {}, ban=(0, 1, 2))  # the model's own greedy text, special tokens aside
    chat_ids = theirs.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
    plain = theirs("Hi", add_special_tokens=False)["input_ids"]
    free = {tuple(p): generate(method, [p], max_new_tokens=8, temperature=0.0)[0] for p in (chat_ids, plain)}
    prefills: list[list[torch.Tensor]] = []  # per command: the prompts its model saw
    real = latentlm.loading.load_method

    def load_rigged(path, device="cpu"):
        m, cfg, manifest = real(path, device)
        prefills.append(rig(m, {3: 2}, ban=(0, 1, 2)))  # <|im_end|> as the 4th new token, and only there
        return m, cfg, manifest

    monkeypatch.setattr(latentlm.loading, "load_method", load_rigged)
    capsys.readouterr()
    assert main(["chat", str(ck), "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert prefills[-1][0][0].tolist() == chat_ids  # the template, with special tokens as tokens
    assert out == theirs.decode(free[tuple(chat_ids)][:3]) + "\n" and "<|im_end|>" not in out
    assert main(["generate", str(ck), "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "Hi" + theirs.decode(free[tuple(plain)][:3]) + "\n"
    assert main(["chat", str(ck), "--prompt", "Hi", "--no-template", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    assert prefills[-1][0][0].tolist() == plain
