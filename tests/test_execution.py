"""Integration and fixture-table tests of t2sql_nb.execution: hostile SQL, execution match, extraction, hardness."""

import contextlib
import io
import json
import os
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from t2sql_nb import execution
from t2sql_nb.core import T2SQLError, default_data_dir, file_sha256
from t2sql_nb.execution import (exec_main, execute_sql, execution_match, extract_main, extract_sql,
                                has_top_level_order_by, results_match, score_main, spider_counts,
                                spider_hardness, split_statements)

SPIDER_DEV = default_data_dir() / "spider_dev"
needs_spider = pytest.mark.skipif(not (SPIDER_DEV / "dev.json").is_file(),
                                  reason=f"Spider dev not found at {SPIDER_DEV} (set T2SQL_DATA_DIR)")
SPIDER_DBS = ("concert_singer", "pets_1", "car_1")

RUNAWAY_CTE = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"


def build_music_db(path: Path) -> Path:
    "Create a small database whose row order by rowid differs from its order by age, with a view and a trigger."
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER, net_worth REAL);
        INSERT INTO singer VALUES (1, 'Ann', 'France', 30, 1.5), (2, 'Bob', 'France', 25, 2.25),
                                  (3, 'Cid', 'Peru', 41, NULL), (4, 'Dee', 'Chile', 19, 0.5);
        CREATE TABLE audit (note TEXT);
        CREATE INDEX singer_age ON singer (age);
        CREATE VIEW french AS SELECT name FROM singer WHERE country = 'France';
        CREATE TRIGGER log_insert AFTER INSERT ON singer BEGIN INSERT INTO audit VALUES ('insert'); END;
    """)
    con.commit()
    con.close()
    return path


@pytest.fixture
def music_db(tmp_path):
    (tmp_path / "music").mkdir()
    return build_music_db(tmp_path / "music" / "music.sqlite")


def first_table_and_column(db_path: Path) -> tuple[str, str]:
    con = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        table = con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid LIMIT 1").fetchone()[0]
        column = con.execute(f'SELECT name FROM pragma_table_info("{table}")').fetchone()[0]
    finally:
        con.close()
    return table, column


# ---------------------------------------------------------------- hostile SQL

HOSTILE = {
    "drop table": "DROP TABLE {table}",
    "delete": "DELETE FROM {table}",
    "update": "UPDATE {table} SET {column} = NULL",
    "insert": "INSERT INTO {table} DEFAULT VALUES",
    "replace": "REPLACE INTO {table} DEFAULT VALUES",
    "delete in with": "WITH doomed AS (SELECT rowid FROM {table}) DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM doomed)",
    "update in with": "WITH t AS (SELECT 1) UPDATE {table} SET {column} = NULL",
    "insert in with": "WITH t AS (SELECT * FROM {table}) INSERT INTO {table} SELECT * FROM t",
    "attach": "ATTACH DATABASE '{target}' AS evil",
    "attach uri rwc": "ATTACH DATABASE 'file:{target}?mode=rwc' AS evil",
    "attach then create": "ATTACH '{target}' AS evil; CREATE TABLE evil.t (x)",
    "vacuum": "VACUUM",
    "vacuum into": "VACUUM INTO '{target}'",
    "pragma journal_mode": "PRAGMA journal_mode=WAL",
    "pragma user_version": "PRAGMA user_version=5",
    "pragma writable_schema": "PRAGMA writable_schema=ON",
    "pragma read": "PRAGMA table_info({table})",
    "table-valued pragma": "SELECT * FROM pragma_table_info('{table}')",
    "load_extension": "SELECT load_extension('{target}')",
    "select then drop": "SELECT 1; DROP TABLE {table}",
    "two selects": "SELECT 1; SELECT 2",
    "select then comment then delete": "SELECT 1; -- harmless\nDELETE FROM {table}",
    "create table": "CREATE TABLE evil (x)",
    "create table as": "CREATE TABLE evil AS SELECT * FROM {table}",
    "create temp table": "CREATE TEMP TABLE evil (x)",
    "create view": "CREATE VIEW evil AS SELECT 1",
    "create temp view": "CREATE TEMP VIEW evil AS SELECT 1",
    "create index": "CREATE INDEX evil ON {table} ({column})",
    "create trigger": "CREATE TRIGGER evil AFTER INSERT ON {table} BEGIN DELETE FROM {table}; END",
    "create virtual table": "CREATE VIRTUAL TABLE evil USING fts5(x)",
    "alter table": "ALTER TABLE {table} RENAME TO evil",
    "reindex": "REINDEX",
    "analyze": "ANALYZE",
    "begin": "BEGIN IMMEDIATE",
    "savepoint": "SAVEPOINT evil",
}


@pytest.fixture(scope="module")
def hostile_targets(tmp_path_factory):
    "Copies of real Spider databases and a built one, each in its own folder, with its first table and column."
    root = tmp_path_factory.mktemp("hostile")
    (root / "music").mkdir()
    dbs = [build_music_db(root / "music" / "music.sqlite")]
    if (SPIDER_DEV / "database").is_dir():
        for db_id in SPIDER_DBS:
            folder = root / db_id
            folder.mkdir()
            dbs.append(Path(shutil.copy(SPIDER_DEV / "database" / db_id / f"{db_id}.sqlite", folder)))
    return [(db, *first_table_and_column(db)) for db in dbs]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_sql_is_refused(name, hostile_targets, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for db, table, column in hostile_targets:
        before = {p.name: file_sha256(p) for p in db.parent.iterdir()}
        for target in (db.parent / "evil.sqlite", elsewhere / "evil.sqlite"):
            sql = HOSTILE[name].format(table=table, column=column, target=target)
            result = execute_sql(db, sql, timeout=5)
            assert result.refused, f"{db.name}: {sql!r} was not refused: {result}"
            assert result.rows is None
            assert not result.ok
            assert result.error.startswith("refused"), result.error
            assert not target.exists(), f"{sql!r} created {target}"
        after = {p.name: file_sha256(p) for p in db.parent.iterdir()}
        assert after == before, f"{db.name}: files changed after {name!r}"
        assert list(elsewhere.iterdir()) == []
        assert execute_sql(db, f'SELECT count(*) FROM "{table}"').ok


def test_refusal_names_the_reason(music_db):
    assert "not DELETE" in execute_sql(music_db, "-- a comment first\nDELETE FROM singer").error
    assert "not ATTACH" in execute_sql(music_db, "ATTACH 'x.sqlite' AS x").error
    assert "not EXPLAIN" in execute_sql(music_db, "EXPLAIN SELECT 1").error
    assert "DELETE singer is not allowed" in execute_sql(music_db, "WITH t AS (SELECT 1) DELETE FROM singer").error
    assert "function load_extension() is not allowed" in execute_sql(music_db, "SELECT load_extension('x')").error
    assert "UPDATE sqlite_master" in execute_sql(music_db, "SELECT * FROM json_each('[1]')").error
    assert "2 statements" in execute_sql(music_db, "SELECT 1; SELECT 2").error


@pytest.mark.parametrize("name", list(HOSTILE))
def test_guards_hold_without_keyword_check(name, hostile_targets, tmp_path, monkeypatch):
    # The keyword check only gives clearer messages; the authorizer must refuse on its own.
    monkeypatch.setattr(execution, "_keyword_refusal", lambda statement: None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for db, table, column in hostile_targets:
        before = {p.name: file_sha256(p) for p in db.parent.iterdir()}
        target = elsewhere / "evil.sqlite"
        result = execute_sql(db, HOSTILE[name].format(table=table, column=column, target=target), timeout=5)
        assert result.refused or (result.ok and result.rows == []), result
        assert {p.name: file_sha256(p) for p in db.parent.iterdir()} == before
        assert not target.exists()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_files_hold_without_authorizer(name, hostile_targets, tmp_path, monkeypatch):
    # With the keyword check and the authorizer both off, the read-only file and the limits still protect the files.
    monkeypatch.setattr(execution, "_keyword_refusal", lambda statement: None)
    monkeypatch.setattr(execution._ReadOnlyGuard, "authorize", lambda self, *args: sqlite3.SQLITE_OK)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for db, table, column in hostile_targets:
        before = {p.name: file_sha256(p) for p in db.parent.iterdir()}
        for target in (db.parent / "evil.sqlite", elsewhere / "evil.sqlite"):
            execute_sql(db, HOSTILE[name].format(table=table, column=column, target=target), timeout=5)
            assert not target.exists()
        assert {p.name: file_sha256(p) for p in db.parent.iterdir()} == before


def test_reads_are_allowed(music_db):
    assert execute_sql(music_db, "SELECT name FROM french ORDER BY name").rows == [("Ann",), ("Bob",)]
    assert execute_sql(music_db, "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").rows == [(1,)]
    recursive = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 5) SELECT sum(i) FROM n"
    assert execute_sql(music_db, recursive).rows == [(15,)]
    window = "SELECT name, rank() OVER (ORDER BY age DESC) FROM singer ORDER BY age DESC LIMIT 1"
    assert execute_sql(music_db, window).rows == [("Cid", 1)]
    assert execute_sql(music_db, "SELECT 1; -- trailing comment").rows == [(1,)]


def test_missing_and_corrupt_databases_raise(tmp_path):
    with pytest.raises(T2SQLError, match="SQLite database not found"):
        execute_sql(tmp_path / "absent.sqlite", "SELECT 1")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database " * 200)
    with pytest.raises(T2SQLError, match="unreadable SQLite database"):
        execute_sql(junk, "SELECT 1")
    with pytest.raises(T2SQLError, match="max_rows"):
        execute_sql(junk, "SELECT 1", max_rows=-1)


# ---------------------------------------------------------------- time limit, row cap, threads

def test_runaway_cte_times_out(music_db):
    start = time.perf_counter()
    result = execute_sql(music_db, RUNAWAY_CTE, timeout=1.0)
    elapsed = time.perf_counter() - start
    assert result.timed_out
    assert not result.ok
    assert result.error == "timed out after 1 s"
    assert elapsed < 1.0 + 0.5, elapsed


def test_runaway_fetch_times_out(music_db):
    start = time.perf_counter()
    result = execute_sql(music_db, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT i FROM n",
                         timeout=0.3)
    assert result.timed_out
    assert time.perf_counter() - start < 0.3 + 0.5


@needs_spider
def test_heavy_join_on_real_database_times_out(tmp_path):
    db = Path(shutil.copy(SPIDER_DEV / "database" / "world_1" / "world_1.sqlite", tmp_path))
    start = time.perf_counter()
    result = execute_sql(db, "SELECT count(*) FROM city AS a, city AS b, city AS c", timeout=1.0)
    assert result.timed_out
    assert time.perf_counter() - start < 1.0 + 0.5


def test_max_rows_keeps_first_rows_and_counts_all(music_db):
    result = execute_sql(music_db, "SELECT name FROM singer ORDER BY name", max_rows=2)
    assert result.rows == [("Ann",), ("Bob",)]
    assert result.truncated
    assert result.total_rows == 4
    full = execute_sql(music_db, "SELECT name FROM singer ORDER BY name", max_rows=10)
    assert not full.truncated
    assert full.total_rows == 4
    scoring = execute_sql(music_db, "SELECT name FROM singer")
    assert scoring.total_rows == 4
    assert not scoring.truncated


def test_threads_use_their_own_connections(music_db):
    results = {}

    def run(key, sql, timeout):
        results[key] = execute_sql(music_db, sql, timeout=timeout)

    threads = [threading.Thread(target=run, args=("slow", RUNAWAY_CTE, 0.5))]
    threads += [threading.Thread(target=run, args=(i, f"SELECT count(*) + {i} FROM singer", 5)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["slow"].timed_out
    for i in range(6):
        assert results[i].rows == [(4 + i,)]


# ---------------------------------------------------------------- statements

@pytest.mark.parametrize("sql, expected", [
    ("SELECT 1", ["SELECT 1"]),
    ("SELECT 1;", ["SELECT 1"]),
    ("SELECT 1;;  ;", ["SELECT 1"]),
    ("SELECT 1; -- done", ["SELECT 1"]),
    ("SELECT 1; /* done */", ["SELECT 1"]),
    ("SELECT ';' FROM t", ["SELECT ';' FROM t"]),
    ('SELECT "a;b" FROM t; SELECT 2', ['SELECT "a;b" FROM t', "SELECT 2"]),
    ("SELECT 1 -- ; not a boundary\n, 2", ["SELECT 1 -- ; not a boundary\n, 2"]),
    ("", []),
    ("-- only a comment", []),
])
def test_split_statements(sql, expected):
    assert split_statements(sql) == expected


# ---------------------------------------------------------------- execution match

MATCH_CASES = [
    # gold, prediction, match, words in the reason
    ("SELECT DISTINCT country FROM singer", "SELECT country FROM singer", False, "number of rows"),
    ("SELECT name FROM singer", "SELECT name FROM singer ORDER BY name", True, "same rows"),
    ("SELECT name FROM singer ORDER BY age", "SELECT name FROM singer", False, "different order"),
    ("SELECT name FROM singer ORDER BY age", "SELECT name FROM singer ORDER BY age ASC", True, "same rows"),
    ("SELECT name, age FROM singer ORDER BY age", "SELECT age, name FROM singer ORDER BY age", True, "same rows"),
    ("SELECT name FROM (SELECT name FROM singer ORDER BY age)", "SELECT name FROM singer", True, "same rows"),
    ("SELECT name FROM singer WHERE age > 20 UNION SELECT name FROM singer ORDER BY name",
     "SELECT name FROM singer ORDER BY name DESC", False, "different order"),
    ("SELECT country FROM singer", "SELECT country FROM singer UNION ALL SELECT country FROM singer", False, "number of rows"),
    ("SELECT 0.1 + 0.2", "SELECT 0.3", True, "same rows"),
    ("SELECT 1000000.0", "SELECT 1000000.5", True, "same rows"),  # relative difference 5e-7 is within REL_TOL
    ("SELECT 1.0", "SELECT 1.00001", False, "different values"),
    ("SELECT 0.0", "SELECT 0.0000000001", True, "same rows"),  # within ABS_TOL
    ("SELECT avg(age) FROM singer", "SELECT sum(age) * 1.0 / count(*) FROM singer", True, "same rows"),
    ("SELECT count(*) FROM singer", "SELECT count(*) * 1.0 FROM singer", True, "same rows"),
    ("SELECT count(*) FROM singer", "SELECT '4'", False, "different values"),
    ("SELECT NULL", "SELECT NULL", True, "same rows"),
    ("SELECT NULL", "SELECT ''", False, "different values"),
    ("SELECT NULL", "SELECT 0", False, "different values"),
    ("SELECT net_worth FROM singer", "SELECT net_worth FROM singer WHERE net_worth IS NOT NULL", False, "number of rows"),
    ("SELECT name, age FROM singer", "SELECT age AS years, name AS who FROM singer", True, "same rows"),
    ("SELECT name, age FROM singer", "SELECT name FROM singer", False, "number of columns"),
    ("SELECT name, country FROM singer", "SELECT name, name FROM singer", False, "different values"),
    ("SELECT name FROM singer WHERE age > 99", "SELECT name, age FROM singer WHERE age > 99", True, "same rows"),
    ("SELECT name FROM singer WHERE age > 99", "SELECT name FROM singer WHERE age > 40", False, "number of rows"),
    ("SELECT Name FROM singer", "SELECT lower(name) FROM singer", False, "different values"),
]


@pytest.mark.parametrize("gold, pred, match, reason", MATCH_CASES)
def test_execution_match_table(music_db, gold, pred, match, reason):
    result = execution_match(music_db, gold, pred)
    assert result.match is match, result
    assert reason in result.reason, result.reason
    assert not result.gold_failed


def test_unordered_prediction_really_differs_in_order(music_db):
    by_age = execute_sql(music_db, "SELECT name FROM singer ORDER BY age").rows
    plain = execute_sql(music_db, "SELECT name FROM singer").rows
    assert sorted(by_age) == sorted(plain)
    assert by_age != plain


def test_gold_failures_are_not_counted(music_db):
    broken = execution_match(music_db, "SELECT nme FROM singer", "SELECT name FROM singer")
    assert broken.gold_failed
    assert broken.gold_error == "no such column: nme"
    assert broken.pred_error is None
    slow = execution_match(music_db, RUNAWAY_CTE, "SELECT 1", timeout=0.3)
    assert slow.gold_failed
    assert "timed out" in slow.gold_error


def test_prediction_failures_are_mismatches(music_db):
    failed = execution_match(music_db, "SELECT name FROM singer", "SELECT nme FROM singer")
    assert not failed.match and not failed.gold_failed
    assert failed.pred_error == "no such column: nme"
    refused = execution_match(music_db, "SELECT name FROM singer", "DELETE FROM singer")
    assert refused.pred_error.startswith("refused")
    slow = execution_match(music_db, "SELECT name FROM singer", RUNAWAY_CTE, timeout=0.3)
    assert slow.pred_timed_out
    assert not slow.match
    assert execution_match(music_db, "SELECT name FROM singer", "").pred_error.startswith("empty query")


RESULT_CASES = [
    # gold rows, predicted rows, ordered, match
    ([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], False, True),
    ([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], True, False),
    ([(1, "a"), (2, "b")], [("a", 1), ("b", 2)], True, True),
    ([(1, "a"), (1, "a")], [(1, "a")], False, False),
    ([(1, "a"), (1, "a"), (2, "b")], [(1, "a"), (2, "b"), (2, "b")], False, False),
    ([(1, 1), (2, 2)], [(1, 2), (2, 1)], False, False),
    ([(1, 2), (3, 4)], [(2, 1), (4, 3)], False, True),
    ([(1,)], [(1.0,)], False, True),
    ([(1,)], [("1",)], False, False),
    ([(b"\x00",)], [(b"\x00",)], False, True),
    ([(b"1",)], [("1",)], False, False),
    ([(None,)], [(None,)], False, True),
    ([(2**62,)], [(2**62 + 1,)], False, False),
    ([(float("inf"),)], [(float("inf"),)], False, True),
    ([(0.1 + 0.2, "x"), (0.3, "y")], [(0.3, "x"), (0.3 + 1e-12, "y")], True, True),
    ([], [], True, True),
    ([], [(1,)], False, False),
]


@pytest.mark.parametrize("gold, pred, ordered, match", RESULT_CASES)
def test_results_match_table(gold, pred, ordered, match):
    assert results_match(gold, pred, ordered) is match


def test_results_match_tolerance_is_configurable():
    assert not results_match([(1.0,)], [(1.001,)], ordered=False)
    assert results_match([(1.0,)], [(1.001,)], ordered=False, tol=(1e-2, 0.0))


@pytest.mark.parametrize("sql, expected", [
    ("SELECT a FROM t ORDER BY a", True),
    ("select a from t order by a desc limit 3", True),
    ("SELECT a FROM t", False),
    ("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 2)", False),
    ("SELECT a FROM t WHERE a IN (SELECT a FROM u ORDER BY a LIMIT 1)", False),
    ("SELECT a, row_number() OVER (ORDER BY a) FROM t", False),
    ("SELECT group_concat(a) OVER (PARTITION BY b ORDER BY a) FROM t", False),
    ("WITH x AS (SELECT a FROM t ORDER BY a) SELECT a FROM x", False),
    ("WITH x AS (SELECT a FROM t) SELECT a FROM x ORDER BY a", True),
    ("SELECT a FROM t UNION SELECT a FROM u ORDER BY a", True),
    ("SELECT a FROM t EXCEPT SELECT a FROM u", False),
    ("(SELECT a FROM t ORDER BY a)", True),
    ("SELECT 'order by' FROM t", False),
    ("SELECT a FROM t ORDER BY a NULLS LAST", True),
])
def test_has_top_level_order_by(sql, expected):
    assert has_top_level_order_by(sql) is expected


@needs_spider
def test_spider_gold_queries_match_themselves():
    questions = json.loads((SPIDER_DEV / "dev.json").read_text())[::8]
    for item in questions:
        db = SPIDER_DEV / "database" / item["db_id"] / f"{item['db_id']}.sqlite"
        result = execution_match(db, item["query"], item["query"])
        assert result.match, (item["query"], result)


@needs_spider
def test_spider_rewrites(tmp_path):
    db = SPIDER_DEV / "database" / "concert_singer" / "concert_singer.sqlite"
    gold = "SELECT name, country, age FROM singer ORDER BY age DESC"
    assert execution_match(db, gold, "SELECT age, name, country FROM singer ORDER BY age DESC").match
    assert not execution_match(db, gold, "SELECT name, country, age FROM singer ORDER BY age").match
    gold = "SELECT count(*) FROM singer"
    assert execution_match(db, gold, "SELECT count(Singer_ID) FROM singer").match
    gold = ("SELECT T2.name, count(*) FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id "
            "GROUP BY T1.stadium_id")
    pred = ("SELECT s.Name, (SELECT count(*) FROM concert AS c WHERE c.Stadium_ID = s.Stadium_ID) AS n "
            "FROM stadium AS s WHERE s.Stadium_ID IN (SELECT Stadium_ID FROM concert)")
    assert execution_match(db, gold, pred).match


# ---------------------------------------------------------------- extraction

EXTRACT_CASES = [
    # raw model output, extracted SQL
    ("```sql\nSELECT count(*) FROM concert;\n```", "SELECT count(*) FROM concert"),
    ("```SQL\nSELECT name FROM singer\n```\nThe query above lists the names.", "SELECT name FROM singer"),
    ("```Sql\nSELECT 1\n```", "SELECT 1"),
    ("```sqlite\nSELECT name FROM singer;\n```", "SELECT name FROM singer"),
    ("```\nSELECT name FROM singer;\n```\nThis returns every singer.", "SELECT name FROM singer"),
    ("Sure!\n```sql\n-- count concerts\nSELECT count(*)\nFROM concert\nWHERE year = 2014;\n```\nDone.",
     "SELECT count(*)\nFROM concert\nWHERE year = 2014"),
    ("First try:\n```sql\nSELECT name FROM singer\n```\nBetter:\n```sql\nSELECT DISTINCT name FROM singer\n```",
     "SELECT DISTINCT name FROM singer"),
    ("```sql\nSELECT a FROM t;\nSELECT b FROM u;\n```", "SELECT a FROM t"),
    ("```sql\nSELECT name FROM singer\n```\nExample output:\n```\n| name |\n| Ann |\n```", "SELECT name FROM singer"),
    ("```python\nprint('hi')\n```\nSELECT name FROM singer", "SELECT name FROM singer"),
    ("```sql\nSELECT name FROM singer WHERE age >", "SELECT name FROM singer WHERE age >"),
    ("```sql\nDELETE FROM singer;\n```", "DELETE FROM singer"),
    ("```sql\nWITH t AS (\n  SELECT name FROM singer\n),\n\nu AS (SELECT name FROM t)\nSELECT name FROM u\n```",
     "WITH t AS (\n  SELECT name FROM singer\n),\n\nu AS (SELECT name FROM t)\nSELECT name FROM u"),
    ("<think>maybe SELECT * FROM concert</think>\nSELECT COUNT(*) FROM concert", "SELECT COUNT(*) FROM concert"),
    ("<think>maybe SELECT * FROM concert", None),
    ("<think>\n```sql\nSELECT * FROM concert\n```\nstill thinking", None),
    ("<THINK>hmm</THINK>\n```sql\nSELECT 1 FROM t\n```", "SELECT 1 FROM t"),
    ("the reasoning opened in the prompt: SELECT * FROM a</think>\nSELECT name FROM b", "SELECT name FROM b"),
    ("WITH t AS (SELECT name FROM singer) SELECT name FROM t", "WITH t AS (SELECT name FROM singer) SELECT name FROM t"),
    ("Here is the query: SELECT name FROM singer", "SELECT name FROM singer"),
    ("Here is the query: SELECT name FROM singer WHERE age > 30. It lists the names.",
     "SELECT name FROM singer WHERE age > 30"),
    ("SELECT name FROM singer;\nThis query returns every name.", "SELECT name FROM singer"),
    ("SELECT name\nFROM singer\nWHERE age > 30\nThis returns the singers older than 30.",
     "SELECT name\nFROM singer\nWHERE age > 30"),
    ("To answer, we select the names with the highest age:\n\nSELECT name FROM singer ORDER BY age DESC LIMIT 1",
     "SELECT name FROM singer ORDER BY age DESC LIMIT 1"),
    ("The query is `SELECT count(*) FROM singer`.", "SELECT count(*) FROM singer"),
    ("SELECT name FROM singer WHERE name = 'Mr. Smith'. That is it.", "SELECT name FROM singer WHERE name = 'Mr. Smith'"),
    ("select name from singer where country = 'France'", "select name from singer where country = 'France'"),
    ("SELECT 0.1 + 0.2", "SELECT 0.1 + 0.2"),
    ("  SELECT name FROM singer  ;;  ", "SELECT name FROM singer"),
    ("SELECT name FROM singer; SELECT age FROM singer;", "SELECT name FROM singer"),
    ("SELECT name FROM singer -- all singers", "SELECT name FROM singer -- all singers"),
    ("SELECT name FROM singer\n-- the names. Sorted? No.\nWHERE age > 1", "SELECT name FROM singer\n-- the names. Sorted? No.\nWHERE age > 1"),
    ("Answer:\nSELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.id WHERE T2.year = 2014;\n",
     "SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.id WHERE T2.year = 2014"),
    ("I cannot answer that question.", None),
    ("select the names of singers", None),
    ("We select the rows with care, with patience.", None),
    ("The answer uses WITH and SELECT keywords but no query.", None),
    ("SQL: DELETE FROM singer", None),
    ("", None),
    ("<think></think>", None),
]


@pytest.mark.parametrize("text, expected", EXTRACT_CASES)
def test_extract_sql_table(text, expected):
    assert extract_sql(text) == expected


def test_extract_sql_is_fast_on_long_prose():
    text = "We select the rows with the values and select again. " * 300 + "\nSELECT name FROM singer"
    start = time.perf_counter()
    assert extract_sql(text) == "SELECT name FROM singer"
    assert time.perf_counter() - start < 2.0


@needs_spider
def test_extract_sql_keeps_spider_gold_queries():
    for item in json.loads((SPIDER_DEV / "dev.json").read_text())[::4]:
        query = split_statements(item["query"])[0]
        assert extract_sql(item["query"]) == query
        assert extract_sql(f"```sql\n{item['query']}\n```\nThis answers the question.") == query
        assert extract_sql(f"Here is the query: {item['query']}\n\nIt answers the question.") == query


# ---------------------------------------------------------------- Spider hardness

# Spider dev gold queries with their counts (component1, component2, others) worked out by hand
# from the rules of Spider's eval_hardness; the index is the question's position in dev.json.
HARDNESS_CASES = [
    # 13: WHERE (c1 1); one subquery (c2 1); others 0 -> the third "hard" rule
    ("SELECT song_name FROM singer WHERE age  >  (SELECT avg(age) FROM singer)", (1, 1, 0), "hard"),
    # 39: WHERE and LIKE (c1 2); two SELECT columns (others 1)
    ("SELECT name ,  country FROM singer WHERE song_name LIKE '%Hey%'", (2, 0, 1), "medium"),
    # 67: ORDER BY and LIMIT (c1 2); two SELECT columns (others 1)
    ("SELECT pettype ,  weight FROM pets ORDER BY pet_age LIMIT 1", (2, 0, 1), "medium"),
    # 133: ORDER BY, LIMIT, one join (c1 3)
    ("SELECT T1.Model FROM CAR_NAMES AS T1 JOIN CARS_DATA AS T2 ON T1.MakeId  =  T2.Id ORDER BY T2.mpg DESC LIMIT 1;",
     (3, 0, 0), "hard"),
    # 154: one WHERE condition; BETWEEN is a single condition
    ("select distinct year from cars_data where weight between 3000 and 4000;", (1, 0, 0), "easy"),
    # 177: only the first query of the UNION counts: GROUP BY and a join (c1 2), two columns (others 1); UNION (c2 1)
    ("SELECT T1.countryId ,  T1.CountryName FROM Countries AS T1 JOIN CAR_MAKERS AS T2 ON T1.CountryId  =  T2.Country "
     "GROUP BY T1.countryId HAVING count(*)  >  3 UNION SELECT T1.countryId ,  T1.CountryName FROM Countries AS T1 "
     "JOIN CAR_MAKERS AS T2 ON T1.CountryId  =  T2.Country JOIN MODEL_LIST AS T3 ON T2.Id  =  T3.Maker "
     "WHERE T3.Model  =  'fiat';", (2, 1, 1), "extra"),
    # 237: WHERE and a join (c1 2); INTERSECT (c2 1)
    ('SELECT T1.Airline FROM AIRLINES AS T1 JOIN FLIGHTS AS T2 ON T1.uid  =  T2.Airline WHERE T2.SourceAirport  =  "APG" '
     'INTERSECT SELECT T1.Airline FROM AIRLINES AS T1 JOIN FLIGHTS AS T2 ON T1.uid  =  T2.Airline '
     'WHERE T2.SourceAirport  =  "CVO"', (2, 1, 0), "extra"),
    # 243: GROUP BY and a join (c1 2); the HAVING aggregate does not count
    ("SELECT T1.Airline FROM AIRLINES AS T1 JOIN FLIGHTS AS T2 ON T1.uid  =  T2.Airline GROUP BY T1.Airline "
     "HAVING count(*)  <  200", (2, 0, 0), "medium"),
    # 378: GROUP BY only; count(*) in HAVING does not count
    ("SELECT document_id FROM Paragraphs GROUP BY document_id HAVING count(*) BETWEEN 1 AND 2", (1, 0, 0), "easy"),
    # 427: WHERE (c1 1); subquery (c2 1); count(*) plus the NOT of NOT IN make two aggregates (others 1)
    ("SELECT count(*) FROM visitor WHERE id NOT IN (SELECT t2.visitor_id FROM museum AS t1 JOIN visit AS t2 "
     "ON t1.Museum_ID  =  t2.Museum_ID WHERE t1.open_year  >  2010)", (1, 1, 1), "extra"),
    # 480: GROUP BY, ORDER BY, LIMIT, a join (c1 4); count(*) in SELECT and ORDER BY, six columns (others 2)
    ("SELECT T1.student_id ,  T1.first_name ,  T1.middle_name ,  T1.last_name ,  count(*) ,  T1.student_id "
     "FROM Students AS T1 JOIN Student_Enrolment AS T2 ON T1.student_id  =  T2.student_id GROUP BY T1.student_id "
     "ORDER BY count(*) DESC LIMIT 1", (4, 0, 2), "extra"),
    # 481: WHERE (c1 1); subquery (c2 1); one negation is one aggregate, not more than one
    ("SELECT semester_name FROM Semesters WHERE semester_id NOT IN( SELECT semester_id FROM Student_Enrolment )",
     (1, 1, 0), "hard"),
    # 535: two aggregates and two columns (others 2), no component1
    ("SELECT count(DISTINCT series_name) ,  count(DISTINCT content) FROM TV_Channel;", (0, 0, 2), "medium"),
    # 594: WHERE and one OR (c1 2); two WHERE conditions (others 1)
    ("SELECT count(*) FROM votes WHERE state  =  'NY' OR state  =  'CA'", (2, 0, 1), "medium"),
    # 618: WHERE, ORDER BY, LIMIT (c1 3)
    ('SELECT Name FROM country WHERE Continent  =  "Asia" ORDER BY LifeExpectancy LIMIT 1', (3, 0, 0), "hard"),
    # 620: WHERE (c1 1); two aggregates, two columns (others 2)
    ('SELECT sum(Population) ,  max(GNP) FROM country WHERE Continent  =  "Asia"', (1, 0, 2), "medium"),
    # 642: a subquery in FROM adds nothing, even with INTERSECT inside it
    ('SELECT COUNT(*) FROM (SELECT T1.Name FROM country AS T1 JOIN countrylanguage AS T2 ON T1.Code  =  T2.CountryCode '
     'WHERE T2.Language  =  "English" INTERSECT SELECT T1.Name FROM country AS T1 JOIN countrylanguage AS T2 '
     'ON T1.Code  =  T2.CountryCode WHERE T2.Language  =  "Dutch")', (0, 0, 0), "easy"),
    # 650: WHERE, a join, one OR (c1 3); two WHERE conditions (others 1)
    ('SELECT DISTINCT T1.Region FROM country AS T1 JOIN countrylanguage AS T2 ON T1.Code  =  T2.CountryCode '
     'WHERE T2.Language  =  "English" OR T2.Language  =  "Dutch"', (3, 0, 1), "hard"),
    # 654: WHERE, GROUP BY, ORDER BY, LIMIT, a join (c1 5)
    ('SELECT T2.Language FROM country AS T1 JOIN countrylanguage AS T2 ON T1.Code  =  T2.CountryCode '
     'WHERE T1.Continent  =  "Asia" GROUP BY T2.Language ORDER BY COUNT (*) DESC LIMIT 1', (5, 0, 0), "extra"),
]


@pytest.mark.parametrize("sql, counts, level", HARDNESS_CASES)
def test_spider_hardness_table(sql, counts, level):
    assert spider_counts(sql) == counts
    assert spider_hardness(sql) == level


def counts_from_spider_parse(sql: dict) -> tuple[int, int, int]:
    "Count the hardness components on the parse Spider ships in dev.json (`sql` field), as its evaluation does."
    like = 9  # index of 'like' in Spider's WHERE_OPS
    conditions = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    links = sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]
    component1 = sum([bool(sql["where"]), bool(sql["groupBy"]), bool(sql["orderBy"]), sql["limit"] is not None])
    component1 += max(len(sql["from"]["table_units"]) - 1, 0) + links.count("or")
    component1 += sum(c[1] == like for c in conditions)
    component2 = sum(isinstance(c[3], dict) + isinstance(c[4], dict) for c in conditions)
    component2 += sum(sql[key] is not None for key in ("intersect", "except", "union"))
    aggregates = sum(unit[0] != 0 for unit in sql["select"][1])
    aggregates += sum(bool(c[0]) for c in sql["where"][::2])
    aggregates += sum(column[0] != 0 for column in sql["groupBy"])
    if sql["orderBy"]:
        aggregates += sum(unit[0] != 0 for value in sql["orderBy"][1] for unit in (value[1], value[2]) if unit)
    aggregates += sum(1 for unit in sql["having"] if isinstance(unit, str) or bool(unit[0]))
    others = sum([aggregates > 1, len(sql["select"][1]) > 1, len(sql["where"]) > 1, len(sql["groupBy"]) > 1])
    return component1, component2, others


@needs_spider
def test_spider_counts_agree_with_spider_parse():
    items = json.loads((SPIDER_DEV / "dev.json").read_text())
    disagreements = [(item["query"], spider_counts(item["query"]), counts_from_spider_parse(item["sql"]))
                     for item in items if spider_counts(item["query"]) != counts_from_spider_parse(item["sql"])]
    assert disagreements == []


# ---------------------------------------------------------------- command line

def run_cli(main, argv, stdin: str = ""):
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        sys.stdin = old_stdin
    return status, out.getvalue(), err.getvalue()


def test_exec_main(music_db):
    status, out, _ = run_cli(exec_main, ["--db", str(music_db), "--sql", "SELECT name FROM singer ORDER BY name",
                                         "--max-rows", "2", "--timeout", "5"])
    assert status == 0
    printed = json.loads(out)
    assert printed["columns"] == ["name"]
    assert printed["rows"] == [["Ann"], ["Bob"]]
    assert printed["truncated"] is True
    assert printed["total_rows"] == 4

    status, out, _ = run_cli(exec_main, ["--db", str(music_db), "--sql", "SELECT zeroblob(0), x'00ff'"])
    assert json.loads(out)["rows"] == [["X''", "X'00FF'"]]

    status, out, _ = run_cli(exec_main, ["--db", str(music_db), "--sql", "DROP TABLE singer"])
    assert status == 1
    assert json.loads(out)["refused"] is True

    status, out, _ = run_cli(exec_main, ["--db", str(music_db), "--sql", RUNAWAY_CTE, "--timeout", "0.2"])
    assert status == 1
    assert json.loads(out)["timed_out"] is True

    status, out, _ = run_cli(exec_main, ["--db", str(music_db.parent / "absent.sqlite"), "--sql", "SELECT 1"])
    assert status == 2
    assert "not found" in json.loads(out)["error"]


def test_score_main(music_db):
    status, out, _ = run_cli(score_main, ["--db", str(music_db), "--gold", "SELECT DISTINCT country FROM singer",
                                          "--pred", "SELECT country FROM singer"])
    assert status == 1
    printed = json.loads(out)
    assert printed["match"] is False
    assert "number of rows" in printed["reason"]
    status, out, _ = run_cli(score_main, ["--db", str(music_db), "--gold", "SELECT name FROM singer",
                                          "--pred", "SELECT name FROM singer ORDER BY name"])
    assert status == 0
    assert json.loads(out)["match"] is True


def test_extract_main():
    status, out, _ = run_cli(extract_main, [], stdin="Here:\n```sql\nSELECT 1 FROM t;\n```\n")
    assert status == 0
    assert out == "SELECT 1 FROM t\n"
    status, out, err = run_cli(extract_main, [], stdin="no query here")
    assert status == 1
    assert out == ""
    assert "no SQL query found" in err


@pytest.mark.parametrize("main, option", [(exec_main, "--max-rows"), (score_main, "--pred"), (extract_main, "stdin")])
def test_cli_help(main, option):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert option in out.getvalue()
