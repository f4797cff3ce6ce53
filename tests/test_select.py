"""Integration and bad-input tests of the heuristic selector (`t2sql_nb.select`)."""
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

from t2sql_nb.core import T2SQLError, default_data_dir, load_profile
from t2sql_nb.data import QUESTION_STYLES, SQL_COMPLEXITIES, SYNSQL_FIELDS
from t2sql_nb.select import (
    DEFAULT_COMPLEXITY_WEIGHTS, quality_features, random_subset, run_select, score_quality,
    search_subset_size, select_heuristic, select_main, select_settings, stratified_pool, weighted_scores)

SAMPLE = default_data_dir() / "synsql_sample" / "synsql_sample.jsonl"

SQL_BY_COMPLEXITY = {
    "Simple": "SELECT title FROM film WHERE year = {k}",
    "Moderate": "SELECT f.title, COUNT(*) FROM film f JOIN rental r ON f.id = r.film_id WHERE f.year > {k} GROUP BY f.title",
    "Complex": "WITH c AS (SELECT film_id, COUNT(*) AS n FROM rental GROUP BY film_id) "
               "SELECT title FROM film WHERE id IN (SELECT film_id FROM c WHERE n > {k})",
    "Highly Complex": "SELECT title, DENSE_RANK() OVER (ORDER BY year) FROM film WHERE year > {k} "
                      "EXCEPT SELECT title, 0 FROM archive",
}
TOPICS = ["films", "rentals", "actors", "stores", "payments", "customers", "staff", "inventory", "cities", "languages"]


def make_row(complexity: str, style: str, k: int, line: int) -> dict:
    topic = TOPICS[line % len(TOPICS)]
    return {"db_id": f"rental_{k % 3}", "sql_complexity": complexity, "question_style": style,
            "question": f"{style} question {k} about {topic} released after year {1990 + line}",
            "external_knowledge": "", "cot": f"Find {topic}. " * (1 + line % 4),
            "sql": SQL_BY_COMPLEXITY[complexity].format(k=k), "schema_ddl": "CREATE TABLE film (id INTEGER)",
            "line": line}


def make_rows(per_stratum: int = 3) -> list[dict]:
    rows = []
    for complexity in SQL_COMPLEXITIES:
        for style in QUESTION_STYLES:
            for k in range(per_stratum):
                rows.append(make_row(complexity, style, k, len(rows) + 1))
    return rows


PARAMS = {"pool_size": 60, "train_size": 20, "val_size": 10, "seed": 5, "search_trials": 6,
          "subset_size_range": [2000, 5000]}


def write_data(tmp_path, rows) -> dict:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**PARAMS, "data_dir": str(tmp_path), "synsql_file": "rows.jsonl", "synsql_limit": None}


def lines(rows: list[dict]) -> list[int]:
    return [r["line"] for r in rows]


# Features and scores over every level and style

def test_features_cover_all_strata():
    rows = make_rows()
    features = quality_features(rows)
    assert len(features) == 4 * 9 * 3
    assert sorted(features["complexity_level"].unique()) == [0, 1, 2, 3]
    by_level = features.groupby("complexity_level")
    assert by_level["joins"].max().tolist() == [0, 1, 0, 0]
    assert by_level["ctes"].max().tolist() == [0, 0, 1, 0]
    assert by_level["windows"].max().tolist() == [0, 0, 0, 1]
    assert by_level["set_operations"].max().tolist() == [0, 0, 0, 1]
    assert features["sql_parsed"].all()


def test_selection_covers_all_strata():
    train, val, stats = select_heuristic(make_rows(), PARAMS)
    assert len(stats["strata"]) == 36
    assert {s["sql_complexity"] for s in stats["strata"]} == set(SQL_COMPLEXITIES)
    assert {s["question_style"] for s in stats["strata"]} == set(QUESTION_STYLES)
    assert sum(s["rows"] for s in stats["strata"]) == 108
    assert sum(s["pool"] for s in stats["strata"]) == 60
    assert sum(s["train"] for s in stats["strata"]) == 20
    assert sum(s["val"] for s in stats["strata"]) == 10


def test_complexity_weights_scale_scores():
    rows = [make_row(c, "Formal", 0, i) for i, c in enumerate(SQL_COMPLEXITIES)]
    scores = np.array([0.5, 0.5, 0.5, 0.5])
    expected = [0.5 * DEFAULT_COMPLEXITY_WEIGHTS[c] for c in SQL_COMPLEXITIES]
    assert weighted_scores(rows, scores).tolist() == pytest.approx(expected)
    assert weighted_scores(rows, scores).tolist() == pytest.approx([0.5, 0.45, 0.4, 0.35])


# Bad and unusual inputs

def test_empty_input_rejected():
    with pytest.raises(T2SQLError, match="input is empty"):
        select_heuristic([], PARAMS)


def test_short_strata_give_all_rows():
    # 40 Simple / Formal rows and 1 Highly Complex / Vague row, pool 41: the quotas ask for
    # ceil(41 * 40/41 * 1.2) = 48 and ceil(41 * 1/41 * 1.2) = 2 rows, more than either stratum has.
    rows = [make_row("Simple", "Formal", k, k + 1) for k in range(40)] + [make_row("Highly Complex", "Vague", 0, 41)]
    assert sorted(stratified_pool(rows, np.zeros(41), pool_size=41, seed=0)) == list(range(41))
    _, _, stats = select_heuristic(rows, {**PARAMS, "pool_size": 41, "train_size": 10, "val_size": 5})
    assert stats["short_strata"] == ["Highly Complex / Vague", "Simple / Formal"]
    table = {s["question_style"]: s for s in stats["strata"]}
    assert (table["Formal"]["quota"], table["Formal"]["pool"]) == (40, 40)
    assert (table["Vague"]["quota"], table["Vague"]["pool"]) == (1, 1)


def test_no_short_strata_when_pool_is_small():
    _, _, stats = select_heuristic(make_rows(), PARAMS)
    assert stats["short_strata"] == []
    # Each 3-row stratum asks for ceil(60 * 3/108 * 1.2) = 2 rows, fewer than it has.
    assert {s["quota"] for s in stats["strata"]} == {2}


def test_unparsable_sql_counted_not_dropped():
    rows = make_rows(per_stratum=1)
    rows[3]["sql"] = "SELECT title FROM film WHERE ("
    rows[7]["sql"] = "SELEC nothing"
    _, _, stats = select_heuristic(rows, {**PARAMS, "pool_size": 36, "train_size": 20, "val_size": 16})
    assert stats["unparsable_sql"] == {"count": 2, "lines": [4, 8]}
    assert stats["pool"] == 36  # pool 36 of 36 rows: the unparsable rows stay selectable


def test_identical_rows_no_crash():
    rows = [{**make_row("Complex", "Formal", 0, 1), "line": i + 1} for i in range(30)]
    features = quality_features(rows)
    assert features["tfidf_nn_distance"].tolist() == [0.0] * 30
    assert score_quality(features).tolist() == [0.0] * 30
    train, val, _ = select_heuristic(rows, {**PARAMS, "pool_size": 30, "train_size": 10, "val_size": 5})
    assert len(train) == 10
    assert len(val) == 5


def test_train_val_larger_than_pool_rejected():
    with pytest.raises(T2SQLError, match="train_size \\+ val_size = 70 exceeds pool_size 60"):
        select_heuristic(make_rows(), {**PARAMS, "train_size": 60})
    # The settings fit, but the input has fewer rows than the pool needs.
    with pytest.raises(T2SQLError, match="exceeds the pool of 20 rows"):
        select_heuristic(make_rows()[:20], PARAMS)


def test_bad_settings_rejected():
    with pytest.raises(T2SQLError, match="'pool_size' must be an integer >= 1"):
        select_settings({"pool_size": "600"})
    with pytest.raises(T2SQLError, match="unknown feature 'novelty'"):
        select_heuristic(make_rows(), {**PARAMS, "quality_weights": {"novelty": 1.0}})
    with pytest.raises(T2SQLError, match="no complexity weight for 'Moderate'"):
        select_heuristic(make_rows(), {**PARAMS, "complexity_weights": {"Simple": 1.0}})


# Disjointness and seeding

def test_train_val_disjoint():
    train, val, _ = select_heuristic(make_rows(), PARAMS)
    assert len(set(lines(train))) == 20
    assert len(set(lines(val))) == 10
    assert not set(lines(train)) & set(lines(val))


def test_same_seed_same_output():
    first = select_heuristic(make_rows(), PARAMS)
    second = select_heuristic(make_rows(), PARAMS)
    assert lines(first[0]) == lines(second[0])
    assert lines(first[1]) == lines(second[1])
    assert first[2]["search"]["trials"] == second[2]["search"]["trials"]


def test_different_seed_different_output():
    first = select_heuristic(make_rows(), PARAMS)
    other = select_heuristic(make_rows(), {**PARAMS, "seed": 6})
    assert lines(first[0]) != lines(other[0])


def test_output_rows_keep_input_fields():
    rows = make_rows()
    train, val, _ = select_heuristic(rows, PARAMS)
    by_line = {r["line"]: r for r in rows}
    for row in train + val:
        assert row == by_line[row["line"]]
        assert set(row) == {*SYNSQL_FIELDS, "schema_ddl", "line"}


# Size search

def test_original_objective_matches_formula():
    # Recompute a trial the way the original project did, with pandas `duplicated`.
    rng = np.random.default_rng(0)
    scores = rng.random(300)
    strata = [(SQL_COMPLEXITIES[i % 4], QUESTION_STYLES[i % 9]) for i in range(300)]
    found = search_subset_size(scores, strata, (100, 300), objective="original", trials=5, seed=3)
    for trial in found["trials"]:
        n = trial["n"]
        subset = pd.DataFrame({"quality_score": scores, "sql_complexity": [s[0] for s in strata],
                               "question_style": [s[1] for s in strata]}).iloc[random_subset(scores, n, 3)]
        duplicates = subset.duplicated(subset=["question_style", "sql_complexity"]).sum()
        assert trial["duplicates"] == duplicates
        assert trial["objective"] == pytest.approx(-(subset["quality_score"].mean() - 0.01 * duplicates))


def test_balanced_objective_trades_quality_for_balance():
    # The 100 best rows all come from one stratum; the other 100 rows spread over nine strata.
    scores = np.concatenate([np.linspace(1.0, 0.9, 100), np.linspace(0.5, 0.4, 100)])
    strata = [("Complex", "Formal")] * 100 + [("Simple", QUESTION_STYLES[i % 9]) for i in range(100)]
    greedy = search_subset_size(scores, strata, (20, 200), objective="balanced", penalty=0.0, trials=15, seed=0)
    balanced = search_subset_size(scores, strata, (20, 200), objective="balanced", penalty=5.0, trials=15, seed=0)
    assert greedy["best_n"] == min(t["n"] for t in greedy["trials"])
    assert balanced["best_n"] == max(t["n"] for t in balanced["trials"])
    assert balanced["best_n"] > greedy["best_n"]


# Files and command line

def test_run_select_writes_outputs(tmp_path):
    rows = make_rows()
    params = write_data(tmp_path, rows)
    selection = run_select(params, tmp_path / "out")
    train = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "out" / "val.jsonl").read_text().splitlines()]
    written = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert len(train) == 20
    assert len(val) == 10
    assert lines(train) == [r["line"] for r in select_heuristic(rows, params)[0]]
    assert written["input"]["sha256"] == selection["input"]["sha256"]
    assert len(written["input"]["sha256"]) == 64
    assert written["settings"]["size_objective"] == "balanced"
    assert written["settings"]["size_penalty"] == 1.0
    assert set(written["seconds"]) >= {"read", "features", "score", "pool", "search", "split"}
    assert written["stats"]["search"]["trials"]


def test_run_select_missing_data_writes_nothing(tmp_path):
    params = {**PARAMS, "data_dir": str(tmp_path / "absent"), "synsql_file": "rows.jsonl"}
    with pytest.raises(T2SQLError, match="SynSQL file not found"):
        run_select(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(T2SQLError):
        run_select(params, tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []


@pytest.fixture
def restore_log_handlers():
    # select_main attaches a handler to pytest's captured stderr, which closes after the test.
    logger = logging.getLogger("t2sql_nb")
    before = list(logger.handlers)
    yield
    logger.handlers = before


def test_select_main_options_override_profile(tmp_path, capsys, restore_log_handlers):
    write_data(tmp_path, make_rows())
    status = select_main(["--selector", "heuristic", "--out", str(tmp_path / "out"), "--profile", "cpu",
                          "--data-dir", str(tmp_path), "--synsql-file", "rows.jsonl", "--limit", "100",
                          "--pool-size", "50", "--train-size", "15", "--val-size", "5", "--seed", "9"])
    assert status == 0
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert selection["input"]["rows"] == 100
    assert selection["settings"]["pool_size"] == 50
    assert selection["settings"]["seed"] == 9
    assert selection["profile"] == "cpu"
    assert "selected 15 train and 5 val rows" in capsys.readouterr().out


def test_select_main_error_status(tmp_path, capsys, restore_log_handlers):
    status = select_main(["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "absent")])
    assert status == 2
    assert "SynSQL file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        select_main(["--out", str(tmp_path / "out"), "--selector", "no-such-selector"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_profiles_have_valid_settings(profile):
    settings = select_settings(load_profile(profile))
    assert settings["size_objective"] == "balanced"
    assert settings["train_size"] + settings["val_size"] <= settings["pool_size"]


@pytest.mark.skipif(not SAMPLE.exists(), reason="the SynSQL sample is not in the data folder")
def test_cpu_profile_on_sample(tmp_path):
    selection = run_select({**load_profile("cpu"), "data_dir": str(default_data_dir())}, tmp_path)
    stats = selection["stats"]
    assert (stats["rows"], stats["pool"], stats["train"], stats["val"]) == (1000, 600, 200, 50)
    assert stats["search"]["size_range"] == [240, 600]
    assert stats["unparsable_sql"]["count"] == 0
    assert {s["sql_complexity"] for s in stats["strata"]} == {"Complex"}
    assert len(stats["strata"]) == 9
