"""Bad input through the command line: one clear error line, a non-zero exit, no partial output."""
import json
import shutil

from conftest import run_cli

ROW = {"db_id": "d", "sql_complexity": "Simple", "question_style": "Formal", "question": "How many rows?",
       "external_knowledge": "", "cot": "", "sql": "SELECT count(*) FROM t", "schema_ddl": "CREATE TABLE t (a INT)"}


def write_selection(folder, train_text, val_text=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text(train_text)
    (folder / "val.jsonl").write_text(val_text if val_text is not None else json.dumps(ROW) + "\n")


def error_lines(result):
    return [line for line in result.stderr.splitlines() if "error:" in line]


def test_format_malformed_jsonl_names_line(tmp_path):
    write_selection(tmp_path / "sel", json.dumps(ROW) + "\n{broken\n")
    result = run_cli("format", "--select-dir", tmp_path / "sel", "--out", tmp_path / "fmt")
    assert result.returncode == 2
    assert "train.jsonl:2: invalid JSON" in result.stderr
    assert len(error_lines(result)) == 1
    assert not (tmp_path / "fmt").exists() or not any((tmp_path / "fmt").iterdir())


def test_format_row_missing_field(tmp_path):
    row = {k: v for k, v in ROW.items() if k != "question_style"}
    write_selection(tmp_path / "sel", json.dumps(ROW) + "\n", json.dumps(row) + "\n")
    result = run_cli("format", "--select-dir", tmp_path / "sel", "--out", tmp_path / "fmt")
    assert result.returncode == 2
    assert "val.jsonl:1: missing field 'question_style'" in result.stderr
    assert not (tmp_path / "fmt" / "format.json").exists()
    assert not (tmp_path / "fmt" / "val_samples.jsonl").exists()


def test_format_unknown_db_id_without_schema(tmp_path):
    row = {k: v for k, v in ROW.items() if k != "schema_ddl"}
    write_selection(tmp_path / "sel", json.dumps(row) + "\n")
    result = run_cli("format", "--select-dir", tmp_path / "sel", "--out", tmp_path / "fmt")
    assert result.returncode == 2
    assert "unknown db_id 'd'" in result.stderr
    assert not (tmp_path / "fmt" / "train_samples.jsonl").exists()


def test_eval_unknown_db_id(tmp_path):
    spider = tmp_path / "spider"
    (spider / "database").mkdir(parents=True)
    (spider / "dev.json").write_text(json.dumps([{"db_id": "ghost", "question": "q", "query": "SELECT 1"}]))
    result = run_cli("eval", "--data", spider, "--out", tmp_path / "out", "--model", "unused")
    assert result.returncode == 2
    assert "question 0: unknown db_id 'ghost'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_eval_unreadable_sqlite(tmp_path):
    spider = tmp_path / "spider"
    (spider / "database" / "junk").mkdir(parents=True)
    (spider / "database" / "junk" / "junk.sqlite").write_bytes(b"this is not a database" * 200)
    (spider / "dev.json").write_text(json.dumps([{"db_id": "junk", "question": "q", "query": "SELECT 1"}]))
    result = run_cli("eval", "--data", spider, "--out", tmp_path / "out", "--model", "unused")
    assert result.returncode == 2
    assert "unreadable SQLite database" in result.stderr
    assert not (tmp_path / "out").exists()


def test_eval_malformed_dev_json(tmp_path):
    spider = tmp_path / "spider"
    spider.mkdir()
    (spider / "dev.json").write_text('[{"db_id": "x",')
    result = run_cli("eval", "--data", spider, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "dev.json: invalid JSON" in result.stderr


def test_report_missing_data_path(tmp_path):
    result = run_cli("report", "--profile", "cpu", "--out", tmp_path / "run", "--set", f"data_dir={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert "not found" in result.stderr
    assert len(error_lines(result)) == 1
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "notebooks").exists()


def test_report_unknown_profile(tmp_path):
    result = run_cli("report", "--profile", "laptop", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert "profile 'laptop' not found" in result.stderr


def test_help_of_every_command():
    for command in ("select", "format", "train", "eval", "exec", "score", "extract", "report"):
        result = run_cli(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "usage:" in result.stdout, command
