"""Generation throughput of the evaluation: one question at a time against the batched engine.

The naive path is `generate_sql`: greedy `model.generate` on one prompt at a time, the way the
evaluation ran before the batched engine. The batched path is `generate_batch`: questions grouped
by database, each schema's prompt prefix computed once in a `SchemaPrefixCache`, and up to
`--batch-size` rows decoded together, refilled as rows finish (with the next database's questions
when one database runs out). Both run greedily on the same questions with the same model. They take
turns chunk by chunk, the chunks `t2sql eval` uses (consecutive databases joined until a chunk
contains at least two batches of questions), so load from other processes on a shared machine falls
on both alike.

Forward hooks time every forward pass of the model. A pass over more than one token per row is
prefill, a pass over one token per row is a decoding step. Token rates count the tokens the
model computed: padding included for prefill, one per row for each decoding step. SQL execution
is not part of this benchmark; `t2sql eval` reports the whole evaluation's seconds per question.

Run from the project root. A check on 10 questions takes a few minutes on a 2-core CPU; the
first 87 questions are two whole databases (concert_singer and pets_1), about 15 minutes:

    .venv/bin/python benchmarks/eval_throughput.py --limit 10
    .venv/bin/python benchmarks/eval_throughput.py --limit 87 --threads 1

On a CPU shared with other busy processes, one thread per process (`--threads 1`) can be several
times faster than torch's default of one per core, because parallel regions wait for threads that
the scheduler has paused. The record stores the thread count and the load average.

The full measurement covers every Spider dev question, hours on a 2-core CPU, mostly the naive path:

    .venv/bin/python benchmarks/eval_throughput.py --limit 836 --out reports/benchmarks/eval_throughput_full.json
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from t2sql_nb.core import (T2SQLError, default_data_dir, git_commit, machine_info, package_versions,  # noqa: E402
                           setup_logging, write_json)
from t2sql_nb.data import load_spider  # noqa: E402
from t2sql_nb.evaluate import question_chunks, read_schemas  # noqa: E402
from t2sql_nb.execution import extract_sql  # noqa: E402
from t2sql_nb.format import build_messages  # noqa: E402
from t2sql_nb.generation import SchemaPrefixCache, generate_batch, generate_sql  # noqa: E402
from t2sql_nb.models import load_model  # noqa: E402

log = logging.getLogger("t2sql_nb.benchmarks.eval_throughput")
GOAL_SPEEDUP = 5.0


class ForwardTimer:
    "Forward hooks that add up the seconds and computed tokens of prefill passes and decoding steps."
    def __init__(self, model):
        self.totals = {"prefill": [0.0, 0], "decode": [0.0, 0]}  # kind -> [seconds, tokens]
        self._start = 0.0
        self._kind = "decode"
        self._tokens = 0
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after)]

    def _before(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._kind = "prefill" if input_ids.shape[1] > 1 else "decode"
        self._tokens = input_ids.numel()
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        total = self.totals[self._kind]
        total[0] += time.perf_counter() - self._start
        total[1] += self._tokens

    def take(self) -> dict:
        "Return the totals since the last call and start counting again from zero."
        totals = {kind: {"seconds": seconds, "tokens": tokens} for kind, (seconds, tokens) in self.totals.items()}
        self.totals = {"prefill": [0.0, 0], "decode": [0.0, 0]}
        return totals

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def add_totals(path: dict, seconds: float, forwards: dict, new_tokens: int) -> None:
    path["seconds"] += seconds
    path["new_tokens"] += new_tokens
    for kind, total in forwards.items():
        path[f"{kind}_seconds"] += total["seconds"]
        path[f"{kind}_tokens"] += total["tokens"]


def rates(path: dict, questions: int) -> dict:
    "Add questions per second and token rates to a path's totals, rounded for the record."
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in path.items()}
    out["questions_per_s"] = round(questions / path["seconds"], 4)
    out["seconds_per_question"] = round(path["seconds"] / questions, 3)
    for kind in ("prefill", "decode"):
        seconds = path[f"{kind}_seconds"]
        out[f"{kind}_tokens_per_s"] = round(path[f"{kind}_tokens"] / seconds, 1) if seconds else None
    return out


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare one-question-at-a-time generation with the batched engine.")
    parser.add_argument("--model", default="auto", help="model folder, hub id, or the offline alias (default: auto)")
    parser.add_argument("--data", help="Spider-format folder (default: <data_dir>/spider_dev)")
    parser.add_argument("--split", default="dev", help="split file name without .json (default: dev)")
    parser.add_argument("--limit", type=int, default=10, help="the first N questions of the split (default: 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows the batched engine decodes together (default: 32)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="generation budget per question (default: 200)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's own choice)")
    parser.add_argument("--out", default="reports/benchmarks/eval_throughput.json", help="JSON file for the results")
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = Path(args.data) if args.data else default_data_dir() / "spider_dev"
    try:
        questions = load_spider(data, args.split, limit=args.limit)
        schemas = read_schemas(questions)
        chunks = question_chunks(questions, 2 * args.batch_size)
        loaded = load_model(args.model)
    except T2SQLError as e:
        print(f"eval_throughput: error: {e}", file=sys.stderr)
        return 2

    messages = [build_messages(schemas[q.db_path], q.question, q.evidence) for q in questions]
    empty = {"seconds": 0.0, "new_tokens": 0, "prefill_seconds": 0.0, "prefill_tokens": 0,
             "decode_seconds": 0.0, "decode_tokens": 0}
    naive, batched = dict(empty), dict(empty)
    naive_texts: dict[int, str] = {}
    batched_texts: dict[int, str] = {}
    # Warm up outside the timing, because the first forward passes also allocate memory and initialise kernels.
    generate_sql(loaded, messages[0], 2)
    prefix_cache = SchemaPrefixCache(loaded)
    timer = ForwardTimer(loaded.model)
    try:
        for number, chunk in enumerate(chunks, 1):
            start = time.perf_counter()
            new_tokens = 0
            for i in chunk:
                naive_texts[i], _, generated = generate_sql(loaded, messages[i], args.max_new_tokens)
                new_tokens += generated
            add_totals(naive, time.perf_counter() - start, timer.take(), new_tokens)

            start = time.perf_counter()
            generations = generate_batch(loaded, [messages[i] for i in chunk], args.max_new_tokens,
                                         batch_size=args.batch_size, prefix_cache=prefix_cache)
            batched_texts.update({i: g.text for i, g in zip(chunk, generations)})
            add_totals(batched, time.perf_counter() - start, timer.take(), sum(len(g.token_ids) for g in generations))
            databases = ", ".join(dict.fromkeys(questions[i].db_id for i in chunk))
            log.info("chunk %d/%d (%d questions of %s): naive %.1f s so far, batched %.1f s so far", number,
                     len(chunks), len(chunk), databases, naive["seconds"], batched["seconds"])
    finally:
        timer.remove()

    differences = []
    for i, q in enumerate(questions):
        if naive_texts[i] != batched_texts[i]:
            at = first_difference(naive_texts[i], batched_texts[i])
            differences.append({"qid": q.qid, "db_id": q.db_id, "first_difference_at": at,
                                "same_sql": extract_sql(naive_texts[i]) == extract_sql(batched_texts[i]),
                                "naive": naive_texts[i], "batched": batched_texts[i]})
    n = len(questions)
    record = {
        "benchmark": "eval_throughput", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "model": loaded.name, "questions": n, "databases": len({q.db_id for q in questions}),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "naive": rates(naive, n), "batched": {**rates(batched, n), "prefix_cache_misses": prefix_cache.misses,
                                              "prefix_cache_hits": prefix_cache.hits,
                                              "prefix_tokens_computed": prefix_cache.computed_tokens},
        "speedup": round(naive["seconds"] / batched["seconds"], 2), "goal_speedup": GOAL_SPEEDUP,
        "identical_outputs": n - len(differences), "differences": differences,
        "machine": machine_info(), "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        "packages": package_versions(("torch", "transformers")), "git_commit": git_commit(),
    }
    write_json(args.out, record)
    print(f"{n} questions on {record['databases']} databases, at most {args.batch_size} rows decoded together")
    for name in ("naive", "batched"):
        r = record[name]
        print(f"{name:>8}: {r['questions_per_s']:.3f} questions/s ({r['seconds_per_question']:.2f} s each), "
              f"prefill {r['prefill_tokens_per_s']} tokens/s, decode {r['decode_tokens_per_s']} tokens/s")
    print(f"speedup {record['speedup']}x (goal {GOAL_SPEEDUP}x); identical outputs {n - len(differences)}/{n}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
