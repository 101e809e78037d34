"""Datasets: the synthetic arithmetic task and JSONL/Parquet files of problems.

Rows are validated when the dataset is loaded, before any actor starts: a row without a problem or
an answer is reported where a person finds it: the line of a JSONL file as an editor counts it (from 1,
blank lines included), the row index of a Parquet file (from 0, as pyarrow and pandas show it).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Sequence
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


class Rows(list):
    """A file's rows (dicts), each with `places[i]`: where row i is in the file, for messages
    ("line 7 of data.jsonl", "row index 6 (from 0) of data.parquet")."""

    def __init__(self, rows: list[dict], places: list[str]) -> None:
        super().__init__(rows)
        self.places = places


def row_place(i: int, origin: str, places: Sequence[str] | None = None) -> str:
    """Where row i is, for a message: its place in the file when known, else its index in `origin`."""
    return places[i] if places is not None else f"row index {i} (from 0) of {origin}"


def read_rows(path: str | Path) -> Rows:
    """Read a JSONL or Parquet file as a list of dicts (the layouts MATH-500, AMC, AIME ship in). Blank
    lines of a JSONL file are skipped; every message names the line as an editor counts it (from 1)."""
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
            table = pq.read_table(path).to_pylist()
            return Rows(table, [f"row index {i} (from 0) of {name}" for i in range(len(table))])
        except (pa.ArrowException, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DatasetError(
                f"{name} is not a readable Parquet file ({first}); write it again or use JSONL"
            ) from None
    rows, places = [], []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"line {number} of {name}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"{where} is not UTF-8 text (byte {e.start} of the line); convert the file "
                    "to UTF-8 (e.g. iconv -t UTF-8)"
                ) from None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where} is not valid JSON ({e.msg}); one object per line") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where} is not a JSON object (one object per line)")
            rows.append(row)
            places.append(where)
    return Rows(rows, places)


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
    rows: list[dict],
    fields: DatasetFields,
    prompt_template: str,
    origin: str = "dataset",
    places: Sequence[str] | None = None,
) -> list[Prompt]:
    """Validate every row and apply the prompt template; fail on the first bad row, naming where it is
    (`places`, default: the rows' own when `read_rows` read them)."""
    places = places if places is not None else getattr(rows, "places", None)
    prompts = []
    for i, row in enumerate(rows):
        where = row_place(i, origin, places)
        if not isinstance(row, dict):
            raise DatasetError(f"{where} is not a mapping of fields")
        problem = row.get(fields.problem_field)
        answer = row.get(fields.answer_field)
        if not _text(problem):
            what = "has no" if problem is None or problem == "" else "has a non-text or blank"
            raise DatasetError(
                f"{where} {what} {fields.problem_field!r} field (the problem text); fix the "
                "row or set data.problem_field"
            )
        if not _answer(answer):
            what = "has no" if answer is None or answer == "" else "has an unusable"
            raise DatasetError(
                f"{where} {what} {fields.answer_field!r} field (the reference answer: text or "
                "a number); fix the row or set data.answer_field"
            )
        try:
            text = prompt_template.format(problem=problem)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise DatasetError(f"data.prompt_template cannot be applied to {where}: {e}") from None
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
