"""Prompt datasets: formats, key mapping, chat templates, bad-row reports, seeded resumable batching."""

import json
import logging

import pandas as pd
import pytest

from miles_lib.data.dataset import BadRow, DataConfig, PromptBatcher, PromptDataset
from miles_lib.errors import ConfigError, DataError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def jl(obj):
    return json.dumps(obj)


def load(path, **kw):
    return PromptDataset(DataConfig(path=str(path), **kw))


# -- formats and key mapping -------------------------------------------------------------------

def test_jsonl_rows_with_key_mapping_and_metadata(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [
        jl({"question": "1+1?", "answer": 2, "src": "a", "extra": 0}),
        "",  # blank lines are ignored but still counted as lines
        jl({"question": "2+3?", "answer": "5", "src": "b"}),
    ])
    ds = load(p, input_key="question", label_key="answer", metadata_keys=["src"])
    assert len(ds) == 2 and ds.num_skipped == 0 and ds.total_rows == 2
    assert ds[0] == {"prompt": "1+1?", "raw_prompt": "1+1?", "label": 2, "metadata": {"src": "a"}, "row": 1}
    assert ds[1] == {"prompt": "2+3?", "raw_prompt": "2+3?", "label": "5", "metadata": {"src": "b"}, "row": 3}


def test_parquet_rows_with_key_mapping(tmp_path):
    p = tmp_path / "d.parquet"
    pd.DataFrame({"q": ["a?", "b?", "c?"], "y": [1, 2, 3], "k": ["x", "y", "z"]}).to_parquet(p)
    ds = load(p, input_key="q", label_key="y", metadata_keys=["k"])
    assert [r["prompt"] for r in ds.rows] == ["a?", "b?", "c?"]
    assert [r["label"] for r in ds.rows] == [1, 2, 3]
    assert [r["metadata"] for r in ds.rows] == [{"k": "x"}, {"k": "y"}, {"k": "z"}]
    assert [r["row"] for r in ds.rows] == [1, 2, 3]


def test_parquet_bad_row_numbers_and_missing_column(tmp_path):
    p = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ["a?", None, "  ", "d?"], "label": [1.0, 2.0, 3.0, float("nan")]}).to_parquet(p)
    ds = load(p, on_bad_row="skip")
    assert [r["row"] for r in ds.rows] == [1]
    assert [b.row for b in ds.bad_rows] == [2, 3, 4]
    assert "missing prompt" in ds.bad_rows[0].problem
    assert "empty or whitespace" in ds.bad_rows[1].problem
    assert "missing label" in ds.bad_rows[2].problem
    with pytest.raises(DataError, match=r"d\.parquet: row 2: missing prompt key 'prompt'"):
        load(p)
    with pytest.raises(DataError, match=r"column 'question' \(DataConfig.input_key\) is not in the file; "
                                        r"columns are \['prompt', 'label'\]"):
        load(p, input_key="question")


def test_json_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "a", "label": 1}, {"prompt": 3, "label": 2}]))
    ds = load(p, on_bad_row="skip")
    assert len(ds) == 1 and ds.bad_rows == [BadRow(2, "prompt 'prompt' is a int, not a string")]
    p.write_text(jl({"prompt": "a", "label": 1}) + "\n" + jl({"prompt": "b", "label": 1}))
    with pytest.raises(DataError, match="name the file .jsonl"):
        load(p)


def test_fsspec_uri(tmp_path):
    import fsspec

    with fsspec.open("memory://miles-test/prompts.jsonl", "w") as f:
        f.write(jl({"prompt": "hi", "label": 1}) + "\n")
    ds = load("memory://miles-test/prompts.jsonl")
    assert ds[0]["prompt"] == "hi"


def test_unlabeled_prompts(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [jl({"prompt": "a"})])
    assert load(p, label_key=None)[0]["label"] is None


# -- chat templates ----------------------------------------------------------------------------

def test_builtin_chat_template(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [jl({"prompt": "What is 2+2?", "label": 4})])
    row = load(p, chat_template="qwen_chat")[0]
    assert row["prompt"] == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert row["raw_prompt"] == "What is 2+2?"


def test_custom_chat_template_substitutes_only_prompt(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [jl({"prompt": "f({x})", "label": 1})])
    row = load(p, chat_template='{"q": "{prompt}"} A:')[0]
    assert row["prompt"] == '{"q": "f({x})"} A:'


def test_config_validation():
    with pytest.raises(ConfigError, match=r"DataConfig.chat_template='chatml' is invalid: .*'qwen_chat'"):
        DataConfig(chat_template="chatml")
    with pytest.raises(ConfigError, match=r"DataConfig.path='data.csv' is invalid: .*'.jsonl'"):
        DataConfig(path="data.csv")
    with pytest.raises(ConfigError, match=r"DataConfig.on_bad_row='drop'"):
        DataConfig(on_bad_row="drop")
    with pytest.raises(ConfigError, match="unknown key"):
        DataConfig.from_dict({"pth": "x.jsonl"})
    assert DataConfig.from_dict({"path": "s3://b/k/x.PARQUET", "metadata_keys": ["a"]}).metadata_keys == ["a"]


# -- bad rows ----------------------------------------------------------------------------------

BAD_LINES = {  # kind -> (line text, expected problem)
    "missing_prompt": (jl({"question": "a", "label": 1}), "missing prompt key 'prompt'"),
    "null_prompt": (jl({"prompt": None, "label": 1}), "missing prompt key 'prompt'"),
    "non_string_prompt": (jl({"prompt": ["a"], "label": 1}), "prompt 'prompt' is a list, not a string"),
    "empty_prompt": (jl({"prompt": "", "label": 1}), "prompt 'prompt' is empty or whitespace"),
    "whitespace_prompt": (jl({"prompt": " \t ", "label": 1}), "prompt 'prompt' is empty or whitespace"),
    "missing_label": (jl({"prompt": "a"}), "missing label key 'label'"),
    "corrupt_json": ('{"prompt": "a", "label": 1', "invalid JSON (Expecting ',' delimiter at column 27)"),
    "not_an_object": ("[1, 2]", "expected a JSON object, got list"),
    "bad_utf8": (None, "line is not valid UTF-8"),
}
GOOD = jl({"prompt": "ok?", "label": 1})


def write_with_bad(path, bad_line, at_line):
    lines = [GOOD.encode()] * 5
    lines[at_line - 1] = b"\xff\xfe" if bad_line is None else bad_line.encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_row_error_names_file_line_and_problem(tmp_path, kind):
    line, problem = BAD_LINES[kind]
    p = write_with_bad(tmp_path / "d.jsonl", line, at_line=4)
    with pytest.raises(DataError) as e:
        load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: line 4: {problem}")
    assert "on_bad_row='skip'" in msg


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_row_skip_counts_and_logs(tmp_path, kind, caplog):
    line, problem = BAD_LINES[kind]
    p = write_with_bad(tmp_path / "d.jsonl", line, at_line=2)
    with caplog.at_level(logging.WARNING, logger="miles_lib.data.dataset"):
        ds = load(p, on_bad_row="skip")
    assert len(ds) == 4 and ds.num_skipped == 1 and ds.total_rows == 5
    assert ds.bad_rows[0].row == 2 and ds.bad_rows[0].problem.startswith(problem)
    assert [r["row"] for r in ds.rows] == [1, 3, 4, 5]
    assert f"skipping line 2: {problem}" in caplog.text
    assert "skipped 1 bad row(s) of 5" in caplog.text


def test_mixed_bad_rows_all_reported_in_order(tmp_path):
    lines = [GOOD] + [BAD_LINES[k][0] for k in ("missing_prompt", "non_string_prompt", "empty_prompt",
                                                 "missing_label", "corrupt_json")] + ["", GOOD]
    ds = load(write_lines(tmp_path / "d.jsonl", lines), on_bad_row="skip")
    assert [b.row for b in ds.bad_rows] == [2, 3, 4, 5, 6]
    assert [r["row"] for r in ds.rows] == [1, 8]


def test_all_rows_bad_is_an_error(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [jl({"prompt": ""}), "{"])
    with pytest.raises(DataError, match=r"no usable prompt rows \(read 2, skipped 2 bad\)"):
        load(p, on_bad_row="skip")


def test_missing_file_names_path(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"{p}: prompt file does not exist; check DataConfig.path"):
        load(p)


def test_corrupt_parquet_names_path(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"{p}: cannot read as parquet"):
        load(p)


# -- batching ----------------------------------------------------------------------------------

def make_ds(tmp_path, n, **kw):
    return load(write_lines(tmp_path / "d.jsonl", [jl({"prompt": f"p{i}", "label": i}) for i in range(n)]), **kw)


def labels(batches):
    return [[r["label"] for r in b] for b in batches]


def test_batcher_epochs_are_permutations_and_reshuffle(tmp_path):
    ds = make_ds(tmp_path, 10)
    b = PromptBatcher(ds, batch_size=5, seed=3)
    e0 = labels([b.next_batch(), b.next_batch()])
    e1 = labels([b.next_batch(), b.next_batch()])
    flat0, flat1 = [x for b in e0 for x in b], [x for b in e1 for x in b]
    assert sorted(flat0) == sorted(flat1) == list(range(10))
    assert flat0 != flat1 and flat0 != list(range(10))
    assert b.state_dict() == {"epoch": 1, "position": 10, "seed": 3, "num_rows": 10}


def test_batcher_deterministic_and_seed_dependent(tmp_path):
    ds = make_ds(tmp_path, 10)
    a, b = PromptBatcher(ds, 4, seed=7), PromptBatcher(ds, 4, seed=7)
    run_a, run_b = labels([a.next_batch() for _ in range(4)]), labels([b.next_batch() for _ in range(4)])
    assert run_a == run_b
    assert labels([PromptBatcher(ds, 4, seed=8).next_batch()]) != run_a[:1]


def test_batcher_epoch_wrap_in_file_order(tmp_path):
    ds = make_ds(tmp_path, 5, shuffle=False)
    b = PromptBatcher(ds, batch_size=3)
    assert labels([next(b) for _ in range(4)]) == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    assert b.state_dict() == {"epoch": 2, "position": 2, "seed": 0, "num_rows": 5}
    assert labels([b.next_batch(4)]) == [[2, 3, 4, 0]]


def test_batcher_resume_equals_uninterrupted(tmp_path):
    ds = make_ds(tmp_path, 7)
    ref = PromptBatcher(ds, 3, seed=11)
    uninterrupted = labels([ref.next_batch() for _ in range(5)])  # 15 rows: wraps twice over 7
    first = PromptBatcher(ds, 3, seed=11)
    part1 = labels([first.next_batch() for _ in range(2)])
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 6, "seed": 11, "num_rows": 7}
    resumed = PromptBatcher(ds, 3, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    part2 = labels([resumed.next_batch() for _ in range(3)])
    assert part1 + part2 == uninterrupted
    assert resumed.state_dict() == ref.state_dict() == {"epoch": 2, "position": 1, "seed": 11, "num_rows": 7}


def test_batcher_seed_defaults_to_data_config(tmp_path):
    ds = make_ds(tmp_path, 10, seed=5)
    assert labels([PromptBatcher(ds, 10).next_batch()]) == labels([PromptBatcher(ds, 10, seed=5).next_batch()])


def test_batcher_rejects_state_for_other_data(tmp_path):
    b = PromptBatcher(make_ds(tmp_path, 7), 3)
    with pytest.raises(DataError, match="saved for a dataset of 9 rows, but .* has 7 usable rows"):
        b.load_state_dict({"epoch": 0, "position": 2, "seed": 0, "num_rows": 9})
    with pytest.raises(DataError, match="missing \\['seed'\\]"):
        b.load_state_dict({"epoch": 0, "position": 2})
    with pytest.raises(ConfigError, match="batch_size=0"):
        PromptBatcher(b.dataset, 0)


def test_jsonl_tolerates_bom_and_crlf(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "label": 1}\r\n\r\n{"prompt": "b", "label": 2}\r\n')
    assert [(r["prompt"], r["row"]) for r in load(p).rows] == [("a", 1), ("b", 3)]
