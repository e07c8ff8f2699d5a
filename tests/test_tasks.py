"""Prompt files (JSONL and CSV) and their one-line errors."""

import pytest

from cory.tasks.base import TaskDataError, load_prompt_file


def test_jsonl_and_csv_prompts(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "The film"}\n\n{"prompt": "A quiet drama", "id": 2}\n')
    assert load_prompt_file(j) == ["The film", "A quiet drama"]
    c = tmp_path / "p.csv"
    c.write_text("text,id\nThe film,1\nA quiet drama,2\n")
    assert load_prompt_file(c, column="text") == ["The film", "A quiet drama"]


def test_bad_prompt_files_name_the_line(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "ok"}\n{not json}\n')
    with pytest.raises(TaskDataError, match=r"p.jsonl:2: not valid JSON"):
        load_prompt_file(j)
    j.write_text('{"text": "ok"}\n')
    with pytest.raises(TaskDataError, match=r"p.jsonl:1: missing key\(s\) prompt"):
        load_prompt_file(j)
    c = tmp_path / "p.csv"
    c.write_text("text\nx\n")
    with pytest.raises(TaskDataError, match="no column 'prompt'"):
        load_prompt_file(c)
    with pytest.raises(TaskDataError, match="prompt file not found"):
        load_prompt_file(tmp_path / "none.jsonl")
