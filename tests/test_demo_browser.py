"""The demo in a real headless Chromium (Debian's package, driven by Playwright): type, click, read the page."""
import os
import sqlite3
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from t2sql_nb.demo import CHROMIUM, CHROMIUM_ARGS, build_app, free_port, launch_app, screenshot_answer  # noqa: E402
from t2sql_nb.format import SYSTEM_TEMPLATE  # noqa: E402
from t2sql_nb.models import LoadedModel  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason=f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scripted(messages, max_new_tokens, temperature=0.0):
    "Stand-in generator: one fixed query, and a two-step explanation in the language asked for."
    if messages[0]["content"].startswith(SYSTEM_TEMPLATE.split("{schema}")[0]):
        reply = "SELECT name, country FROM singer WHERE country = 'France'"
    elif "用中文" in messages[0]["content"]:
        reply = "1. 读取歌手表。\n2. 只保留法国歌手。"
    else:
        reply = "1. Read the singer table.\n2. Keep the French singers."
    for i in range(0, len(reply), 3):
        yield reply[i:i + 3]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("databases")
    con = sqlite3.connect(folder / "music.sqlite")
    con.execute("CREATE TABLE singer (singer_id INT PRIMARY KEY, name TEXT, country TEXT)")
    con.executemany("INSERT INTO singer VALUES (?, ?, ?)",
                    [(1, "Joe", "France"), (2, "Tribal", "Netherlands"), (3, "Rose", "France")])
    con.commit()
    con.close()
    app = build_app(LoadedModel(None, None, "scripted stand-in", ""), folder, generate_fn=scripted)
    url = launch_app(app, port=free_port(), block=False)
    yield url
    app.close()


def test_question_shows_sql_and_table(url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    blocked = []

    def local_only(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=list(CHROMIUM_ARGS))
        try:
            browser.route("**/*", local_only)
            page = browser.pages[0]
            page.goto(url)
            expect(page.locator("#header")).to_contain_text("Model (模型): scripted stand-in")
            expect(page.locator("#schema")).to_contain_text("CREATE TABLE singer")

            page.get_by_label("Question (问题)").fill("Which singers are from France?")
            page.get_by_role("button", name="Submit (发送)").click()

            expect(page.locator("#status")).to_contain_text("Finished (已完成)", timeout=60_000)
            expect(page.locator("#sql")).to_contain_text("SELECT name, country FROM singer WHERE country = 'France'")
            expect(page.locator("#result [role=row][data-index]")).to_have_count(2)
            expect(page.locator("#result")).to_contain_text("Rose")
            expect(page.locator("#result-note")).to_contain_text("2 rows (2 行)")
            expect(page.locator("#chat")).to_contain_text("Keep the French singers.")
            expect(page.get_by_role("button", name="Submit (发送)")).to_be_enabled()
            expect(page.get_by_label("Question (问题)")).to_have_value("")

            shot = tmp_path / "answer.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes().startswith(PNG_SIGNATURE)
        finally:
            browser.close()
    assert blocked == [], f"the page requested other hosts: {blocked}"


def test_screenshot_answer_in_chinese(url, tmp_path):
    shot = tmp_path / "demo" / "screenshot.png"
    record = screenshot_answer(url, "哪些歌手来自法国？", shot, language="zh", timeout_s=60)
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    assert shot.stat().st_size > 20_000
    assert record["status"].startswith("Finished (已完成)")
    assert record["sql"] == "SELECT name, country FROM singer WHERE country = 'France'"
    assert record["result_rows"] == 2
    assert "只保留法国歌手" in record["chat"]
    assert record["blocked_requests"] == []
