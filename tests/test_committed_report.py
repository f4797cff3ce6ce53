"""The committed report's EX must be reproducible from its own predictions with an independent scorer.

The scorer here shares no code with t2sql_nb.execution. It runs both queries with plain sqlite3 in
read-only mode and compares results as multisets of rows, with floats rounded to 6 decimals. Row order
counts only when the gold query contains ORDER BY, the rule of the Spider test-suite evaluator, and
column permutations are tried as that evaluator does.
"""
import json
import sqlite3
import time
from collections import Counter
from itertools import permutations
from pathlib import Path

import pytest

from conftest import DATA_DIR

REPORTS = Path(__file__).resolve().parent.parent / "reports"
REPORT = REPORTS / "latest"
# Standalone `t2sql eval` outputs: a metrics.json with an eval_set field (a pipeline run's has none).
STANDALONE = sorted(path.parent for path in REPORTS.glob("*/metrics.json")
                    if "eval_set" in json.loads(path.read_text()))
QUERY_SECONDS = 10.0


def run_readonly(db_path, sql):
    con = sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True)
    deadline = time.monotonic() + QUERY_SECONDS
    con.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)  # a non-zero return interrupts the query
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def normalise(value):
    return round(value, 6) if isinstance(value, float) else value


def same_result(gold_rows, pred_rows, ordered):
    if len(gold_rows) != len(pred_rows):
        return False
    if not gold_rows:
        return True
    width = len(gold_rows[0])
    if any(len(r) != width for r in pred_rows):
        return False
    gold = [tuple(map(normalise, r)) for r in gold_rows]
    for perm in permutations(range(width)) if width <= 6 else [tuple(range(width))]:
        pred = [tuple(normalise(r[i]) for i in perm) for r in pred_rows]
        if (gold == pred) if ordered else (Counter(gold) == Counter(pred)):
            return True
    return False


def rescore(prediction, spider_dir, key="pred_sql"):
    db = spider_dir / "database" / prediction["db_id"] / f"{prediction['db_id']}.sqlite"
    gold_rows = run_readonly(db, prediction["gold"])
    if not prediction[key]:
        return False
    try:
        pred_rows = run_readonly(db, prediction[key])
    except sqlite3.Error:
        return False
    return same_result(gold_rows, pred_rows, "order by" in prediction["gold"].lower())


@pytest.mark.skipif(not (REPORT / "metrics.json").is_file(), reason="no committed report in reports/latest")
def test_committed_ex_matches_independent_rescoring():
    spider_dir = DATA_DIR / "spider_dev"
    if not spider_dir.is_dir():
        pytest.skip(f"Spider dev not found in {DATA_DIR}")
    metrics = json.loads((REPORT / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (REPORT / "predictions.jsonl").read_text().splitlines()]
    assert metrics["evaluation"], "metrics.json has no evaluated model"
    for role, summary in metrics["evaluation"].items():
        mine = [p for p in predictions if p["model_role"] == role]
        assert len(mine) == summary["n_questions"], role
        assert all(p["model"] == summary["model"] for p in mine), role
        correct = sum(rescore(p, spider_dir) for p in mine if not p["gold_failed"])
        assert correct == summary["correct"], (role, correct, summary["correct"])


@pytest.mark.parametrize("folder", STANDALONE, ids=lambda path: path.name)
def test_standalone_evaluation_matches_independent_rescoring(folder):
    spider_dir = DATA_DIR / "spider_dev"
    if not spider_dir.is_dir():
        pytest.skip(f"Spider dev not found in {DATA_DIR}")
    metrics = json.loads((folder / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["n_questions"]
    scored = [p for p in predictions if not p["gold_failed"]]
    assert sum(rescore(p, spider_dir) for p in scored) == metrics["correct"]
    if "voted" in metrics:
        assert sum(rescore(p, spider_dir, "voted_sql") for p in scored) == metrics["voted"]["correct"]

