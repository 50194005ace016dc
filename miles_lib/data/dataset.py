"""Prompt datasets: load a prompt file, validate every row, and hand out seeded, resumable batches.

File formats (chosen by the path's extension; the path is a local path or an fsspec URI):
  .jsonl    one JSON object per line, parsed line by line, so one corrupt line is reported with its
            line number instead of failing the whole file opaquely. Blank lines are ignored.
  .json     one JSON array of objects.
  .parquet  read with pandas (pyarrow).

Row numbers in reports are 1-based: the line number for .jsonl (blank lines count, so it matches an
editor), the position in the array / table for .json / .parquet.

Each kept row becomes a dict
    {"prompt": str (chat template applied), "raw_prompt": str, "label": Any,
     "metadata": {key: value for key in metadata_keys}, "row": int (1-based source row)}

A row is bad when: its line is not valid JSON or not a JSON object, ``input_key`` is missing/null,
the prompt is not a string, the prompt is empty or whitespace, ``label_key`` (unless None) is
missing/null, or a ``metadata_keys`` entry is missing. ``on_bad_row="error"`` raises a DataError
naming the file, the row and the problem at the first bad row; ``on_bad_row="skip"`` drops it, logs
it (the first 20 individually, then a summary) and records it in ``dataset.bad_rows`` /
``dataset.num_skipped``. A column absent from a whole .parquet file is a configuration mistake and
always an error. A dataset left with no rows is always an error.

Chat templates: ``chat_template`` is None (prompt used as-is), a template string containing the
literal ``{prompt}`` (only that placeholder is substituted; other braces are kept verbatim), or the
name of a built-in template in ``CHAT_TEMPLATES``:
  qwen_chat   "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"

Batching: ``PromptBatcher`` walks the rows in a permutation drawn per epoch from
``numpy.random.default_rng([seed, epoch])`` (seed and epoch enter as two words of the seed sequence,
so run seed 1 / epoch 0 and run seed 0 / epoch 1 do not share an order), wrapping into the next
epoch inside a batch when one runs out. Its state is (epoch, position, seed): restoring it in a new
batcher continues exactly where the old one stopped, so a run split into cycles consumes the same
prompts as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from miles_lib import storage
from miles_lib.config import ConfigBase, check
from miles_lib.errors import DataError

logger = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
CHAT_TEMPLATES = {
    "qwen_chat": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
}
ON_BAD_ROW = ("skip", "error")
_LOG_FIRST_BAD_ROWS = 20


def file_format(path: str) -> str | None:
    """'jsonl' | 'json' | 'parquet' from the path's extension (case-insensitive), None if unknown."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    return None


def resolve_chat_template(chat_template: str | None) -> str | None:
    """The template string for a built-in name, the string itself if it holds ``{prompt}``, or None."""
    if chat_template is None:
        return None
    return CHAT_TEMPLATES.get(chat_template, chat_template)


def apply_chat_template(template: str | None, prompt: str) -> str:
    return prompt if template is None else template.replace("{prompt}", prompt)


@dataclasses.dataclass
class DataConfig(ConfigBase):
    path: str = "examples/data/train.jsonl"  # local path or fsspec URI; .jsonl, .json or .parquet
    input_key: str = "prompt"  # field holding the prompt text
    label_key: str | None = "label"  # field holding the reference answer; None = rows need no label
    metadata_keys: list[str] = dataclasses.field(default_factory=list)  # copied into row["metadata"]
    chat_template: str | None = None  # None, a string with "{prompt}", or a name in CHAT_TEMPLATES
    on_bad_row: str = "error"  # "error": fail the load at the first bad row; "skip": drop + log it
    shuffle: bool = True  # reshuffle the rows every epoch
    seed: int = 0  # data-order seed (PromptBatcher's seed argument, when given, is used instead)

    def __post_init__(self) -> None:
        s = "DataConfig"
        check(isinstance(self.path, str) and file_format(self.path) is not None, s, "path", self.path,
              f"a file path or URI ending in one of {sorted(FORMATS)}")
        check(isinstance(self.input_key, str) and bool(self.input_key), s, "input_key", self.input_key,
              "a non-empty field name")
        check(self.label_key is None or (isinstance(self.label_key, str) and bool(self.label_key)), s,
              "label_key", self.label_key, "a non-empty field name, or None for unlabeled prompts")
        check(isinstance(self.metadata_keys, (list, tuple))
              and all(isinstance(k, str) and k for k in self.metadata_keys), s, "metadata_keys",
              self.metadata_keys, "a list of non-empty field names")
        check(self.chat_template is None or self.chat_template in CHAT_TEMPLATES
              or (isinstance(self.chat_template, str) and "{prompt}" in self.chat_template), s,
              "chat_template", self.chat_template,
              f"None, a template string containing '{{prompt}}', or one of {sorted(CHAT_TEMPLATES)}")
        check(self.on_bad_row in ON_BAD_ROW, s, "on_bad_row", self.on_bad_row, f"one of {ON_BAD_ROW}")
        check(isinstance(self.shuffle, bool), s, "shuffle", self.shuffle, "true or false")
        check(isinstance(self.seed, int) and self.seed >= 0, s, "seed", self.seed, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class BadRow:
    row: int  # 1-based line (.jsonl) or record (.json/.parquet) number
    problem: str


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _read_jsonl(data: bytes) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, problem or None) per non-blank line."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig")  # tolerate a byte-order mark
        except UnicodeDecodeError as e:
            yield lineno, None, f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
            continue
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), None
        except json.JSONDecodeError as e:
            yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"


class PromptDataset:
    """Validated prompt rows of one file (see the module docstring for formats and the row layout)."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.path = config.path
        self.bad_rows: list[BadRow] = []
        self.total_rows = 0  # rows read from the file, good and bad
        self._template = resolve_chat_template(config.chat_template)
        self.rows: list[dict[str, Any]] = [row for row in self._load() if row is not None]
        if self.bad_rows:
            logger.warning("%s: skipped %d bad row(s) of %d (on_bad_row='skip')",
                           self.path, len(self.bad_rows), self.total_rows)
        if not self.rows:
            raise DataError(f"{self.path}: no usable prompt rows (read {self.total_rows}, "
                            f"skipped {len(self.bad_rows)} bad); check the file and DataConfig.input_key")

    @property
    def num_skipped(self) -> int:
        return len(self.bad_rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    # -- loading -----------------------------------------------------------------------------
    def _read_bytes(self) -> bytes:
        try:
            return storage.read_bytes(self.path)
        except FileNotFoundError:
            raise DataError(f"{self.path}: prompt file does not exist; check DataConfig.path") from None
        except IsADirectoryError:
            raise DataError(f"{self.path}: is a directory, not a prompt file; check DataConfig.path") from None

    def _load(self) -> Iterator[dict[str, Any] | None]:
        fmt = file_format(self.path)
        data = self._read_bytes()
        if fmt == "jsonl":
            records: Iterator[tuple[int, Any, str | None]] = _read_jsonl(data)
        elif fmt == "json":
            records = self._read_json(data)
        else:
            records = self._read_parquet(data)
        for rowno, obj, problem in records:
            self.total_rows += 1
            if problem is None:
                row, problem = self._make_row(rowno, obj)
                if problem is None:
                    yield row
                    continue
            self._bad(rowno, problem)
            yield None

    def _read_json(self, data: bytes) -> Iterator[tuple[int, Any, str | None]]:
        try:
            obj = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{self.path}: not a valid JSON document ({e}); a .json prompt file holds one "
                            "array of objects — name the file .jsonl if it has one object per line") from None
        if not isinstance(obj, list):
            raise DataError(f"{self.path}: expected a JSON array of objects, got {type(obj).__name__}")
        for i, rec in enumerate(obj, start=1):
            yield i, rec, None

    def _read_parquet(self, data: bytes) -> Iterator[tuple[int, Any, str | None]]:
        try:
            df = pd.read_parquet(io.BytesIO(data))
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise DataError(f"{self.path}: cannot read as parquet ({type(e).__name__}: {e})") from None
        cfg = self.config
        needed = [("input_key", cfg.input_key)] + ([("label_key", cfg.label_key)] if cfg.label_key else [])
        needed += [("metadata_keys", k) for k in cfg.metadata_keys]
        for field, key in needed:
            if key not in df.columns:
                raise DataError(f"{self.path}: column {key!r} (DataConfig.{field}) is not in the file; "
                                f"columns are {list(df.columns)}")
        for i, rec in enumerate(df.to_dict(orient="records"), start=1):
            yield i, rec, None

    def _make_row(self, rowno: int, obj: Any) -> tuple[dict[str, Any] | None, str | None]:
        cfg = self.config
        if not isinstance(obj, dict):
            return None, f"expected a JSON object, got {type(obj).__name__}"
        prompt = obj.get(cfg.input_key)
        if _is_missing(prompt):
            return None, f"missing prompt key {cfg.input_key!r} (DataConfig.input_key)"
        if not isinstance(prompt, str):
            return None, f"prompt {cfg.input_key!r} is a {type(prompt).__name__}, not a string"
        if not prompt.strip():
            return None, f"prompt {cfg.input_key!r} is empty or whitespace"
        label = None
        if cfg.label_key is not None:
            label = obj.get(cfg.label_key)
            if _is_missing(label):
                return None, (f"missing label key {cfg.label_key!r} (DataConfig.label_key; "
                              "set it to null for unlabeled prompts)")
        metadata = {}
        for key in cfg.metadata_keys:
            if key not in obj:
                return None, f"missing metadata key {key!r} (DataConfig.metadata_keys)"
            metadata[key] = obj[key]
        return {"prompt": apply_chat_template(self._template, prompt), "raw_prompt": prompt,
                "label": label, "metadata": metadata, "row": rowno}, None

    def _bad(self, rowno: int, problem: str) -> None:
        unit = "line" if file_format(self.path) == "jsonl" else "row"
        if self.config.on_bad_row == "error":
            raise DataError(f"{self.path}: {unit} {rowno}: {problem} "
                            "(fix the row, or set DataConfig.on_bad_row='skip' to drop bad rows)")
        self.bad_rows.append(BadRow(rowno, problem))
        if len(self.bad_rows) <= _LOG_FIRST_BAD_ROWS:
            logger.warning("%s: skipping %s %d: %s", self.path, unit, rowno, problem)


class PromptBatcher:
    """Endless, seeded, resumable iterator of prompt batches over a dataset.

    Epoch e visits every row once, in ``permutation_e = default_rng([seed, e]).permutation(N)`` (or
    in file order when the dataset's config has ``shuffle=False``); a batch that crosses the end of
    an epoch is completed from the start of the next one. ``state_dict()`` is (epoch, position,
    seed, num_rows); ``load_state_dict`` restores it, so batches drawn after a restore equal those
    an uninterrupted batcher would have drawn.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int | None = None) -> None:
        check(isinstance(batch_size, int) and batch_size > 0, "PromptBatcher", "batch_size", batch_size, "> 0")
        seed = dataset.config.seed if seed is None else seed
        check(isinstance(seed, int) and seed >= 0, "PromptBatcher", "seed", seed, "an integer >= 0")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = dataset.config.shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0  # rows of the current epoch already handed out
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next_batch(self, batch_size: int | None = None) -> list[dict[str, Any]]:
        """The next ``batch_size`` rows (default: the batcher's batch size)."""
        n = self.batch_size if batch_size is None else batch_size
        check(isinstance(n, int) and n > 0, "PromptBatcher.next_batch", "batch_size", n, "> 0")
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), len(self._order) - self.position)
            out += [self.dataset[int(i)] for i in self._order[self.position: self.position + take]]
            self.position += take
        return out

    def __iter__(self) -> PromptBatcher:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position. The saved seed replaces this batcher's seed."""
        missing = sorted({"epoch", "position", "seed"} - set(state))
        if missing:
            raise DataError(f"PromptBatcher state is missing {missing}; got keys {sorted(state)}")
        n = len(self.dataset)
        if "num_rows" in state and int(state["num_rows"]) != n:
            raise DataError(f"PromptBatcher state was saved for a dataset of {state['num_rows']} rows, but "
                            f"{self.dataset.path} has {n} usable rows; the saved position does not apply "
                            "to this data (start a fresh batcher instead of loading the state)")
        if not 0 <= int(state["position"]) <= n or int(state["epoch"]) < 0:
            raise DataError(f"PromptBatcher state (epoch={state['epoch']}, position={state['position']}) "
                            f"is out of range for {n} rows")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
