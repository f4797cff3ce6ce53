"""The demo app served on 127.0.0.1 and driven through `gradio_client`, as a user's program would drive it."""
import os
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx  # noqa: E402
import pytest  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from t2sql_nb.demo import NO_SQL, build_app, free_port, launch_app  # noqa: E402
from t2sql_nb.format import SYSTEM_TEMPLATE  # noqa: E402
from t2sql_nb.models import LoadedModel, load_model, load_tokenizer, tiny_qwen2  # noqa: E402

from conftest import T2SQL, run_cli  # noqa: E402

SQL_PROMPT_START = SYSTEM_TEMPLATE.split("{schema}")[0]
EXPLANATION = "1. Read the singer table.\n2. Keep the French singers."


class ScriptedModel:
    "Stand-in generator: streams the SQL scripted for each question, and a fixed explanation."
    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.prompts: list[list[dict]] = []
        self.lock = threading.Lock()

    def __call__(self, messages, max_new_tokens, temperature=0.0):
        with self.lock:
            self.prompts.append(messages)
        if not messages[0]["content"].startswith(SQL_PROMPT_START):
            yield from EXPLANATION
            return
        reply = self.answers[messages[-1]["content"]]
        if isinstance(reply, Exception):
            yield "SELECT name"
            raise reply
        for i in range(0, len(reply), 4):
            yield reply[i:i + 4]


ANSWERS = {
    "Which singers are from France?": "```sql\nSELECT name FROM singer WHERE country = 'France' ORDER BY name\n```",
    "How many of them are there?": "SELECT count(*) FROM singer WHERE country = 'France'",
    "Show the hometown of each singer.": "SELECT hometown FROM singer",
    "Pair every two singers.": "SELECT s1.name, s2.name FROM singer s1, singer s2",
    "What breaks the model?": RuntimeError("CUDA out of memory (simulated)"),
    "How many albums are there?": "SELECT count(*) FROM album",
}


def make_db(path: Path, singers: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE singer (singer_id INT PRIMARY KEY, name TEXT, country TEXT)")
    rows = [(1, "Joe", "France"), (2, "Tribal", "Netherlands"), (3, "Rose", "France")]
    rows += [(i, f"Singer {i}", "Chile") for i in range(4, singers + 1)]
    con.executemany("INSERT INTO singer VALUES (?, ?, ?)", rows)
    con.commit()
    con.close()
    return path


@pytest.fixture(scope="module")
def db_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("databases")
    make_db(folder / "music" / "music.sqlite")
    make_db(folder / "big" / "big.sqlite", singers=300)
    return folder


@pytest.fixture(scope="module")
def scripted():
    return ScriptedModel(ANSWERS)


@pytest.fixture(scope="module")
def url(db_folder, scripted):
    app = build_app(LoadedModel(None, None, "scripted stand-in", ""), db_folder, generate_fn=scripted,
                    default_db="music")
    url = launch_app(app, port=free_port(), block=False)
    yield url
    app.close()


@pytest.fixture
def client(url) -> Client:
    "A new client is a new browser session: its own database choice and history."
    return Client(url, verbose=False, analytics_enabled=False)


def ask(client: Client, question: str, language: str = "en") -> tuple[list, dict]:
    "Submit a question; return every streamed output and the final one as a dict."
    job = client.submit(question, language, api_name="/answer")
    outputs = list(job)
    chat, sql, table, note, status, _ = job.result()
    return outputs, {"chat": chat, "sql": sql, "table": table, "note": note, "status": status}


def texts(chat: list[dict]) -> list[str]:
    return ["".join(part["text"] for part in message["content"] if part.get("type") == "text") for message in chat]


def test_answer_streams_sql_then_rows(client):
    outputs, final = ask(client, "Which singers are from France?")
    partial_sql = [out[1] for out in outputs if out[1]]
    assert len(set(partial_sql)) > 3, "the SQL panel did not stream"
    assert final["sql"] == "SELECT name FROM singer WHERE country = 'France' ORDER BY name"
    assert final["table"]["headers"] == ["name"]
    assert final["table"]["data"] == [["Joe"], ["Rose"]]
    assert final["note"] == "2 rows (2 行)"
    assert final["status"].startswith("Finished (已完成)")
    user, assistant = texts(final["chat"])
    assert user == "Which singers are from France?"
    assert "Keep the French singers." in assistant


def test_page_names_model(url):
    config = httpx.get(f"{url}config", timeout=10).json()
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if "props" in c}
    assert "**Model (模型):** scripted stand-in" in props["header"]["value"]


def test_follow_up_sees_earlier_turn(client, scripted):
    ask(client, "Which singers are from France?")
    _, final = ask(client, "How many of them are there?")
    assert final["table"]["data"] == [[2]]
    follow_up_prompt = [p for p in scripted.prompts if p[-1]["content"] == "How many of them are there?"][-1]
    assert [m["role"] for m in follow_up_prompt] == ["system", "user", "assistant", "user"]
    assert follow_up_prompt[1]["content"] == "Which singers are from France?"
    assert follow_up_prompt[2]["content"] == "SELECT name FROM singer WHERE country = 'France' ORDER BY name"
    assert len(final["chat"]) == 4


def test_regenerate_keeps_history(client):
    ask(client, "Which singers are from France?")
    ask(client, "How many of them are there?")
    chat, sql, table, note, status, _ = client.predict("en", api_name="/regenerate")
    assert [t for t in texts(chat)[::2]] == ["Which singers are from France?", "How many of them are there?"]
    assert sql == "SELECT count(*) FROM singer WHERE country = 'France'"
    assert table["data"] == [[2]]
    assert status.startswith("Finished (已完成)")


def test_clear_empties_chat_and_panels(client):
    ask(client, "Which singers are from France?")
    chat, sql, table, note, status = client.predict(api_name="/clear")
    assert (chat, sql, note, status) == ([], "", "", "")
    assert table["data"] == []
    chat, *_ = client.predict("en", api_name="/regenerate")
    assert "no question to answer again" in texts(chat)[-1]


def test_sql_error_is_a_chat_message(client):
    _, final = ask(client, "Show the hometown of each singer.")
    assert "**SQL error (SQL 错误):** no such column: hometown" in texts(final["chat"])[-1]
    assert final["status"].startswith("Finished (已完成)")
    assert final["table"]["data"] == []


def test_generation_exception_is_a_chat_message(client):
    _, final = ask(client, "What breaks the model?")
    assert "**Generation failed (生成失败):** CUDA out of memory (simulated)" in texts(final["chat"])[-1]
    assert final["status"].startswith("Finished (已完成)")
    _, after = ask(client, "Which singers are from France?")
    assert after["table"]["data"] == [["Joe"], ["Rose"]], "the app did not recover after the failure"


def test_result_shows_first_200_rows(client):
    client.predict("big", api_name="/select_database")
    _, final = ask(client, "Pair every two singers.")
    assert len(final["table"]["data"]) == 200
    assert final["table"]["headers"] == ["name", "name (2)"]
    assert final["note"] == "90000 rows (90000 行); showing the first 200 (仅显示前 200 行)"


def test_select_database_resets_history(client):
    ask(client, "Which singers are from France?")
    info, tables, schema, chat, *_ = client.predict("big", api_name="/select_database")
    assert info.startswith("**Database (数据库):** big, 1 table (1 张表)")
    assert tables["data"] == [["singer", 300]]
    assert "CREATE TABLE singer" in schema
    assert chat == []


def test_upload_database(client, tmp_path):
    uploaded = make_db(tmp_path / "shop.sqlite")
    con = sqlite3.connect(uploaded)
    con.execute("CREATE TABLE album (title TEXT)")
    con.executemany("INSERT INTO album VALUES (?)", [("A",), ("B",), ("C",), ("D",)])
    con.commit()
    con.close()
    info, tables, schema, *_ = client.predict(handle_file(str(uploaded)), api_name="/upload_database")
    assert tables["data"] == [["singer", 3], ["album", 4]]
    assert info.startswith("**Database (数据库):** shop.sqlite, 2 tables (2 张表)")
    assert "CREATE TABLE album" in schema
    _, final = ask(client, "How many albums are there?")
    assert final["table"]["data"] == [[4]]


def test_upload_of_non_database_keeps_previous(client, tmp_path):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("this is not a database")
    info, *_ = client.predict(handle_file(str(bogus)), api_name="/upload_database")
    assert info.startswith("**Cannot use notes.sqlite (无法使用该数据库):**")
    _, final = ask(client, "Which singers are from France?")
    assert final["table"]["data"] == [["Joe"], ["Rose"]]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    "A tiny random Qwen2 saved with the real tokenizer as a model folder, as `t2sql train` saves one."
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_qwen2().save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_url(db_folder, tiny_folder):
    "The app with the real loading and generation path on the tiny model."
    app = build_app(str(tiny_folder), db_folder, default_db="music", sql_max_new_tokens=32)
    url = launch_app(app, port=free_port(), block=False)
    yield url
    app.close()


def test_tiny_model_output_without_sql(tiny_url):
    client = Client(tiny_url, verbose=False, analytics_enabled=False)
    outputs, final = ask(client, "Which singers are from France?")
    assert len([out for out in outputs if out[1]]) > 1, "the raw output did not stream into the SQL panel"
    assert final["status"].endswith("no SQL query found (未找到 SQL 查询)")
    assert NO_SQL in texts(final["chat"])[-1]
    assert final["sql"], "the raw model output should stay visible"
    chat, sql, table, note, status, _ = client.predict("zh", api_name="/regenerate")  # sampled, not greedy
    assert status.endswith("no SQL query found (未找到 SQL 查询)")
    assert texts(chat)[::2] == ["Which singers are from France?"]


@pytest.fixture(scope="module", params=[1, 4], ids=["one_generation_at_a_time", "four_generations_at_a_time"])
def concurrent_url(request, db_folder, tiny_folder):
    "The tiny-model app with the given number of generations allowed to run at the same time."
    app = build_app(str(tiny_folder), db_folder, default_db="music", sql_max_new_tokens=32,
                    concurrency_limit=request.param)
    url = launch_app(app, port=free_port(), block=False)
    yield url
    app.close()


def test_eight_concurrent_clients(concurrent_url):
    questions = [f"Which singers have an id above {i}?" for i in range(8)]

    def one_user(question):
        client = Client(concurrent_url, verbose=False, analytics_enabled=False)
        _, final = ask(client, question)
        return question, final

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one_user, questions))
    assert len(results) == 8
    for question, final in results:
        assert final["status"].startswith("Finished (已完成)"), (question, final["status"])
        assert texts(final["chat"])[0] == question, "a session saw another session's chat"
        assert len(final["chat"]) == 2


def test_generation_thread_failure_is_a_chat_message(db_folder, tiny_folder):
    loaded = load_model(str(tiny_folder))
    original_forward, calls = loaded.model.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # a prefix prefill, the question's prefill, one token, then the failure
            raise RuntimeError("simulated failure inside generate")
        return original_forward(*args, **kwargs)

    loaded.model.forward = failing_forward
    app = build_app(loaded, db_folder, default_db="music", sql_max_new_tokens=32)
    url = launch_app(app, port=free_port(), block=False)
    try:
        client = Client(url, verbose=False, analytics_enabled=False)
        start = time.perf_counter()
        _, final = ask(client, "Which singers are from France?")
        assert time.perf_counter() - start < 60, "the stream waited for tokens after the failure"
        assert "**Generation failed (生成失败):** generation failed: RuntimeError: simulated failure inside generate" \
            in texts(final["chat"])[-1]
        assert final["status"].startswith("Finished (已完成)")
    finally:
        app.close()


def test_cli_serves_app(db_folder, tiny_folder):
    port = free_port()
    server = subprocess.Popen([str(T2SQL), "demo", "--db", str(db_folder), "--model", str(tiny_folder),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        config = None
        while config is None and time.monotonic() < deadline and server.poll() is None:
            try:
                config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.5)
        assert config is not None, f"the app did not start: {server.stdout.read() if server.poll() is not None else ''}"
        props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if "props" in c}
        assert str(tiny_folder.resolve()) in props["header"]["value"], "the page does not name the model"
        assert [value for _, value in props["database"]["choices"]] == ["big", "music"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cli_rejects_missing_database(tmp_path):
    result = run_cli("demo", "--db", str(tmp_path / "missing.sqlite"), timeout=120)
    assert result.returncode == 2
    assert "no such database file or folder" in result.stderr
