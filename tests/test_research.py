"""Arithmetic, bad-input, tiny-model and file tests of the research selectors (`t2sql_nb.research`)."""
import json
import os
import re
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from t2sql_nb.core import T2SQLError
from t2sql_nb.data import QUESTION_STYLES, SQL_COMPLEXITIES
from t2sql_nb.format import build_messages
from t2sql_nb.models import load_tokenizer, tiny_qwen2
from t2sql_nb.research import (
    INSTRUCTION, RESEARCH_SELECTORS, _sentence_encoder, balanced_kmeans, candidate_pool, cluster_quotas,
    delete_words, embed_texts, estimate_unscored, fill_from_tasks, finetune_perplexities, fit_messages,
    learning_percentage, lowest_per_cluster, perplexity, perturb_instruction, predicted_loss, prompt_uncertainty,
    research_settings, run_research_select, select_research, split_selection, target_text, token_log_probs)
from t2sql_nb.select import run_select, select_settings
from t2sql_nb.train import IGNORE_INDEX, encode_sample

TOPICS = ["films", "rentals", "actors", "stores", "payments", "customers", "staff", "inventory", "cities", "languages"]
SQL = "SELECT COUNT(*) FROM {topic} WHERE year > {year}"


def make_row(complexity: str, style: str, k: int, line: int) -> dict:
    topic = TOPICS[line % len(TOPICS)]
    return {"db_id": f"rental_{k % 3}", "sql_complexity": complexity, "question_style": style,
            "question": f"{style} question {k}: how many {topic} were released after {1990 + line}?",
            "external_knowledge": "", "cot": f"Count the {topic}. " * (1 + line % 4),
            "sql": SQL.format(topic=topic, year=1990 + line),
            "schema_ddl": f"CREATE TABLE {topic} (id INTEGER, year INTEGER /* release year */)", "line": line}


def make_rows(per_stratum: int = 3) -> list[dict]:
    rows = []
    for complexity in SQL_COMPLEXITIES:
        for style in QUESTION_STYLES:
            for k in range(per_stratum):
                rows.append(make_row(complexity, style, k, len(rows) + 1))
    return rows


PARAMS = {"pool_size": 60, "train_size": 20, "val_size": 10, "seed": 5, "search_trials": 4,
          "subset_size_range": [2000, 5000], "research_subset": 6, "scorer_max_len": 128, "scorer_batch_size": 8,
          "lp_epochs": 2, "lp_batch_size": 3, "lp_min_cluster_size": 20, "uncertainty_rows_per_task": 1,
          "uncertainty_perturbations": 2}


@pytest.fixture(autouse=True)
def one_thread():
    "Run on one thread: the tiny model's matrices are too small to gain from more, and threads contend on a busy machine."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_qwen2().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(tmp_path, rows, tiny_dir, **overrides) -> dict:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**PARAMS, "data_dir": str(tmp_path), "synsql_file": "rows.jsonl", "synsql_limit": None,
            "scorer_model": str(tiny_dir), **overrides}


def read_lines(path) -> list[int]:
    return [json.loads(line)["line"] for line in path.read_text().splitlines()]


# --- LP(1) arithmetic, clusters and the per-cluster selection ---

@pytest.mark.parametrize("p0, p1, pn, expected", [
    (10.0, 4.0, 2.0, 0.75),    # 6 of the total drop of 8 happened in epoch 1
    (10.0, 9.0, 2.0, 0.125),   # learned late
    (10.0, 2.0, 2.0, 1.0),     # learned entirely in epoch 1
    (8.0, 6.0, 4.0, 0.5),
    (5.0, 4.0, 6.0, -1.0),     # ended above P0: the sign of the ratio flips
    (5.0, 6.0, 4.0, -1.0),     # rose in epoch 1, then fell below P0
])
def test_learning_percentage_values(p0, p1, pn, expected):
    assert learning_percentage([p0], [p1], [pn])[0] == pytest.approx(expected)


def test_learning_percentage_p0_equals_pn():
    lp = learning_percentage([3.0, 3.0, 3.0], [2.0, 3.0, 4.0], [3.0, 3.0, 3.0 * (1 + 1e-9)])
    assert lp.tolist() == [1.0, 1.0, 1.0]
    assert np.isfinite(lp).all()


def test_balanced_kmeans_min_cluster_size():
    rng = np.random.default_rng(1)
    sizes = (120, 90, 30, 12, 8)
    centers = rng.normal(0, 5, size=(len(sizes), 8))
    points = np.concatenate([rng.normal(c, 0.3, size=(n, 8)) for c, n in zip(centers, sizes)])
    for min_size in (20, 50, 100):
        labels = balanced_kmeans(points, min_size=min_size, seed=0)
        counts = np.bincount(labels)
        assert counts.min() >= min_size, (min_size, counts)
        assert counts.sum() == len(points)
        assert len(counts) >= 1


def test_balanced_kmeans_fewer_rows_than_minimum():
    points = np.random.default_rng(0).normal(size=(30, 4))
    assert balanced_kmeans(points, min_size=50, seed=0).tolist() == [0] * 30


@pytest.mark.parametrize("sizes, total, expected", [
    ([50, 30, 20], 10, [5, 3, 2]),
    ([5, 5, 5], 4, [2, 1, 1]),
    ([10, 1], 5, [5, 0]),      # 4.545 and 0.455: the larger remainder wins
    ([7], 7, [7]),
    ([3, 3], 0, [0, 0]),
])
def test_cluster_quotas(sizes, total, expected):
    assert cluster_quotas(sizes, total).tolist() == expected


def test_lowest_per_cluster_quotas():
    values = [0.9, 0.1, 0.5, 0.2, 0.7, 0.3, 0.8, 0.6]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    assert lowest_per_cluster(values, labels, 4).tolist() == [1, 3, 5, 7]
    assert lowest_per_cluster(values, labels, 8).tolist() == list(range(8))


# --- InstructMining and uncertainty arithmetic ---

def test_predicted_loss_hand_values():
    indicators = pd.DataFrame({"log_perplexity": [1.0, 3.0, 2.0], "knn_distance": [0.2, 0.2, 0.6]})
    # Scaled: log_perplexity [0, 1, 0.5], knn_distance [0, 0, 1].
    loss = predicted_loss(indicators, {"log_perplexity": 1.0, "knn_distance": -0.5})
    assert loss.tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_prompt_uncertainty_hand_values():
    assert prompt_uncertainty([0.5, 0.2], [[0.4, 0.7], [0.2, 0.1]]) == pytest.approx(0.1)
    assert prompt_uncertainty([0.3], [[0.3, 0.3]]) == 0.0


def test_delete_words_seeded_and_never_empty():
    text = "one two three four five six"
    assert delete_words(text, 0.5, np.random.default_rng(3)) == delete_words(text, 0.5, np.random.default_rng(3))
    outputs = {delete_words(text, 0.5, np.random.default_rng(seed)) for seed in range(30)}
    assert len(outputs) > 5
    for seed in range(30):
        kept = delete_words(text, 1.0, np.random.default_rng(seed)).split()
        assert len(kept) == 1
        assert kept[0] in text.split()
    for output in outputs:
        words = output.split()
        assert words == [w for w in text.split() if w in words]  # order kept, nothing added


def test_perturb_instruction_changes_only_instruction():
    messages = build_messages("CREATE TABLE t (a INTEGER)", "How many rows?")
    perturbed = perturb_instruction(messages, 0.5, np.random.default_rng(0))
    assert perturbed[1] == messages[1]
    assert perturbed[0]["content"].endswith(messages[0]["content"][len(INSTRUCTION):])
    assert len(perturbed[0]["content"]) < len(messages[0]["content"])
    with pytest.raises(ValueError, match="system message"):
        perturb_instruction(messages[1:], 0.5, np.random.default_rng(0))


def test_fill_from_tasks_follows_order():
    tasks = ["a", "b", "b", "c", "c", "c"]
    assert fill_from_tasks(tasks, ["c", "a", "b"], 4, seed=0).tolist() == [0, 3, 4, 5]
    partial = fill_from_tasks(tasks, ["c", "b", "a"], 4, seed=0).tolist()
    assert set(partial) >= {3, 4, 5}
    assert len(set(partial) & {1, 2}) == 1


def test_estimate_unscored_uses_nearest_scored_rows():
    points = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    values = np.array([2.0, 0.0, 4.0, 0.0])
    scored = np.array([True, False, True, False])
    assert estimate_unscored(points, values, scored, 1).tolist() == [2.0, 2.0, 4.0, 4.0]
    with pytest.raises(T2SQLError, match="Raise scorer_max_len"):
        estimate_unscored(points, values, np.zeros(4, dtype=bool), 1)


def test_split_selection_disjoint_equal_sizes():
    train, val = split_selection(list(range(50, 80)), 20, 10, seed=5)
    assert (len(train), len(val)) == (20, 10)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(range(50, 80))
    assert split_selection(list(range(50, 80)), 20, 10, seed=6) != (train, val)


# --- bad input ---

@pytest.mark.parametrize("override, message", [
    ({"lp_epochs": 1}, "'lp_epochs' must be an integer >= 2"),
    ({"research_subset": 0}, "'research_subset' must be an integer >= 1"),
    ({"scorer_max_len": 8}, "'scorer_max_len' must be an integer >= 16"),
    ({"uncertainty_perturbations": 0}, "'uncertainty_perturbations'"),
    ({"uncertainty_task_key": "style"}, "must be one of stratum, db_id"),
    ({"uncertainty_deletion_rate": 1.5}, "in (0, 1]"),
    ({"lp_learning_rate": 0}, "'lp_learning_rate' must be a number > 0"),
    ({"scorer_dtype": "int8"}, "'scorer_dtype' must be one of"),
    ({"instructmining_coefficients": {"reward": 1.0}}, "unknown indicator 'reward'"),
    ({"instructmining_coefficients": {"quality": "high"}}, "coefficient of 'quality' must be a number"),
])
def test_research_settings_reject_invalid(override, message):
    with pytest.raises(T2SQLError, match=re.escape(message)):
        research_settings(override)


def test_select_research_empty_rows():
    with pytest.raises(T2SQLError, match="the input is empty"):
        select_research([], PARAMS, "lp")


def test_select_research_fewer_rows_than_needed():
    with pytest.raises(T2SQLError, match="exceeds the pool of 12 rows"):
        select_research(make_rows()[:12], {**PARAMS, "pool_size": 40}, "instructmining")


def test_select_research_unknown_selector():
    with pytest.raises(T2SQLError, match="'random' is not available"):
        select_research(make_rows(), PARAMS, "random")


def test_run_research_select_missing_file(tmp_path):
    params = {**PARAMS, "data_dir": str(tmp_path), "synsql_file": "missing.jsonl"}
    with pytest.raises(T2SQLError, match="not found"):
        run_research_select(params, tmp_path / "out", "lp")


# --- models: the sentence encoder and the tiny Qwen2 ---

def test_minilm_loads_without_network(monkeypatch):
    def reject_connection(*args, **kwargs):
        raise OSError("network access during the MiniLM load")

    _sentence_encoder.cache_clear()
    monkeypatch.setattr(socket.socket, "connect", reject_connection)
    monkeypatch.setattr(socket, "create_connection", reject_connection)
    vectors = embed_texts(["How many films are there?", "Count the films.", "Which store has the most staff?"])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def sample_for(tok, question: str, sql: str = "SELECT COUNT(*) FROM films") -> dict:
    return encode_sample(tok, build_messages("CREATE TABLE films (id INTEGER)", question), sql)


def test_log_probs_count_only_label_tokens(tok):
    model = tiny_qwen2().eval()
    sample = sample_for(tok, "How many films are there?")
    n_labels = sum(label != IGNORE_INDEX for label in sample["labels"])
    [log_probs] = token_log_probs(model, [sample], tok.pad_token_id)
    assert len(log_probs) == n_labels
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0].float()
    targets = torch.tensor(sample["input_ids"][1:])[:, None]
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(1, targets)[:, 0][-n_labels:]
    assert log_probs == pytest.approx(expected.numpy(), abs=1e-4)


def test_log_probs_boundary_moves_with_label_mask(tok):
    model = tiny_qwen2().eval()
    sample = sample_for(tok, "How many films are there?")
    first = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
    masked = {"input_ids": sample["input_ids"], "labels": [IGNORE_INDEX] * (first + 1) + sample["labels"][first + 1:]}
    [full], [shorter] = (token_log_probs(model, [s], tok.pad_token_id) for s in (sample, masked))
    # Marking the first answer token as prompt drops its term and leaves every other term unchanged.
    assert shorter == pytest.approx(full[1:], abs=1e-5)
    assert perplexity(shorter) != pytest.approx(perplexity(full))


def test_log_probs_prompt_token_change(tok):
    model = tiny_qwen2().eval()
    sample = sample_for(tok, "How many films are there?")
    first = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
    [base] = token_log_probs(model, [sample], tok.pad_token_id)

    changed_prompt = dict(sample, input_ids=list(sample["input_ids"]))
    changed_prompt["input_ids"][first - 1] = tok.convert_tokens_to_ids("Ġfilms")  # the prompt's last token
    [after_change] = token_log_probs(model, [changed_prompt], tok.pad_token_id)
    # The changed token conditions the answer but is not scored itself: the same answer tokens count.
    assert len(after_change) == len(base)
    assert not np.allclose(after_change, base)


def test_log_probs_unchanged_by_batch_padding(tok):
    model = tiny_qwen2().eval()
    short = sample_for(tok, "How many?")
    long = sample_for(tok, "How many films were released in each year after 1990, sorted by year?",
                      "SELECT year, COUNT(*) FROM films GROUP BY year ORDER BY year")
    [alone] = token_log_probs(model, [short], tok.pad_token_id)
    batched = token_log_probs(model, [long, short], tok.pad_token_id)
    assert batched[1] == pytest.approx(alone, abs=1e-4)


def test_fit_messages_shortens_schema_not_target(tok):
    row = make_row("Simple", "Formal", 0, 1)
    schema = "\n\n".join(f"CREATE TABLE extra_{i} (id INTEGER /* key */, name TEXT)" for i in range(40))
    target = target_text(row)
    for max_len in (400, 200, 120, 100):
        messages, action = fit_messages(tok, schema, row, target, max_len)
        if messages is None:
            assert action == "too_long"
            continue
        encoded = encode_sample(tok, messages, target)
        assert len(encoded["input_ids"]) <= max_len, (max_len, action)
        assert tok.decode([t for t in encoded["labels"] if t != IGNORE_INDEX]) == target + "<|im_end|>"


def test_finetune_lowers_perplexity_and_keeps_p0(tok):
    rows = make_rows(1)[:4]
    samples = [encode_sample(tok, build_messages(r["schema_ddl"], r["question"]), target_text(r)) for r in rows]
    settings = {**research_settings({"lp_epochs": 3, "lp_batch_size": 2, "lp_learning_rate": 1e-2}), "lora_r": 4}
    model = tiny_qwen2().eval()
    [before] = [perplexity(lp) for lp in token_log_probs(model, samples[:1], tok.pad_token_id)]
    result = finetune_perplexities(model, samples, tok.pad_token_id, settings, seed=0)
    assert result["p0"][0] == pytest.approx(before, rel=1e-4)
    [after] = [perplexity(lp) for lp in token_log_probs(model, samples[:1], tok.pad_token_id)]
    assert after == pytest.approx(before, rel=1e-4)  # the adapters were removed
    assert (result["pn"] < result["p0"]).all()
    assert len(result["epoch_loss"]) == 3
    assert result["epoch_loss"][-1] < result["epoch_loss"][0]


# --- writing a selection ---

@pytest.mark.parametrize("selector", RESEARCH_SELECTORS)
def test_run_research_select_writes_selection(tmp_path, tiny_dir, selector):
    rows = make_rows()
    params = write_data(tmp_path, rows, tiny_dir)
    selection = run_research_select(params, tmp_path / "out", selector)
    out = tmp_path / "out"

    train, val = read_lines(out / "train.jsonl"), read_lines(out / "val.jsonl")
    assert (len(train), len(val)) == (20, 10)
    assert not set(train) & set(val)
    settings = select_settings(params)
    pool, _, _ = candidate_pool(rows, settings)
    pool_lines = {rows[i]["line"] for i in pool}
    assert set(train) | set(val) <= pool_lines

    scores = [json.loads(line) for line in (out / "pool_scores.jsonl").read_text().splitlines()]
    assert {s["line"] for s in scores} == pool_lines
    assert sorted(s["line"] for s in scores if s["selected"] == "train") == sorted(train)

    assert selection["selector"] == selector
    assert selection["stats"]["scorer"]["model"] == str(tiny_dir)
    assert selection["stats"]["cpu_seconds"] > 0
    assert json.loads((out / "selection.json").read_text())["settings"]["research_subset"] == 6
    method = selection["stats"]["method"]
    if selector == "lp":
        assert method["rows"]["scored"] == 6
        assert min(method["clusters"]["sizes"]) >= 20
    if selector == "instructmining":
        assert "reward model score" in method["unavailable_indicators"]
        assert sum(s["scored"] for s in scores) == 6
    if selector == "uncertainty":
        table = method["task_table"]
        known = [t["uncertainty"] for t in table if t["uncertainty"] is not None]
        assert known == sorted(known, reverse=True)
        selected = [t["selected_rows"] for t in table]
        # Whole tasks in order of uncertainty: once a task gives fewer rows than it has, none follow.
        first_partial = next(i for i, t in enumerate(table) if t["selected_rows"] < t["pool_rows"])
        assert all(n == 0 for n in selected[first_partial + 1:])


def test_research_sizes_equal_heuristic(tmp_path, tiny_dir):
    params = write_data(tmp_path, make_rows(), tiny_dir)
    run_select({**params, "selector": "heuristic"}, tmp_path / "heuristic")
    run_research_select(params, tmp_path / "instructmining", "instructmining")
    pool_lines = {json.loads(line)["line"] for line in
                  (tmp_path / "instructmining" / "pool_scores.jsonl").read_text().splitlines()}
    for split in ("train", "val"):
        heuristic = read_lines(tmp_path / "heuristic" / f"{split}.jsonl")
        research = read_lines(tmp_path / "instructmining" / f"{split}.jsonl")
        assert len(heuristic) == len(research)
        assert set(heuristic) <= pool_lines  # both selectors draw from one pool


def test_run_research_select_is_reproducible(tmp_path, tiny_dir):
    params = write_data(tmp_path, make_rows(), tiny_dir)
    run_research_select(params, tmp_path / "a", "uncertainty")
    run_research_select(params, tmp_path / "b", "uncertainty")
    assert read_lines(tmp_path / "a" / "train.jsonl") == read_lines(tmp_path / "b" / "train.jsonl")
