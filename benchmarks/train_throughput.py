"""Measure training throughput of the real 0.5B model on this machine's CPU.

Reports tokens/s and achieved FLOP/s of full and LoRA fine-tuning steps at 512 tokens, as a
fraction of the CPU's float32 peak. Then it compares three ways of batching real samples side by
side: fixed padding to max_seq_len, dynamic padding, and dynamic padding with length-grouped
batches. Last, it checks whether packing without cross-sample attention works with the sdpa
attention on CPU.

Run it on an otherwise idle machine (a full run takes several minutes on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py --steps 1 --out /tmp/check.json   # smoke test

FLOP counts (stated here and written into the JSON):
- full fine-tuning: 6 x P FLOPs per token, where P counts the parameters on the matmul path (every
  weight except the input embedding table, which is a lookup): 2 P forward, 4 P backward.
- LoRA: 4 x P_frozen + 6 x P_lora FLOPs per token. Frozen weights need the forward pass and the
  gradient with respect to their inputs (2 + 2), but no gradient with respect to themselves.
- Both leave out the attention scores and values (about 12 x layers x seq_len x hidden per token),
  which are written into the JSON separately.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from t2sql_nb.core import Stopwatch, default_data_dir, git_commit, machine_info, package_versions, setup_logging, write_json
from t2sql_nb.data import SchemaSource, load_synsql
from t2sql_nb.format import format_sample
from t2sql_nb.models import load_tokenizer, resolve_model, tiny_qwen2
from t2sql_nb.train import IM_END, AnswerOnlyCollator, encode_samples, prepare_model

log = logging.getLogger("t2sql_nb.benchmarks.train_throughput")


# ---- the CPU's float32 peak ------------------------------------------------------------------------

def cpu_peak() -> dict:
    "Compute the float32 FMA peak of this CPU from /proc/cpuinfo: cores x clock x FMA units x lanes x 2."
    cores = len(os.sched_getaffinity(0))
    clock_mhz, flags = None, set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz") and clock_mhz is None:
            clock_mhz = float(line.split(":", 1)[1])
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    fma_units, lanes = 2, 8  # two 256-bit FMA pipes, 8 float32 lanes each (AVX2 + FMA)
    peak = cores * clock_mhz * 1e6 * fma_units * lanes * 2
    return {"cores": cores, "clock_mhz": clock_mhz, "fma_units": fma_units, "float32_lanes": lanes,
            "avx2": "avx2" in flags, "fma": "fma" in flags, "avx512f": "avx512f" in flags,
            "peak_flops": peak,
            "formula": f"{cores} cores x {clock_mhz / 1000:.3f} GHz x {fma_units} FMA units x {lanes} float32 lanes "
                       f"x 2 FLOP per FMA = {peak / 1e9:.1f} GFLOP/s",
            # NOTE: /proc/cpuinfo reports the base clock in most VMs, so turbo is not counted. A core with two
            # full-width 512-bit FMA pipes would double this peak; AMD Zen 4 splits 512-bit FMAs into 256-bit halves.
            "caveat": "clock from /proc/cpuinfo (base clock in a VM, turbo not counted); 256-bit FMA width assumed"}


# ---- FLOPs per token -------------------------------------------------------------------------------

def matmul_params(model) -> tuple[int, int]:
    "Count (frozen, trainable) parameters on the matmul path, leaving out the input embedding table."
    embedding = model.get_input_embeddings().weight
    frozen = trainable = 0
    for param in model.parameters():
        if param is embedding:
            continue
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return frozen, trainable

def flops_per_token(method: str, frozen: int, trainable: int) -> tuple[float, str]:
    "Return the training FLOPs per token and the formula used."
    if method == "full":
        return 6.0 * (frozen + trainable), f"6 x {frozen + trainable:,} matmul-path parameters"
    return 4.0 * frozen + 6.0 * trainable, f"4 x {frozen:,} frozen + 6 x {trainable:,} LoRA parameters"

def attention_flops_per_token(config, seq_len: int) -> float:
    "Estimate the attention score and value FLOPs per token of a training step (forward and backward)."
    # QK^T and AV are 2 matmuls of 2 x seq_len x hidden FLOPs per token and layer, and training costs 3 times
    # the forward pass. A kernel that skips the causally masked half does less, so this is an upper estimate.
    return 12.0 * config.num_hidden_layers * seq_len * config.hidden_size


# ---- timing training steps -------------------------------------------------------------------------

def time_steps(model, batches: list[dict], warmup: int) -> dict:
    "Run forward, backward and an AdamW step on each batch; return the seconds of the timed steps."
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    seconds, losses = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            seconds.append(elapsed)
            losses.append(round(loss.item(), 4))
        log.info("step %d/%d: %.1f s%s", i + 1, len(batches), elapsed, " (warm-up, not counted)" if i < warmup else "")
    return {"seconds": seconds, "losses": losses}

def fixed_length_batch(tokenizer, seq_len: int, batch_size: int, seed: int) -> dict:
    "Build a batch of random token ids, `seq_len` long, every position supervised."
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tokenizer.vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

def measure_method(model_path: str, method: str, tokenizer, args, peak: float) -> dict:
    "Time full or LoRA steps on fixed-length batches and turn them into tokens/s and FLOP/s."
    torch.manual_seed(args.seed)
    model = prepare_model(model_path, method, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    frozen, trainable = matmul_params(model)
    per_token, formula = flops_per_token(method, frozen, trainable)
    attention = attention_flops_per_token(model.config, args.seq_len)
    batches = [fixed_length_batch(tokenizer, args.seq_len, 1, args.seed + i) for i in range(args.warmup + args.steps)]
    timing = time_steps(model, batches, args.warmup)
    tokens_per_second = args.seq_len * len(timing["seconds"]) / sum(timing["seconds"])
    achieved = tokens_per_second * per_token
    del model
    return {"method": method, "seq_len": args.seq_len, "batch_size": 1, "steps_timed": len(timing["seconds"]),
            "step_seconds": [round(s, 2) for s in timing["seconds"]],
            "tokens_per_second": round(tokens_per_second, 2),
            "matmul_params": {"frozen": frozen, "trainable": trainable},
            "flops_per_token": per_token, "flops_formula": formula,
            "attention_flops_per_token_not_counted": attention,
            "achieved_flops": achieved, "achieved_gflops": round(achieved / 1e9, 2),
            "fraction_of_peak": round(achieved / peak, 4),
            "fraction_of_peak_with_attention": round(tokens_per_second * (per_token + attention) / peak, 4)}


# ---- padding side by side --------------------------------------------------------------------------

def real_samples(tokenizer, synsql_file: Path, n: int, max_seq_len: int) -> tuple[list[dict], dict]:
    "Format the first `n` SynSQL rows and fit them into `max_seq_len` as training does."
    rows = load_synsql(synsql_file, limit=n)
    schemas = SchemaSource()
    samples = [format_sample(row, schemas.schema(row)) for row in rows]
    encoded, counts = encode_samples(tokenizer, samples, max_seq_len)
    log.info("real samples: %d of %d fit into %d tokens (%s)", len(encoded), len(rows), max_seq_len, counts)
    return encoded, counts

def batch_orders(lengths: list[int], batch_size: int, seed: int) -> dict[str, list[list[int]]]:
    "Split sample indices into batches: random order, and length-grouped order (transformers' sampler)."
    from transformers.trainer_pt_utils import LengthGroupedSampler

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    grouped = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    return {"random": _full_batches(order, batch_size), "grouped": _full_batches(grouped, batch_size)}

def _full_batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]

def padded_batch(collator: AnswerOnlyCollator, features: list[dict], pad_to: int | None) -> dict:
    "Collate with dynamic padding, or pad further to `pad_to` tokens (fixed padding)."
    batch = collator(features)
    if pad_to is None or batch["input_ids"].shape[1] >= pad_to:
        return batch
    extra = pad_to - batch["input_ids"].shape[1]
    rows = batch["input_ids"].shape[0]
    return {"input_ids": torch.cat([batch["input_ids"], torch.full((rows, extra), collator.pad_token_id)], 1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.zeros((rows, extra), dtype=torch.long)], 1),
            "labels": torch.cat([batch["labels"], torch.full((rows, extra), -100)], 1)}

def padding_fraction(batches: list[list[int]], lengths: list[int], pad_to: int | None) -> float:
    "Return the share of padding positions over all batches of an epoch."
    real = padded = 0
    for batch in batches:
        width = pad_to or max(lengths[i] for i in batch)
        real += sum(lengths[i] for i in batch)
        padded += width * len(batch)
    return round(1 - real / padded, 4)

def compare_padding(model_path: str, tokenizer, encoded: list[dict], args) -> dict:
    "Measure LoRA steps under fixed padding, dynamic padding and length-grouped dynamic padding."
    lengths = [len(e["input_ids"]) for e in encoded]
    if len(lengths) < args.batch_size:
        raise SystemExit(f"only {len(lengths)} samples fit into {args.seq_len} tokens, fewer than one batch of "
                         f"{args.batch_size}; raise --samples or --seq-len")
    orders = batch_orders(lengths, args.batch_size, args.seed)
    strategies = {"fixed_padding": (orders["random"], args.seq_len),
                  "dynamic_padding": (orders["random"], None),
                  "dynamic_padding_length_grouped": (orders["grouped"], None)}
    collator = AnswerOnlyCollator(tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(IM_END))
    torch.manual_seed(args.seed)
    model = prepare_model(model_path, "lora", lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    results = {}
    for name, (batches, pad_to) in strategies.items():
        chosen = batches[:args.warmup + args.steps]
        inputs = [padded_batch(collator, [encoded[i] for i in batch], pad_to) for batch in chosen]
        timing = time_steps(model, inputs, args.warmup)
        timed = inputs[args.warmup:]
        real_tokens = sum(int(b["attention_mask"].sum()) for b in timed)
        positions = sum(b["input_ids"].numel() for b in timed)
        results[name] = {"padding_fraction_epoch": padding_fraction(batches, lengths, pad_to),
                         "padding_fraction_timed_batches": round(1 - real_tokens / positions, 4),
                         "steps_timed": len(timed), "step_seconds": [round(s, 2) for s in timing["seconds"]],
                         "real_tokens_per_second": round(real_tokens / sum(timing["seconds"]), 2)}
    del model
    return {"samples": len(encoded), "batch_size": args.batch_size, "max_seq_len": args.seq_len,
            "length_min": min(lengths), "length_max": max(lengths), "length_mean": round(sum(lengths) / len(lengths), 1),
            "strategies": results}


# ---- packing check ---------------------------------------------------------------------------------

def packing_leaks(attn_implementation: str) -> dict:
    "Check whether a flattened (packed) batch lets the second sample attend to the first."
    from transformers import DataCollatorWithFlattening

    model = tiny_qwen2(attn_implementation=attn_implementation).eval()
    first, second = list(range(1000, 1040)), list(range(2000, 2025))
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}])
    with torch.no_grad():
        alone = model(torch.tensor([second])).logits[0]
        together = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0, len(first):]
    difference = float((alone - together).abs().max())
    return {"attn_implementation": attn_implementation, "max_logit_difference": difference,
            "cross_sample_attention": difference > 1e-4}


def packing_conclusion(checks: list[dict]) -> str:
    "Summarise the packing checks in one sentence."
    leaking = [c["attn_implementation"] for c in checks if c["cross_sample_attention"]]
    if not leaking:
        return "packed samples do not attend to each other with " + ", ".join(c["attn_implementation"] for c in checks)
    return (f"packed samples attend to each other with {', '.join(leaking)} attention on this machine, because "
            "restarting position_ids does not become a block-diagonal mask without flash attention; "
            "use dynamic padding with length-grouped batches instead of packing")


# ---- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    "Run every measurement, write the JSON report and print a summary."
    parser = argparse.ArgumentParser(description="Measure training throughput of the 0.5B model on this CPU.")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/train_throughput.json"),
                        help="JSON file to write (default: reports/benchmarks/train_throughput.json)")
    parser.add_argument("--model", default="auto", help="model to measure (default: auto)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement (default: 1)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default: 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per batch in the padding comparison (default: 4)")
    parser.add_argument("--samples", type=int, default=200,
                        help="SynSQL rows to format for the padding comparison; rows that do not fit are dropped (default: 200)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16, as in the cpu profile)")
    parser.add_argument("--synsql-file", type=Path, default=None,
                        help="SynSQL JSONL file (default: synsql_sample/synsql_sample.jsonl in the data folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, batches and sample order (default: 0)")
    args = parser.parse_args(argv)

    setup_logging()
    synsql_file = args.synsql_file or default_data_dir() / "synsql_sample" / "synsql_sample.jsonl"
    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref.path)
    peak = cpu_peak()
    log.info("CPU peak: %s", peak["formula"])

    sw = Stopwatch()
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "model": ref.name, "cpu": peak, "torch_threads": torch.get_num_threads(),
              "machine": machine_info(), "packages": package_versions(), "git_commit": git_commit(),
              "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
              "note": "steps time forward, backward and AdamW in a plain loop (no Trainer), float32, one process"}

    with sw("full"):
        report["full"] = measure_method(ref.path, "full", tokenizer, args, peak["peak_flops"])
    with sw("lora"):
        report["lora"] = measure_method(ref.path, "lora", tokenizer, args, peak["peak_flops"])
    with sw("padding"):
        encoded, fit_counts = real_samples(tokenizer, synsql_file, args.samples, args.seq_len)
        report["padding"] = {"rows_read": args.samples, "fit_counts": fit_counts,
                             **compare_padding(ref.path, tokenizer, encoded, args)}
    with sw("packing_check"):
        checks = [packing_leaks("sdpa"), packing_leaks("eager")]
        report["packing"] = {"checks": checks, "conclusion": packing_conclusion(checks)}
    report["seconds"] = sw.seconds
    # Other processes slow every step, so compare the load averages with the core count before trusting a number.
    report["load_average_at_end"] = os.getloadavg()
    write_json(args.out, report)
    log.info("wrote %s", args.out)

    for method in ("full", "lora"):
        r = report[method]
        print(f"{method}: {r['tokens_per_second']} tokens/s, {r['achieved_gflops']} GFLOP/s, "
              f"{r['fraction_of_peak']:.1%} of {peak['peak_flops'] / 1e9:.0f} GFLOP/s peak")
    for name, r in report["padding"]["strategies"].items():
        print(f"{name}: padding {r['padding_fraction_epoch']:.1%} of positions, {r['real_tokens_per_second']} real tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
