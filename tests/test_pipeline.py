"""The main job end to end on real data with a tiny model: papermill stages, outputs, skip on rerun."""
import json

import pytest
import yaml

from conftest import run_cli
from t2sql_nb.models import load_tokenizer, tiny_qwen2

STAGES = ["data", "select", "format", "train", "evaluate", "summary"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = root / "tiny-model"
    tiny_qwen2().save_pretrained(model_dir)
    load_tokenizer().save_pretrained(model_dir)
    profile = {"base": "cpu", "model": str(model_dir), "data_dir": str(data_dir), "stages": STAGES,
               "pool_size": 60, "train_size": 16, "val_size": 4, "search_trials": 3, "search_time_s": 5,
               "max_steps": 2, "max_seq_len": 512, "val_loss_samples": 2, "eval_limit": 3, "max_new_tokens": 16}
    profile_path = root / "tiny.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    run_dir = root / "run"
    first = run_cli("report", "--profile", profile_path, "--out", run_dir, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    return profile_path, run_dir, first


def test_run_writes_report_and_metrics(tiny_run):
    _, run_dir, _ = tiny_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["evaluation"]) == {"base", "finetuned"}
    for role in ("base", "finetuned"):
        assert metrics["evaluation"][role]["n_questions"] == 3
    assert metrics["evaluation"]["finetuned"]["model"].endswith("LoRA SFT, 2 steps")
    assert set(metrics["stage_seconds"]) == set(STAGES)
    assert metrics["settings"]["max_steps"] == 2
    html = (run_dir / "report.html").read_text()
    assert "Execution accuracy" in html
    for stage_notebook in ("01_data", "03_select", "04_format", "05_train", "07_evaluate", "12_summary"):
        assert (run_dir / "notebooks" / f"{stage_notebook}.ipynb").is_file(), stage_notebook


def test_predictions_one_line_per_question(tiny_run):
    _, run_dir, _ = tiny_run
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for field in ("db_id", "question", "gold", "raw_output", "pred_sql", "match", "model", "model_role"):
        assert all(field in p for p in lines), field


def test_selection_is_disjoint(tiny_run):
    _, run_dir, _ = tiny_run
    train = [json.loads(line) for line in (run_dir / "select" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (run_dir / "select" / "val.jsonl").read_text().splitlines()]
    assert (len(train), len(val)) == (16, 4)
    assert not {r["line"] for r in train} & {r["line"] for r in val}


def test_rerun_skips_unchanged_stages(tiny_run):
    profile_path, run_dir, _ = tiny_run
    again = run_cli("report", "--profile", profile_path, "--out", run_dir, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [line for line in again.stderr.splitlines() if "inputs unchanged, skipped" in line]
    assert len(skipped) == len(STAGES) - 1  # the summary always reruns, the other stages are skipped
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["stages_skipped"]) == set(STAGES) - {"summary"}


def test_false_flag_stays_boolean(tiny_run):
    _, run_dir, _ = tiny_run
    executed = json.loads((run_dir / "notebooks" / "04_format.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected, "papermill injected no parameters"
    assert "use_cot = False" in "".join(injected[0]["source"])
