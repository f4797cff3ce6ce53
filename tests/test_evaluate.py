"""Batched generation against model.generate, self-consistency voting, and the eval stage end to end on toy data."""
import json
import os
import sqlite3
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from conftest import run_cli  # noqa: E402
from t2sql_nb.core import default_data_dir  # noqa: E402
from t2sql_nb.data import Question, schema_from_sqlite  # noqa: E402
from t2sql_nb.evaluate import (evaluate_questions, group_results, read_schemas, run_eval,  # noqa: E402
                               schema_with_samples, summarize, vote)
from t2sql_nb.format import build_messages  # noqa: E402
from t2sql_nb.generation import (END_TOKENS, Generation, SchemaPrefixCache, generate_batch,  # noqa: E402
                                 generate_sql, split_prompt)
from t2sql_nb.models import LoadedModel, load_tokenizer, tiny_qwen2  # noqa: E402

SPIDER_DEV = default_data_dir() / "spider_dev"
needs_spider = pytest.mark.skipif(not (SPIDER_DEV / "dev.json").is_file(),
                                  reason=f"Spider dev not found at {SPIDER_DEV} (set T2SQL_DATA_DIR)")

SCHEMAS = {
    "music": "CREATE TABLE singer (singer_id INT PRIMARY KEY, name TEXT, country TEXT, age INT);\n\n"
             "CREATE TABLE concert (concert_id INT, singer_id INT REFERENCES singer (singer_id), year INT);",
    "pets": "CREATE TABLE pet (pet_id INT PRIMARY KEY, kind TEXT, weight REAL);",
}
QUESTIONS = [
    ("music", "How many singers are there?"),
    ("pets", "What is the weight of the heaviest dog?"),
    ("music", "List the name and age of every singer from France, ordered by age descending."),
    ("music", "Which year had the most concerts?"),
    ("pets", "Kinds?"),
    ("music", "Show the names of singers who performed in a concert in 2014 or later, without duplicates."),
]


@pytest.fixture(scope="module")
def tiny():
    return LoadedModel(tiny_qwen2(seed=3).eval(), load_tokenizer(), "tiny-qwen2", "")


def plain_generate(loaded, messages, max_new_tokens, stop_ids):
    "Greedy `model.generate` on one prompt alone; return its new token ids."
    tokenizer = loaded.tokenizer
    ids, _ = split_prompt(tokenizer, messages)
    x = torch.tensor([ids])
    out = loaded.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_batched_greedy_equals_generate(tiny, batch_size):
    messages = [build_messages(SCHEMAS[db], question) for db, question in QUESTIONS]
    stop_ids = {tiny.tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS}
    expected = [plain_generate(tiny, m, 10, stop_ids) for m in messages]
    generations = generate_batch(tiny, messages, 10, batch_size=batch_size)
    assert [g.token_ids for g in generations] == expected
    assert [g.finished for g in generations] == [out[-1] in stop_ids for out in expected]


@pytest.mark.parametrize("batch_size", [2, 6])
def test_batched_rows_stop_at_different_steps(tiny, batch_size):
    messages = [build_messages(SCHEMAS[db], question) for db, question in QUESTIONS]
    no_stop = [plain_generate(tiny, m, 12, set()) for m in messages]
    # Declare tokens that rows 0 and 2 produce early to be end tokens, so rows finish at different steps.
    stop_ids = {no_stop[0][2], no_stop[2][5]}
    expected = [plain_generate(tiny, m, 12, stop_ids) for m in messages]
    assert len({len(out) for out in expected}) > 1
    stop_tokens = tiny.tokenizer.convert_ids_to_tokens(sorted(stop_ids))
    generations = generate_batch(tiny, messages, 12, batch_size=batch_size, stop_tokens=stop_tokens)
    assert [g.token_ids for g in generations] == expected
    assert [len(g.token_ids) for g in generations] == [len(out) for out in expected]


def test_batched_text_equals_generate_sql(tiny):
    messages = [build_messages(SCHEMAS[db], question) for db, question in QUESTIONS[:3]]
    expected = [generate_sql(tiny, m, 8) for m in messages]
    generations = generate_batch(tiny, messages, 8)
    assert [(g.text, g.prompt_tokens, len(g.token_ids)) for g in generations] == expected


@needs_spider
def test_batched_greedy_on_spider_schemas(tiny):
    rows = json.loads((SPIDER_DEV / "dev.json").read_text())
    picked = [r for r in rows if r["db_id"] == "concert_singer"][:3] + [r for r in rows if r["db_id"] == "dog_kennels"][:2]
    schemas = {r["db_id"]: schema_from_sqlite(SPIDER_DEV / "database" / r["db_id"] / f"{r['db_id']}.sqlite")
               for r in picked}
    messages = [build_messages(schemas[r["db_id"]], r["question"]) for r in picked]
    stop_ids = {tiny.tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS}
    cache = SchemaPrefixCache(tiny)
    generations = generate_batch(tiny, messages, 6, prefix_cache=cache)
    assert [g.token_ids for g in generations] == [plain_generate(tiny, m, 6, stop_ids) for m in messages]
    assert (cache.misses, cache.hits) == (2, 0)
    assert all(g.cached_tokens > 0.8 * g.prompt_tokens for g in generations)  # the schema is most of the prompt


def test_prefix_is_slice_of_prompt(tiny):
    tokenizer = tiny.tokenizer
    for db, question in QUESTIONS:
        messages = build_messages(SCHEMAS[db], question)
        ids, shared = split_prompt(tokenizer, messages)
        assert tokenizer.decode(ids[:shared]).endswith("<|im_end|>\n")
        assert tokenizer.decode(ids[shared:]).startswith("<|im_start|>user\n" + question)


def test_prefix_cache_computes_each_schema_once(tiny):
    messages = [build_messages(SCHEMAS[db], question) for db, question in QUESTIONS]
    cache = SchemaPrefixCache(tiny)
    generate_batch(tiny, messages, 2, batch_size=2, prefix_cache=cache)
    generate_batch(tiny, messages, 2, batch_size=2, prefix_cache=cache)
    assert cache.misses == 2
    assert cache.hits == 4  # 3 batches per call (music 2, pets 1): the first of each schema misses, once
    prefix_lengths = {split_prompt(tiny.tokenizer, build_messages(s, "q"))[1] for s in SCHEMAS.values()}
    assert cache.computed_tokens == sum(prefix_lengths)


def test_sampling_reproducible_and_varied(tiny):
    messages = [build_messages(SCHEMAS["music"], QUESTIONS[0][1])] * 5
    first = generate_batch(tiny, messages, 5, temperature=1.0, seed=7)
    again = generate_batch(tiny, messages, 5, temperature=1.0, seed=7)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert len({tuple(g.token_ids) for g in first}) > 1


def test_repetition_penalty_setting_warns(tiny, caplog):
    tiny.model.generation_config.repetition_penalty = 1.1
    try:
        SchemaPrefixCache(tiny)
    finally:
        tiny.model.generation_config.repetition_penalty = 1.0
    assert "repetition_penalty=1.1" in caplog.text


# Voting on hand-made result sets: (sample results, greedy result, expected winner index).
VOTE_CASES = [
    ([[(1,)], [(2,)], [(2,)]], None, 1),                                # majority
    ([[(1,)], [(2,)]], None, 0),                                        # tie, no greedy: first group
    ([[(1,)], [(2,)]], [(2,)], 1),                                      # tie broken by the greedy result
    ([[(1,)], [(1,)], [(2,)]], [(2,)], 0),                              # greedy breaks ties only
    ([None, None, [(3,)]], [(5,)], 2),                                  # failed queries never win
    ([None, None], [(5,)], None),                                       # nothing to vote for
    ([[(1, "a"), (2, "b")], [("b", 2), ("a", 1)], [(1, "a")]], None, 0),  # row and column order ignored
    ([[(0.1 + 0.2,)], [(0.3,)], [(0.4,)]], None, 0),                    # floats within tolerance
    ([[(1,), (1,)], [(1,)], [(1,)]], None, 1),                          # duplicates count: a multiset
    ([[], [], [(1,)]], None, 0),                                        # empty results form a group
    ([[(1,)], [(1.0,)], ["1"]], None, 0),                               # 1 equals 1.0, not the text '1'
]


@pytest.mark.parametrize("rows, greedy, expected", VOTE_CASES)
def test_vote_cases(rows, greedy, expected):
    assert vote(rows, greedy) == expected


def test_group_results_skips_failures():
    assert group_results([None, [(1,)], None, [(1,)], [(2,)]]) == [[1, 3], [4]]


def build_db(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.executescript('''
        CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, bio TEXT, photo BLOB);
        INSERT INTO singer VALUES (1, 'Ann', 'France', 'Born in Lyon, she sang la la for forty years on stage', x'00'),
                                  (2, 'Bob', 'France', NULL, NULL), (3, 'Cid', 'Peru', 'line one' || char(10) || 'line two', NULL);
        CREATE TABLE "odd ""name""" ("a b" INT);
        INSERT INTO "odd ""name""" VALUES (7);
    ''')
    con.close()
    return path


def test_schema_with_samples_values(tmp_path):
    db = build_db(tmp_path / "music.sqlite")
    text = schema_with_samples(db, n_values=2)
    ddl = schema_from_sqlite(db).split("\n\n")
    assert text.split("\n")[0] == ddl[0].split("\n")[0]
    assert ddl[1] in text
    assert "-- name: 'Ann', 'Bob'" in text
    assert "-- country: 'France', 'Peru'" in text
    assert "-- bio: 'Born in Lyon, she sang la la for forty y...', 'line one line two'" in text  # cut at 40 characters
    assert "photo" not in text.split(ddl[0])[1]  # blob values are not shown
    assert "-- a b: 7" in text


def test_schema_with_samples_leaves_database_unchanged(tmp_path):
    db = build_db(tmp_path / "music.sqlite")
    before = db.read_bytes()
    read_schemas([Question(0, "music", "q", "SELECT 1", db)], "ddl+samples")
    assert db.read_bytes() == before
    assert not list(tmp_path.glob("*-journal")) and not list(tmp_path.glob("*-wal"))


class FixedAnswers:
    "Stand-in for `generate_batch`: greedy and sampled texts given per question."
    def __init__(self, greedy: dict[str, str], sampled: dict[str, list[str]]):
        self.greedy = greedy
        self.sampled = {q: list(texts) for q, texts in sampled.items()}

    def __call__(self, loaded, messages_list, max_new_tokens=200, temperature=0.0, **settings):
        texts = []
        for messages in messages_list:
            question = messages[-1]["content"]
            texts.append(self.sampled[question].pop(0) if temperature > 0 else self.greedy[question])
        return [Generation(text, [0], 5, 3, True) for text in texts]


def test_voting_in_evaluation(tmp_path):
    db = build_db(tmp_path / "music.sqlite")
    gold = "SELECT name FROM singer WHERE country = 'France'"
    questions = [Question(i, "music", f"q{i}", gold, db) for i in range(4)]
    right, wrong = "SELECT name FROM singer WHERE singer_id < 3", "SELECT name FROM singer"
    generate = FixedAnswers(
        greedy={"q0": wrong, "q1": right, "q2": wrong, "q3": "no idea"},
        sampled={"q0": [right, right, wrong],                    # the majority is right
                 "q1": [wrong, "SELECT nope", "SELECT 1 +"],     # one valid sample outvotes the right greedy answer
                 "q2": [right, wrong, "oops"],                   # a tie: the greedy answer's group wins
                 "q3": ["SELECT", "SELECT * FROM ghost", ""]})  # every sample fails: the greedy answer stays
    preds = evaluate_questions(LoadedModel(None, None, "fixed", ""), questions, generate=generate, samples=3,
                               temperature=0.5)
    assert [p["match"] for p in preds] == [False, True, False, False]
    assert [p["voted_match"] for p in preds] == [True, False, False, False]
    assert [p["voted_sql"] for p in preds] == [right, wrong, wrong, None]
    assert [p["votes"] for p in preds] == [2, 1, 1, 0]
    assert [p["failed_samples"] for p in preds] == [0, 2, 1, 3]
    assert summarize(preds)["correct"] == 1
    assert summarize(preds, "voted_match")["correct"] == 1


def build_spider(folder: Path) -> Path:
    build_db(folder / "database" / "music" / "music.sqlite")
    items = [{"db_id": "music", "question": "How many singers are there?", "query": "SELECT count(*) FROM singer"},
             {"db_id": "music", "question": "Names of French singers?",
              "query": "SELECT name FROM singer WHERE country = 'France'"},
             {"db_id": "music", "question": "Broken gold?", "query": "SELECT * FROM ghost"}]
    (folder / "dev.json").write_text(json.dumps(items))
    return folder


METRICS_KEYS = ("model", "eval_set", "n_questions", "n_scored", "correct", "ex", "by_hardness", "by_db", "no_sql",
                "pred_errors", "timeouts", "gold_failures", "decoding", "seconds_per_question", "machine", "git_commit")
PREDICTION_KEYS = ("db_id", "question", "gold", "raw_output", "pred_sql", "match", "error", "timed_out", "hardness",
                   "seconds", "voted_sql", "voted_match")


def test_run_eval_with_samples_writes_outputs(tmp_path, tiny):
    spider = build_spider(tmp_path / "spider")
    params = {"data_dir": str(tmp_path), "spider_dir": "spider", "max_new_tokens": 4, "eval_batch_size": 2,
              "eval_samples": 2, "eval_temperature": 1.0, "schema_style": "ddl+samples"}
    metrics = run_eval(params, tmp_path / "out", loaded=tiny)
    for key in METRICS_KEYS:
        assert key in metrics
    assert (metrics["n_questions"], metrics["n_scored"], metrics["gold_failures"]) == (3, 2, 1)
    assert metrics["decoding"]["samples"] == 2
    assert metrics["decoding"]["schema_style"] == "ddl+samples"
    assert set(metrics["voted"]) == {"correct", "ex", "by_hardness", "by_db"}
    assert metrics["tokens"]["new"] == 3 * 4  # random weights: no end token within 4 tokens
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["ex"] == metrics["ex"]
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3
    for key in PREDICTION_KEYS:
        assert key in preds[0]
    assert len(preds[0]["sample_sqls"]) == 2
    assert not (tmp_path / "out" / "predictions.partial.jsonl").exists()
    assert spider.is_dir()


@pytest.mark.parametrize("args, message", [
    (["--samples", "4", "--temperature", "0"], "eval_temperature above 0"),
    (["--batch-size", "0"], "eval_batch_size must be at least 1"),
    (["--samples", "-1"], "eval_samples must be 0"),
])
def test_eval_cli_rejects_bad_settings(tmp_path, args, message):
    spider = build_spider(tmp_path / "spider")
    result = run_cli("eval", "--data", spider, "--out", tmp_path / "out", "--model", "unused", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_eval_cli_rejects_unknown_schema_style(tmp_path):
    result = run_cli("eval", "--out", tmp_path / "out", "--schema-style", "json")
    assert result.returncode == 2
    assert "invalid choice: 'json'" in result.stderr
