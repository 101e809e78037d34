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


def synthetic_rows(n: int, max_operand: int, seed: int) -> list[dict]:
    """Additions `a+b=` with their sums: verifiable, and learnable by a tiny model."""
    rng = random.Random(seed)
    return [
        {"problem": f"{a}+{b}=", "answer": str(a + b), "source": "synthetic-add"}
        for a, b in ((rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(n))
    ]


def read_rows(path: str | Path) -> list[dict]:
    """Read a JSONL or Parquet file as a list of dicts (the layouts MATH-500, AMC, AIME ship in)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"data.path: {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open() as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: row {i} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: row {i} is not a JSON object")
            rows.append(row)
    return rows


def rows_to_prompts(
    rows: list[dict], fields: DatasetFields, prompt_template: str, origin: str = "dataset"
) -> list[Prompt]:
    """Validate every row and apply the prompt template; fail on the first bad row, naming it."""
    prompts = []
    for i, row in enumerate(rows):
        problem = row.get(fields.problem_field)
        answer = row.get(fields.answer_field)
        if problem is None or (isinstance(problem, str) and not problem.strip()):
            raise DatasetError(f"{origin}: row {i} has no {fields.problem_field!r} field")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise DatasetError(
                f"{origin}: row {i} has no {fields.answer_field!r} field (the reference answer)"
            )
        text = prompt_template.format(problem=problem)
        prompts.append(
            Prompt(index=i, text=text, answer=str(answer), source=str(row.get(fields.source_field, "")))
        )
    if not prompts:
        raise DatasetError(f"{origin}: no rows")
    return prompts


def load_prompts(cfg: DataConfig, seed: int) -> list[Prompt]:
    if cfg.path is None:
        rows = synthetic_rows(cfg.synthetic_problems, cfg.synthetic_max_operand, seed)
        return rows_to_prompts(rows, cfg, cfg.prompt_template, origin="synthetic")
    return rows_to_prompts(read_rows(cfg.path), cfg, cfg.prompt_template, origin=str(cfg.path))


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
