"""Tests of the selector at scale: streaming features in processes and on Ray, synthetic data, neighbour recall."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

from t2sql_nb.core import T2SQLError, default_data_dir
from t2sql_nb.data import SQL_COMPLEXITIES, iter_synsql, load_synsql
from t2sql_nb.select import (
    construct_agreement, feature_table, nearest_question_distance, neighbour_recall, ray_feature_table,
    rows_at_lines, select_file, tfidf_nn_distance)
from t2sql_nb.synthetic import make_synthetic, spider_source_rows

DATA = default_data_dir()
SAMPLE = DATA / "synsql_sample" / "synsql_sample.jsonl"
SPIDER_TRAIN = DATA / "spider_train" / "train_spider.json"
needs_data = pytest.mark.skipif(not (SAMPLE.exists() and SPIDER_TRAIN.exists()),
                                reason="the SynSQL sample or Spider train is not in the data folder")


@pytest.fixture(scope="module")
def sources():
    if not (SAMPLE.exists() and SPIDER_TRAIN.exists()):
        pytest.skip("the SynSQL sample or Spider train is not in the data folder")
    return load_synsql(SAMPLE) + spider_source_rows(SPIDER_TRAIN)


@pytest.fixture(scope="module")
def synthetic(sources, tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "rows.jsonl"
    summary = make_synthetic(sources, 3000, seed=3, out_path=path)
    return path, summary


# Synthetic data

def test_synthetic_reads_as_synsql(synthetic):
    path, summary = synthetic
    rows = list(iter_synsql(path))
    assert len(rows) == summary["rows"] == 3000
    assert set(summary["sql_complexity"]) == set(SQL_COMPLEXITIES)
    assert all(600 <= count <= 900 for count in summary["sql_complexity"].values())
    assert len(summary["question_style"]) == 9
    assert all("schema_ddl" not in row for row in rows)
    assert max(len(row["cot"]) for row in rows) <= 1000 + 200  # template texts add the SQL


def test_synthetic_databases_near_target(synthetic):
    path, summary = synthetic
    sizes = pd.Series([row["db_id"] for row in iter_synsql(path, fields=("db_id",))]).value_counts()
    assert summary["databases"] == len(sizes)
    # 3,000 rows from 8,000 sources: most rows are first copies in their source's database.
    assert sizes.max() <= 150


# Streaming, processes and Ray give the same features

def test_two_workers_match_one_process(synthetic):
    path, _ = synthetic
    alone = feature_table(path, limit=600, chunk_rows=200, workers=1)
    pooled = feature_table(path, limit=600, chunk_rows=200, workers=2)
    pd.testing.assert_frame_equal(pooled, alone)
    assert alone["line"].tolist() == list(range(1, 601))


def test_ray_matches_in_process(synthetic):
    ray = pytest.importorskip("ray")
    path, _ = synthetic
    expected = feature_table(path, limit=400, chunk_rows=400, workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        found = ray_feature_table(path, limit=400, chunk_rows=250, batch_rows=100)
    finally:
        ray.shutdown()
    assert found["line"].tolist() == expected["line"].tolist()
    for column in expected.columns:
        assert found[column].tolist() == expected[column].tolist(), column


def test_worker_error_names_line(tmp_path, synthetic):
    path, _ = synthetic
    lines = path.read_text().splitlines()[:300]
    bad = json.loads(lines[149])
    bad["sql_complexity"] = "Hard"
    lines[149] = json.dumps(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(T2SQLError, match="line 150: unknown sql_complexity 'Hard'"):
        feature_table(broken, chunk_rows=100, workers=2)


def test_rows_at_lines_match_load(synthetic):
    path, _ = synthetic
    rows = load_synsql(path, limit=50)
    found = rows_at_lines(path, [50, 7, 1])
    assert found == {line: rows[line - 1] for line in (1, 7, 50)}


# Selection from a file

def test_select_file_small(synthetic):
    path, _ = synthetic
    params = {"pool_size": 300, "train_size": 100, "val_size": 30, "search_trials": 4, "feature_workers": 2,
              "chunk_rows": 500, "subset_size_range": [2000, 5000]}
    train, val, stats = select_file(path, params, limit=1500)
    assert (stats["rows"], len(train), len(val)) == (1500, 100, 30)
    assert not {r["line"] for r in train} & {r["line"] for r in val}
    assert all(r["line"] <= 1500 for r in train + val)
    assert stats["unparsable_sql"]["count"] == 0
    assert stats["sql_parsed_in_full"] == 0
    assert {"features", "neighbours", "reread"} <= set(stats["seconds"])


def test_select_file_counts_unparsable(tmp_path, synthetic):
    path, _ = synthetic
    rows = [json.loads(line) for line in path.read_text().splitlines()[:200]]
    rows[9]["sql"] = "SELECT name FROM singer WHERE ("
    rows[19]["sql"] = "SELEC name FROM singer"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"pool_size": 200, "train_size": 50, "val_size": 20, "search_trials": 3, "feature_workers": 1}
    _, _, stats = select_file(edited, params)
    assert stats["unparsable_sql"] == {"count": 2, "lines": [10, 20]}
    assert stats["sql_parsed_in_full"] == 2


# Quality of the shortcuts on real rows

@needs_data
def test_neighbour_recall_on_real_rows(sources):
    questions = [row["question"] for row in sources]
    databases = [row["db_id"] for row in sources]
    exact = tfidf_nn_distance(questions)
    found = nearest_question_distance(questions, databases)
    assert (found >= exact - 1e-9).all()
    assert neighbour_recall(found, exact) >= 0.95


@needs_data
def test_construct_agreement_on_real_sql(sources):
    agreement = construct_agreement([row["sql"] for row in sources[:1500]])
    assert agreement["rows"] == 1500
    assert agreement["agreement"] >= 0.99
    assert min(agreement["column_agreement"].values()) >= 0.99


def test_neighbour_recall_definition():
    assert neighbour_recall(np.array([0.2, 0.3000001]), np.array([0.2, 0.3])) == 1.0
    assert neighbour_recall(np.array([0.2, 0.31]), np.array([0.2, 0.3])) == 0.5
    assert neighbour_recall(np.array([]), np.array([])) == 1.0
