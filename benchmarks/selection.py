"""Benchmark the heuristic selector on synthetic SynSQL-shaped files of growing size.

    .venv/bin/python benchmarks/selection.py --sizes 20000 200000
    .venv/bin/python benchmarks/selection.py --sizes 2544390          # adds its entry to the same JSON

For each size the script builds a synthetic file with `t2sql_nb.synthetic.make_synthetic` (kept in
the cache folder and reused), then runs `t2sql_nb.select.select_file` in a child process, so that
each size's peak memory is its own. It prints and records rows per second, wall seconds per step and
peak resident memory: the child's own peak and the largest peak of its feature worker processes
(`resource.getrusage`, Linux reports kilobytes). At 20,000 rows it also measures the recall of the
neighbour search against brute force and the agreement of the tokenizer-level construct counts with
full parsing, on the synthetic rows and on the real rows of the data folder.

Results go to `--out` (default `reports/benchmarks/selection.json`); entries of other sizes already
in that file are kept, so sizes can be run at different times.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUALITY_ROWS = 20_000


def synthetic_file(rows: int, seed: int, cache: Path) -> tuple[Path, dict]:
    "Return a synthetic file of `rows` rows and its summary, building it unless the cache has it."
    from t2sql_nb.core import default_data_dir, write_json
    from t2sql_nb.data import load_synsql
    from t2sql_nb.synthetic import make_synthetic, spider_source_rows

    path = cache / f"synsql_{rows}_seed{seed}.jsonl"
    summary_path = path.with_suffix(".summary.json")
    if path.is_file() and summary_path.is_file():
        return path, json.loads(summary_path.read_text())
    data = default_data_dir()
    sources = load_synsql(data / "synsql_sample" / "synsql_sample.jsonl")
    spider = data / "spider_train" / "train_spider.json"
    if spider.is_file():
        sources += spider_source_rows(spider)
    start = time.perf_counter()
    summary = make_synthetic(sources, rows, seed, path)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json(summary_path, summary)
    return path, summary


def run_one(path: Path, workers: int) -> dict:
    "Select from one file in this process and return its timings and peak memory."
    from t2sql_nb.core import setup_logging
    from t2sql_nb.select import select_file

    setup_logging()
    start = time.perf_counter()
    _, _, stats = select_file(path, {"feature_workers": workers})
    seconds = time.perf_counter() - start
    kib = 1024  # ru_maxrss is in kilobytes on Linux
    return {"rows": stats["rows"], "seconds": round(seconds, 1), "rows_per_s": round(stats["rows"] / seconds),
            "steps": stats["seconds"], "sql_parsed_in_full": stats["sql_parsed_in_full"],
            "unparsable_sql": stats["unparsable_sql"]["count"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib),
            "peak_worker_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib)}


def timed_in_child(path: Path, workers: int) -> dict:
    "Run `run_one` in a fresh Python process, so its peak memory is its own."
    done = subprocess.run([sys.executable, __file__, "--run-one", str(path), "--workers", str(workers)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"selection on {path} failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_query_ms(function, sqls: list[str]) -> float:
    start = time.perf_counter()
    for sql in sqls:
        function(sql)
    return round((time.perf_counter() - start) / len(sqls) * 1000, 3)


def quality(rows: list[dict]) -> dict:
    "Measure neighbour recall against brute force and construct agreement against full parsing on `rows`."
    from t2sql_nb.select import (construct_agreement, construct_counts, nearest_question_distance,
                                 neighbour_recall, sql_constructs, tfidf_nn_distance)

    questions = [row["question"] for row in rows]
    databases = [row["db_id"] for row in rows]
    start = time.perf_counter()
    exact = tfidf_nn_distance(questions)
    brute_seconds = time.perf_counter() - start
    start = time.perf_counter()
    found = nearest_question_distance(questions, databases)
    search_seconds = time.perf_counter() - start
    databases_only = nearest_question_distance(questions, databases, rows_per_cluster=1, probes=1, rare_df=0)
    sqls = [row["sql"] for row in rows]
    timing = sqls[:2000]
    return {
        "rows": len(rows),
        "neighbour_recall": {
            "definition": "share of rows whose distance equals the brute-force distance within 1e-6",
            "recall": round(neighbour_recall(found, exact), 4),
            "recall_databases_only": round(neighbour_recall(databases_only, exact), 4),
            "search_seconds": round(search_seconds, 1), "brute_force_seconds": round(brute_seconds, 1)},
        "construct_agreement": construct_agreement(sqls),
        "ms_per_query": {"tokens_first": per_query_ms(construct_counts, timing),
                         "full_parse": per_query_ms(sql_constructs, timing)},
    }


def real_rows() -> list[dict]:
    "Return the real rows of the data folder with question, SQL and database: SynSQL sample and Spider train."
    from t2sql_nb.core import default_data_dir
    from t2sql_nb.data import load_synsql
    from t2sql_nb.synthetic import spider_source_rows

    data = default_data_dir()
    rows = load_synsql(data / "synsql_sample" / "synsql_sample.jsonl")
    spider = data / "spider_train" / "train_spider.json"
    return rows + (spider_source_rows(spider) if spider.is_file() else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000],
                        help="row counts to time, each at least the default pool_size (5000)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "selection.json",
                        help="JSON file to write (entries of other sizes in it are kept)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="folder for the synthetic files (default: the t2sql_nb cache folder / synthetic)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="feature worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic files")
    parser.add_argument("--run-one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_one:
        print(json.dumps(run_one(args.run_one, args.workers)))
        return 0

    from t2sql_nb.core import cache_dir, git_commit, machine_info, package_versions, write_json

    command = "benchmarks/selection.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cache = args.cache_dir or cache_dir() / "synthetic"
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entries = {entry["rows"]: entry for entry in report.get("sizes", [])}
    for rows in args.sizes:
        path, summary = synthetic_file(rows, args.seed, cache)
        print(f"{rows} rows: {path} ({summary['bytes'] / 2**20:.0f} MiB)", flush=True)
        load_before = os.getloadavg()[0]
        entry = {**timed_in_child(path, args.workers), "file_mib": round(summary["bytes"] / 2**20),
                 "synthetic": summary, "workers": args.workers, "command": command,
                 # Other users' processes share the CPUs: the 1-minute load average before and after.
                 "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        entries[rows] = entry
        print(f"{rows} rows: {entry['seconds']} s, {entry['rows_per_s']} rows/s, peak RSS {entry['peak_rss_mib']} MiB "
              f"(largest worker {entry['peak_worker_rss_mib']} MiB), load average {entry['load_average']}; "
              f"steps {entry['steps']}", flush=True)
        if rows == QUALITY_ROWS:
            from t2sql_nb.data import load_synsql
            report["quality_synthetic"] = quality(load_synsql(path))
            report["quality_real"] = quality(real_rows())
            print("quality:", json.dumps({k: report[k]["neighbour_recall"]["recall"]
                                          for k in ("quality_synthetic", "quality_real")}), flush=True)

    report.update({
        "command": command,
        "sizes": [entries[rows] for rows in sorted(entries)],
        "git_commit": git_commit(), "machine": machine_info(),
        "packages": package_versions(("numpy", "pandas", "scipy", "scikit-learn", "sqlglot")),
    })
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
