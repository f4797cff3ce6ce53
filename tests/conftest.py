"""Shared pytest setup: no network, the real data folder, and the `t2sql` command of this environment."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from t2sql_nb.core import default_data_dir  # noqa: E402

DATA_DIR = default_data_dir()
T2SQL = Path(sys.executable).parent / "t2sql"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    "The real data folder; tests that need it are skipped with a reason when it is absent."
    if not (DATA_DIR / "spider_dev" / "dev.json").is_file():
        pytest.skip(f"real data not found in {DATA_DIR} (set T2SQL_DATA_DIR)")
    return DATA_DIR


def run_cli(*args: str, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    "Run the installed `t2sql` command and capture its output."
    return subprocess.run([str(T2SQL), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=timeout)
