"""Datasets: the synthetic arithmetic task and JSONL/Parquet files of problems.

Rows are validated when the dataset is loaded, before any actor starts: a row without a problem or
an answer is reported with its index.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

from cluster.config import DataConfig, DatasetFields
from cluster.records import Prompt


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the file and the row."""


def synthetic_rows(n: int, max_operand: int, seed: int, task: str | None = "add") -> list[dict]:
    """Additions `a+b=` with their sums: verifiable, and learnable by a tiny model; or (task `multiply`)
    products `a*b=` of a three-digit and a two-digit number, the tool task (envs/task.py)."""
    if task == "multiply":
        from envs.task import multiplication_rows

        return multiplication_rows(n, seed)
    rng = random.Random(seed)
    return [
        {"problem": f"{a}+{b}=", "answer": str(a + b), "source": "synthetic-add"}
        for a, b in ((rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(n))
    ]


def shown(path: str | Path) -> str:
    """A path for a one-line message: as it is, or quoted when it holds line breaks or other controls."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def read_rows(path: str | Path) -> list[dict]:
    """Read a JSONL or Parquet file as a list of dicts (the layouts MATH-500, AMC, AIME ship in).
    Rows are numbered from 0 over the non-blank lines, the same numbers the row checks use."""
    path = Path(path)
    name = shown(path)
    if not path.exists():
        raise DatasetError(f"{name} does not exist")
    if not path.is_file():
        raise DatasetError(f"{name} is not a file (give a .jsonl or .parquet file)")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DatasetError(
                f"{name} is not a readable Parquet file ({first}); write it again or use JSONL"
            ) from None
    rows = []
    with path.open("rb") as f:
        for i, raw in enumerate(line for line in f if line.strip()):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"row {i} of {name} is not UTF-8 text (byte {e.start} of the row); convert the file "
                    "to UTF-8 (e.g. iconv -t UTF-8)"
                ) from None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"row {i} of {name} is not valid JSON ({e.msg}); one object per line"
                ) from None
            if not isinstance(row, dict):
                raise DatasetError(f"row {i} of {name} is not a JSON object (one object per line)")
            rows.append(row)
    return rows


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _answer(value: object) -> bool:
    """A reference answer: text, or a number (AMC ships 27.0); not a bool, list or mapping."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == value and value not in (float("inf"), float("-inf"))
    return _text(value)


def rows_to_prompts(
    rows: list[dict], fields: DatasetFields, prompt_template: str, origin: str = "dataset"
) -> list[Prompt]:
    """Validate every row and apply the prompt template; fail on the first bad row, naming it."""
    prompts = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DatasetError(f"row {i} of {origin} is not a mapping of fields")
        problem = row.get(fields.problem_field)
        answer = row.get(fields.answer_field)
        if not _text(problem):
            what = "has no" if problem is None or problem == "" else "has a non-text or blank"
            raise DatasetError(
                f"row {i} of {origin} {what} {fields.problem_field!r} field (the problem text); fix the "
                "row or set data.problem_field"
            )
        if not _answer(answer):
            what = "has no" if answer is None or answer == "" else "has an unusable"
            raise DatasetError(
                f"row {i} of {origin} {what} {fields.answer_field!r} field (the reference answer: text or "
                "a number); fix the row or set data.answer_field"
            )
        try:
            text = prompt_template.format(problem=problem)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise DatasetError(
                f"data.prompt_template cannot be applied to row {i} of {origin}: {e}"
            ) from None
        prompts.append(
            Prompt(index=i, text=text, answer=str(answer), source=str(row.get(fields.source_field, "")))
        )
    if not prompts:
        raise DatasetError(f"{origin}: no rows")
    return prompts


def load_prompts(cfg: DataConfig, seed: int) -> list[Prompt]:
    if cfg.path is None:
        rows = synthetic_rows(cfg.synthetic_problems, cfg.synthetic_max_operand, seed, cfg.synthetic_task)
        return rows_to_prompts(rows, cfg, cfg.prompt_template, origin="synthetic")
    try:
        rows = read_rows(cfg.path)
    except DatasetError as e:
        raise DatasetError(f"data.path: {e}") from None
    return rows_to_prompts(rows, cfg, cfg.prompt_template, origin=shown(cfg.path))


class PromptStream:
    """Epoch-wise shuffled prompts with a resumable position (epoch, offset).

    The position is the driver's record of what was consumed, so a resumed run takes the same
    prompts in the same order. Thread-safe: the asynchronous producer takes prompts from its own thread
    while the loop saves the position in checkpoints.
    """

    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True) -> None:
        self._lock = threading.Lock()
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0
        self._order = self._order_for(0)
        self.returned: list[Prompt] = []  # prompts handed back (their engine died): served first

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def give_back(self, prompts: list[Prompt]) -> None:
        with self._lock:
            self.returned = list(prompts) + self.returned

    def take(self, n: int) -> list[Prompt]:
        with self._lock:
            out = self.returned[:n]
            self.returned = self.returned[n:]
            while len(out) < n:
                if self.offset >= len(self._order):
                    self.epoch += 1
                    self.offset = 0
                    self._order = self._order_for(self.epoch)
                out.append(self.prompts[self._order[self.offset]])
                self.offset += 1
            return out

    def state(self) -> dict:
        with self._lock:
            return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict) -> None:
        with self._lock:
            self.epoch = state["epoch"]
            self.offset = state["offset"]
            self._order = self._order_for(self.epoch)
