#!/usr/bin/env python3
"""Set up the environment and run the project's two entry points.

    python3 tasks.py report   # the main job under the cpu profile -> reports/latest/
    python3 tasks.py test     # export check, notebook tests, pytest

Both create or refresh the virtual environment `.venv` first, using only the standard library,
so they work on a machine with nothing but Python 3.11.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("T2SQL_VENV", ROOT / ".venv"))
BIN = VENV / "bin"
STAMP = VENV / ".t2sql-installed"
INSTALL_INPUTS = ("settings.ini", "setup.py", "constraints.txt")


def run(*cmd: str | Path, env: dict | None = None) -> None:
    "Run a command from the project root, echoing it, and stop on failure."
    print("+", " ".join(map(str, cmd)), flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(result.returncode)


def install_fingerprint() -> str:
    "Hash the files that decide what gets installed."
    h = hashlib.sha256()
    for name in INSTALL_INPUTS:
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def ensure_venv() -> None:
    "Create `.venv` and install the package with its pinned dependencies, unless already current."
    fingerprint = install_fingerprint()
    if STAMP.is_file() and STAMP.read_text().strip() == fingerprint:
        return
    if not (BIN / "python").exists():
        print(f"creating the virtual environment {VENV}", flush=True)
        try:
            venv.create(VENV, with_pip=True)
        except (subprocess.CalledProcessError, OSError) as e:
            shutil.rmtree(VENV, ignore_errors=True)
            sys.exit(f"error: cannot create {VENV} ({e}); on Debian install python3-venv first")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "-c", "constraints.txt", "-e", ".[dev]")
    STAMP.write_text(fingerprint + "\n")


BROWSER = Path("/usr/bin/chromium")
SYSTEM_PACKAGES = ("chromium", "fonts-wqy-microhei")  # the demo's browser, and a font for its Chinese labels


def ensure_browser() -> None:
    "Install Chromium and a CJK font with apt-get when Chromium is missing (the demo stage and its test drive it)."
    if BROWSER.exists():
        return
    apt = shutil.which("apt-get")
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        prefix = None
    if apt is None or prefix is None:
        sys.exit(f"error: Chromium not found at {BROWSER}; install the packages {' '.join(SYSTEM_PACKAGES)} "
                 "(or your system's Chromium and a Chinese font), then run this command again")
    print(f"installing {', '.join(SYSTEM_PACKAGES)} with apt-get (Chromium not found at {BROWSER})", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(*prefix, apt, "update", "-qq", env=env)
    run(*prefix, apt, "install", "-y", "-qq", *SYSTEM_PACKAGES, env=env)


def check_export() -> None:
    "Fail when the committed package or README differs from a fresh export of the notebooks."
    run(BIN / "nbdev_export")
    render_readme()
    changed = subprocess.run(["git", "status", "--porcelain", "--", "t2sql_nb", "README.md"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    if changed.strip():
        print("t2sql_nb/ or README.md differs from a fresh export of nbs/ (run `python3 tasks.py export`):")
        print(changed)
        sys.exit(1)


def render_readme() -> None:
    "Write README.md from nbs/index.ipynb (markdown cells and code cells with their outputs)."
    run(BIN / "jupyter", "nbconvert", "--to", "markdown", "--log-level", "WARN",
        "--output-dir", ROOT, "--output", "README", ROOT / "nbs" / "index.ipynb")


def test_env() -> dict:
    "Environment for tests: no hub access, quiet tokenizers."
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def warn_missing_data() -> None:
    "Say up front when the data folder is missing, because the tests that read it are then skipped."
    data = Path(os.environ.get("T2SQL_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not data.is_dir():
        print(f"note: data folder {data} not found, so the tests that use the real SynSQL and Spider data "
              "will be skipped; set T2SQL_DATA_DIR to the data folder to run them", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["report", "test", "export", "venv"],
                        help="report: main job; test: all tests; export: notebooks -> package and README; venv: install only")
    parser.add_argument("--profile", default="cpu", help="profile for `report` (default: cpu)")
    parser.add_argument("--out", default="reports/latest", help="run folder for `report` (default: reports/latest)")
    args = parser.parse_args()
    ensure_venv()
    if args.task in ("report", "test"):
        ensure_browser()
    if args.task == "report":
        run(BIN / "t2sql", "report", "--profile", args.profile, "--out", args.out)
    elif args.task == "export":
        run(BIN / "nbdev_export")
        run(BIN / "nbdev_clean")
        render_readme()
    elif args.task == "test":
        check_export()
        warn_missing_data()
        env = test_env()
        run(BIN / "nbdev_test", "--n_workers", "2", "--timing", env=env)
        run(BIN / "python", "-m", "pytest", "-q", "-rs", "tests", env=env)


if __name__ == "__main__":
    main()
