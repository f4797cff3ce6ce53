"""Latency of the demo with a real model: from Submit to the first SQL token, to the result table, to the end.

The app runs in this process on 127.0.0.1 and is driven through gradio_client, so the times include
Gradio's queue and streaming, as a user sees them. The questions are the first N Spider dev
questions of each database. The first question on a database computes the KV cache of the schema's
prompt prefix ("cold"). The next ones copy that cache ("warm"), so only their own tokens are prefilled.

Run from the project root (minutes on a 2-core CPU, mostly generation):

    .venv/bin/python benchmarks/demo_latency.py --databases concert_singer,student_transcripts_tracking \\
        --questions 5 --out reports/benchmarks/demo_latency.json
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from t2sql_nb.core import (T2SQLError, default_data_dir, git_commit, machine_info, package_versions,  # noqa: E402
                           setup_logging, write_json)
from t2sql_nb.data import load_spider, schema_from_sqlite  # noqa: E402
from t2sql_nb.demo import (EXPLAINING, SQL_MAX_NEW_TOKENS, StreamingGenerator, build_app,  # noqa: E402
                           free_port, launch_app, sql_messages)
from t2sql_nb.models import OFFLINE_ALIAS, load_model  # noqa: E402

log = logging.getLogger("t2sql_nb.benchmarks.demo_latency")
GOAL_FIRST_TOKEN_S = 1.5


def time_question(client, question: str) -> dict:
    "Submit one question and time the first SQL token, the result (or its failure) and the end of the answer."
    start = time.perf_counter()
    first_token = result = None
    job = client.submit(question, "en", api_name="/answer")
    for _chat, sql, _table, _note, status, _box in job:
        now = time.perf_counter() - start
        if first_token is None and sql:
            first_token = now
        if result is None and (status.startswith(EXPLAINING) or status.startswith("Finished")):
            result = now
    total = time.perf_counter() - start
    _chat, sql, table, note, status, _box = job.result()
    return {"first_token_s": _round(first_token), "result_s": _round(result), "total_s": _round(total),
            "status": status, "sql": sql, "result_rows": len(table["data"]) if table else 0}


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def summarize(rows: list[dict]) -> dict:
    "Give the median and maximum times of cold and warm questions, and how many warm ones met the goal."
    summary = {"goal_first_token_s": GOAL_FIRST_TOKEN_S}
    for kind in ("cold", "warm"):
        group = [r for r in rows if r["prefix_cache"] == kind]
        for key in ("first_token_s", "result_s", "total_s"):
            values = [r[key] for r in group if r[key] is not None]
            summary[f"{kind}_{key}"] = ({"n": len(values), "median": round(statistics.median(values), 3),
                                         "max": round(max(values), 3)} if values else None)
    warm = [r for r in rows if r["prefix_cache"] == "warm" and r["first_token_s"] is not None]
    summary["warm_within_goal"] = f"{sum(r['first_token_s'] <= GOAL_FIRST_TOKEN_S for r in warm)}/{len(warm)}"
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=OFFLINE_ALIAS, help=f"model setting (default: {OFFLINE_ALIAS})")
    parser.add_argument("--databases", default="concert_singer,student_transcripts_tracking",
                        help="comma-separated Spider dev db_ids (default: a mid-size and the largest schema)")
    parser.add_argument("--questions", type=int, default=5, help="questions per database (default: 5)")
    parser.add_argument("--explanation-tokens", type=int, default=64,
                        help="maximum tokens of each explanation (default: 64; the app's default is 256)")
    parser.add_argument("--data-dir", help="data folder holding spider_dev (default: the project's data folder)")
    parser.add_argument("--out", default="reports/benchmarks/demo_latency.json", help="output JSON file")
    args = parser.parse_args(argv)
    setup_logging()
    if args.questions < 1:
        raise T2SQLError(f"--questions must be at least 1, got {args.questions}")

    spider = Path(args.data_dir or default_data_dir()) / "spider_dev"
    db_ids = [name.strip() for name in args.databases.split(",") if name.strip()]
    questions = load_spider(spider)
    chosen = {db_id: [q for q in questions if q.db_id == db_id][:args.questions] for db_id in db_ids}
    missing = [db_id for db_id, qs in chosen.items() if not qs]
    if missing:
        raise T2SQLError(f"no Spider dev questions for {', '.join(missing)} in {spider}")

    from gradio_client import Client

    load_start = time.perf_counter()
    loaded = load_model(args.model)
    load_seconds = time.perf_counter() - load_start
    generator = StreamingGenerator(loaded)
    app = build_app(loaded, spider / "database", generate_fn=generator,
                    explanation_max_new_tokens=args.explanation_tokens)
    url = launch_app(app, port=free_port(), block=False)
    rows = []
    try:
        for db_id, qs in chosen.items():
            client = Client(url, verbose=False, analytics_enabled=False)
            client.predict(db_id, api_name="/select_database")
            schema = schema_from_sqlite(qs[0].db_path)
            for q in qs:
                prompt, prefix = generator.prompt_ids(sql_messages(schema, q.question))
                misses = generator.prefix_misses
                timing = time_question(client, q.question)
                client.predict(api_name="/clear")  # each question alone, as the first of a chat
                rows.append({"db_id": db_id, "question": q.question, "gold": q.gold,
                             "prompt_tokens": len(prompt), "prefix_tokens": prefix,
                             "prefix_cache": "cold" if generator.prefix_misses > misses else "warm", **timing})
                log.info("%s: first token %.2f s, result %s s, total %.1f s (%s prefix)", db_id,
                         timing["first_token_s"] or -1, timing["result_s"], timing["total_s"], rows[-1]["prefix_cache"])
    finally:
        app.close()

    record = {"model": loaded.name, "load_seconds": round(load_seconds, 1), "machine": machine_info(),
              "commit": git_commit(), "packages": package_versions(("torch", "transformers", "gradio", "gradio_client")),
              "settings": {"databases": db_ids, "questions_per_database": args.questions,
                           "sql_max_new_tokens": SQL_MAX_NEW_TOKENS,
                           "explanation_max_new_tokens": args.explanation_tokens, "concurrency_limit": 1},
              "summary": summarize(rows), "questions": rows}
    write_json(args.out, record)
    print(f"wrote {args.out}: {record['summary']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except T2SQLError as e:
        print(f"demo_latency: error: {e}", file=sys.stderr)
        sys.exit(2)
