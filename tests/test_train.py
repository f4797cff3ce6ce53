"""Training stage: the SFT recipe on the real Qwen tokenizer and a tiny random Qwen2, resume, Ray Train, bad input."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from t2sql_nb.core import T2SQLError, write_jsonl
from t2sql_nb.format import build_messages, format_target, prompt_text
from t2sql_nb.models import load_model, load_tokenizer, tiny_qwen2
from t2sql_nb.train import (IGNORE_INDEX, IM_END, AnswerOnlyCollator, encode_sample, encode_samples,
                            keep_mentioned_tables, model_from_ray_checkpoint, ray_scaling_config, run_train,
                            strip_column_comments, train_main, training_precision)

IM_END_ID, ENDOFTEXT_ID = 151645, 151643
SCHEMA = ('CREATE TABLE "singer" (\n  "singer_id" INTEGER /* unique id of the singer */,\n'
          '  "name" TEXT /* full name */,\n  "country" TEXT /* country of birth */,\n'
          '  "age" INTEGER /* age in years */\n);\n\n'
          'CREATE TABLE "concert" (\n  "concert_id" INTEGER /* unique id of the concert */,\n'
          '  "year" INTEGER /* year it took place */\n);')
SHORT_SCHEMA = ("CREATE TABLE singer (singer_id INTEGER, name TEXT, country TEXT, age INTEGER);\n\n"
                "CREATE TABLE concert (concert_id INTEGER, year INTEGER);")
PAIRS = [("How many singers are there?", "SELECT count(*) FROM singer"),
         ("List the names of all singers.", "SELECT name FROM singer"),
         ("Which countries do singers come from?", "SELECT DISTINCT country FROM singer"),
         ("How many concerts took place in 2014?", "SELECT count(*) FROM concert WHERE year = 2014")]


def make_sample(question: str, sql: str, schema: str = SCHEMA) -> dict:
    target = format_target(sql)
    return {"db_id": "concert_singer", "schema": schema, "question": question, "external_knowledge": "",
            "target": target, "messages": build_messages(schema, question) + [{"role": "assistant", "content": target}]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tiny_qwen2().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def format_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("format")
    samples = [make_sample(q, sql) for q, sql in PAIRS]
    write_jsonl(folder / "train_samples.jsonl", samples)
    write_jsonl(folder / "val_samples.jsonl", samples[:2])
    return folder


def tiny_params(tiny_dir: Path, **overrides) -> dict:
    params = {"model": str(tiny_dir), "train_method": "lora", "max_steps": 2, "per_device_batch_size": 2,
              "learning_rate": 1e-3, "lora_r": 4, "lora_alpha": 8, "max_seq_len": 512, "seed": 0}
    params.update(overrides)
    return params


# ---- the recipe on the real tokenizer -------------------------------------------------------------

def test_labels_mask_prompt_and_padding(tok):
    long_enc = encode_sample(tok, make_sample(*PAIRS[3])["messages"], PAIRS[3][1])
    short_enc = encode_sample(tok, make_sample(*PAIRS[0])["messages"], PAIRS[0][1])
    batch = AnswerOnlyCollator(tok.pad_token_id, tok.convert_tokens_to_ids(IM_END))([long_enc, short_enc])
    n_prompt = len(tok(prompt_text(tok, make_sample(*PAIRS[0])["messages"]), add_special_tokens=False)["input_ids"])
    n_short = len(short_enc["input_ids"])
    labels, input_ids = batch["labels"][1], batch["input_ids"][1]
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert tok.decode(labels[n_prompt:n_short]) == "SELECT count(*) FROM singer<|im_end|>"
    assert int(input_ids[n_short - 1]) == IM_END_ID
    assert int(labels[n_short - 1]) == IM_END_ID
    assert (input_ids[n_short:] == ENDOFTEXT_ID).all()
    assert (labels[n_short:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][1, n_short:] == 0).all()


def test_pad_equal_to_end_token_rejected():
    with pytest.raises(ValueError, match="never learn to stop"):
        AnswerOnlyCollator(pad_token_id=IM_END_ID, end_token_id=IM_END_ID)


def test_tokenizer_pads_with_endoftext(tok):
    assert tok.pad_token_id == ENDOFTEXT_ID
    assert tok.convert_tokens_to_ids(IM_END) == IM_END_ID


def test_trained_prompt_equals_inference_prompt(tok):
    sample = make_sample("Name the oldest singer.", "SELECT name FROM singer ORDER BY age DESC LIMIT 1")
    encoded = encode_sample(tok, sample["messages"], sample["target"])
    inference_ids = tok(prompt_text(tok, sample["messages"]), add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"][:len(inference_ids)] == inference_ids
    expected_text = prompt_text(tok, sample["messages"]) + sample["target"] + "<|im_end|>"
    assert tok.decode(encoded["input_ids"]) == expected_text


# ---- truncation: shorten the schema, never the answer ---------------------------------------------

def test_schema_shortening_helpers():
    assert "/*" not in strip_column_comments(SCHEMA)
    assert '"name" TEXT,' in strip_column_comments(SCHEMA)
    only_singer = keep_mentioned_tables(strip_column_comments(SCHEMA), "SELECT name FROM singer")
    assert "singer" in only_singer
    assert "concert" not in only_singer


@pytest.mark.parametrize("limit, action", [("full", "kept"), ("full - 1", "comments_dropped"),
                                           ("no_comments - 1", "tables_dropped")])
def test_truncation_keeps_answer(tok, limit, action):
    sample = make_sample(*PAIRS[1])
    lengths = {"full": len(encode_sample(tok, sample["messages"], sample["target"])["input_ids"]),
               "no_comments": len(encode_sample(tok, build_messages(strip_column_comments(SCHEMA), PAIRS[1][0]),
                                                sample["target"])["input_ids"])}
    max_seq_len = eval(limit, {}, lengths)
    encoded, counts = encode_samples(tok, [sample], max_seq_len)
    assert counts[action] == 1
    assert len(encoded[0]["input_ids"]) <= max_seq_len
    assert tok.decode(encoded[0]["input_ids"]).endswith("<|im_start|>assistant\nSELECT name FROM singer<|im_end|>")


def test_truncation_drops_what_cannot_fit(tok):
    encoded, counts = encode_samples(tok, [make_sample(*PAIRS[0])], 30)
    assert encoded == []
    assert counts["dropped"] == 1


def test_packing_leaks_without_flash_attention():
    # The reason training pads instead of packing: if this starts failing, packing has become safe on CPU.
    from transformers import DataCollatorWithFlattening

    model = tiny_qwen2(attn_implementation="sdpa").eval()
    first, second = list(range(1000, 1030)), list(range(2000, 2020))
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}])
    with torch.no_grad():
        alone = model(torch.tensor([second])).logits[0]
        together = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0, len(first):]
    assert not torch.allclose(alone, together, atol=1e-4)


# ---- precision --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cuda, bf16, expected", [
    (False, False, {"device": "cpu", "weights": "float32", "bf16": False, "fp16": False}),
    (True, True, {"device": "cuda", "weights": "float32", "bf16": True, "fp16": False}),
    (True, False, {"device": "cuda", "weights": "float32", "bf16": False, "fp16": True}),
])
def test_precision_table(cuda, bf16, expected):
    assert training_precision(cuda, bf16) == expected


def test_precision_on_this_machine():
    precision = training_precision()
    assert precision["weights"] == "float32"
    if not torch.cuda.is_available():
        assert precision == {"device": "cpu", "weights": "float32", "bf16": False, "fp16": False}


# ---- training runs on the tiny model ----------------------------------------------------------------

def test_lora_export_is_merged_and_loadable(tiny_dir, format_dir, tmp_path):
    summary = run_train(tiny_params(tiny_dir, max_steps=3), format_dir, tmp_path / "train")
    model_dir = tmp_path / "train" / "model"
    record = json.loads((model_dir / "t2sql_model.json").read_text())
    assert record["name"] == f"{tiny_dir.resolve()} + LoRA SFT, 3 steps"
    assert summary["model"] == record["name"]
    assert not (model_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    loaded = load_model(str(model_dir))
    assert loaded.name == record["name"]
    assert loaded.tokenizer.pad_token_id == ENDOFTEXT_ID


def test_training_json_contents(tiny_dir, format_dir, tmp_path):
    summary = run_train(tiny_params(tiny_dir), format_dir, tmp_path / "train")
    on_disk = json.loads((tmp_path / "train" / "training.json").read_text())
    assert on_disk["steps"] == 2
    assert len(on_disk["data"]["train"]["sha256"]) == 64
    assert on_disk["data"]["train"]["samples"] == 4
    assert on_disk["settings"]["train_method"] == "lora"
    assert on_disk["hardware"]["cpu_count"] >= 1
    assert on_disk["loss"]["final"] > 0
    assert on_disk["loss"]["val"] > 0
    assert on_disk["truncation"]["train"] == {"kept": 4, "comments_dropped": 0, "tables_dropped": 0, "dropped": 0}
    assert on_disk["tokens"]["train"]["supervised_tokens"] > 0
    # 2 steps of batches of 2 samples of different lengths: some padding, counted on the training batches only.
    assert on_disk["padding"]["batches"] == 2
    assert 0 < on_disk["padding"]["padding_fraction"] < 0.5
    assert summary["seconds"]["train"] > 0
    history = [json.loads(line) for line in (tmp_path / "train" / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


class SamplingWatch(TrainerCallback):
    "Record the Trainer's sampling strategy."
    def on_train_begin(self, args, state, control, **kwargs):
        self.strategy = args.train_sampling_strategy


@pytest.mark.parametrize("group_by_length, strategy", [(False, "random"), (True, "group_by_length")])
def test_group_by_length_sets_sampler(tiny_dir, format_dir, tmp_path, group_by_length, strategy):
    # transformers 5.25 sorts by length within mega-batches of min(batches // 4, 50) batches, so grouping
    # starts at 8 batches. Four samples only check that the setting reaches the Trainer.
    watch = SamplingWatch()
    run_train(tiny_params(tiny_dir, max_steps=1, group_by_length=group_by_length), format_dir, tmp_path / "train",
              callbacks=(watch,))
    assert watch.strategy == strategy


class CacheWatch(TrainerCallback):
    "Record `use_cache` of the model being trained at each step."
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(model.config.use_cache)


def test_gradient_checkpointing_turns_cache_off(tiny_dir, format_dir, tmp_path):
    watch = CacheWatch()
    run_train(tiny_params(tiny_dir, gradient_checkpointing=True), format_dir, tmp_path / "train", callbacks=(watch,))
    assert watch.seen == [False, False]
    config = json.loads((tmp_path / "train" / "model" / "config.json").read_text())
    assert config["use_cache"] is True


def test_overfit_four_samples(tiny_dir, tmp_path):
    # Settings found by trial: 64 full fine-tuning steps at lr 3e-2 bring the loss below 0.05.
    samples = [make_sample(q, sql, SHORT_SCHEMA) for q, sql in PAIRS]
    write_jsonl(tmp_path / "format" / "train_samples.jsonl", samples)
    write_jsonl(tmp_path / "format" / "val_samples.jsonl", samples[:1])
    params = tiny_params(tiny_dir, train_method="full", max_steps=64, per_device_batch_size=4, learning_rate=3e-2)
    summary = run_train(params, tmp_path / "format", tmp_path / "train")
    assert summary["loss"]["final"] < summary["loss"]["first"]
    loaded = load_model(str(tmp_path / "train" / "model"))
    for question, sql in PAIRS:
        prompt = prompt_text(loaded.tokenizer, build_messages(SHORT_SCHEMA, question))
        ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = loaded.model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=IM_END_ID,
                                        pad_token_id=ENDOFTEXT_ID)
        new_tokens = out[0, ids.shape[1]:].tolist()
        assert loaded.tokenizer.decode(new_tokens, skip_special_tokens=True) == sql
        assert new_tokens[-1] == IM_END_ID


# ---- resume -----------------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


class InterruptAfter(TrainerCallback):
    "Raise after the checkpoint of step `step` is saved, like a killed process."
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"stopped after step {self.step}")


def test_resume_ends_like_uninterrupted_run(tiny_dir, format_dir, tmp_path):
    params = tiny_params(tiny_dir, max_steps=4, save_steps=1, per_device_batch_size=1)
    reference = run_train(params, format_dir, tmp_path / "straight")

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_train(params, format_dir, out, callbacks=(InterruptAfter(2),))
    assert not (out / "model").exists()
    assert not (out / "training.json").exists()
    assert (out / "checkpoints" / "checkpoint-2").is_dir()

    resumed = run_train({**params, "resume": True}, format_dir, out)
    assert resumed["steps"] == reference["steps"] == 4
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert resumed["loss"]["final"] == pytest.approx(reference["loss"]["final"], rel=1e-3)
    assert resumed["padding"]["batches"] == 4  # the counts of the interrupted part carry over
    assert resumed["model"].endswith("LoRA SFT, 4 steps")


def test_run_without_resume_starts_over(tiny_dir, format_dir, tmp_path):
    params = tiny_params(tiny_dir, max_steps=2, save_steps=1, per_device_batch_size=1)
    with pytest.raises(Interrupt):
        run_train(params, format_dir, tmp_path / "train", callbacks=(InterruptAfter(1),))
    summary = run_train(params, format_dir, tmp_path / "train")
    history = [json.loads(line) for line in (tmp_path / "train" / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert summary["steps"] == 2


# ---- bad input: a clear T2SQLError and nothing half-written -----------------------------------------

def assert_nothing_written(out: Path):
    assert not (out / "model").exists()
    assert not (out / "training.json").exists()


def test_empty_training_file(tiny_dir, format_dir, tmp_path):
    bad = tmp_path / "format"
    bad.mkdir()
    (bad / "train_samples.jsonl").write_text("")
    (bad / "val_samples.jsonl").write_text((format_dir / "val_samples.jsonl").read_text())
    with pytest.raises(T2SQLError, match=r"train_samples.jsonl: no samples"):
        run_train(tiny_params(tiny_dir), bad, tmp_path / "train")
    assert_nothing_written(tmp_path / "train")


@pytest.mark.parametrize("change, message", [
    (lambda s: {k: v for k, v in s.items() if k != "target"}, r"train_samples.jsonl:3: missing field 'target'"),
    (lambda s: {**s, "target": "  "}, r"train_samples.jsonl:3: field 'target' must be a non-empty string"),
])
def test_sample_without_target(tiny_dir, tmp_path, change, message):
    samples = [make_sample(q, sql) for q, sql in PAIRS]
    samples[2] = change(samples[2])
    write_jsonl(tmp_path / "format" / "train_samples.jsonl", samples)
    write_jsonl(tmp_path / "format" / "val_samples.jsonl", [make_sample(*PAIRS[0])])
    with pytest.raises(T2SQLError, match=message):
        run_train(tiny_params(tiny_dir), tmp_path / "format", tmp_path / "train")
    assert_nothing_written(tmp_path / "train")


def test_missing_model_path(format_dir, tmp_path):
    with pytest.raises(T2SQLError, match="no such folder"):
        run_train({"model": str(tmp_path / "no-model")}, format_dir, tmp_path / "train")
    assert_nothing_written(tmp_path / "train")


def test_invalid_method(tiny_dir, format_dir, tmp_path):
    with pytest.raises(T2SQLError, match="use lora or full"):
        run_train(tiny_params(tiny_dir, train_method="qlora"), format_dir, tmp_path / "train")


def test_failed_export_keeps_previous_model(tiny_dir, format_dir, tmp_path, monkeypatch):
    out = tmp_path / "train"
    run_train(tiny_params(tiny_dir), format_dir, out)
    before = (out / "model" / "t2sql_model.json").read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        run_train(tiny_params(tiny_dir, max_steps=1), format_dir, out)
    assert (out / "model" / "t2sql_model.json").read_text() == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".model")] == []


# ---- command line -----------------------------------------------------------------------------------

def test_train_main_overrides(tiny_dir, format_dir, tmp_path, capsys):
    status = train_main(["--format-dir", str(format_dir), "--out", str(tmp_path / "train"), "--model", str(tiny_dir),
                         "--max-steps", "1", "--method", "full"])
    assert status == 0
    training = json.loads((tmp_path / "train" / "training.json").read_text())
    assert training["steps"] == 1
    assert training["settings"]["train_method"] == "full"
    assert training["settings"]["max_seq_len"] == 1024  # from the cpu profile
    assert '"steps": 1' in capsys.readouterr().out


def test_train_main_bad_input(tmp_path, capsys):
    status = train_main(["--format-dir", str(tmp_path), "--out", str(tmp_path / "train"), "--model", str(tmp_path / "none")])
    assert status == 2
    assert "t2sql train: error: model" in capsys.readouterr().err


# ---- Ray Train ----------------------------------------------------------------------------------------

def test_scaling_config_fits_two_cpus():
    config = ray_scaling_config(2, use_gpu=False)
    assert config.num_workers == 2
    assert config.total_resources.get("CPU") == 2


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_two_workers(local_ray, tiny_dir, format_dir, tmp_path):
    summary = run_train(tiny_params(tiny_dir, ray_workers=2, max_steps=2, per_device_batch_size=1),
                        format_dir, tmp_path / "train")
    assert summary["steps"] == 2
    assert summary["model"].endswith("LoRA SFT, 2 steps")
    assert load_model(str(tmp_path / "train" / "model")).name == summary["model"]
    assert summary["loss"]["val"] is not None


def test_ray_checkpoint_to_model_folder(local_ray, tiny_dir, format_dir, tmp_path):
    from ray.train import Checkpoint

    run_train(tiny_params(tiny_dir, ray_workers=1, max_steps=1), format_dir, tmp_path / "train")
    stored = sorted(p for p in (tmp_path / "train" / "ray" / "train").glob("checkpoint_*") if p.is_dir())
    assert stored, "Ray stored no checkpoint"
    info = model_from_ray_checkpoint(Checkpoint.from_directory(str(stored[-1])), tmp_path / "again")
    assert info["name"].endswith("LoRA SFT, 1 step")
    assert load_model(str(tmp_path / "again")).name == info["name"]
