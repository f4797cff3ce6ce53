"""Case study: the scorer on hand-made answers, the runner against a mock server on 127.0.0.1, the CLI."""

import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from t2sql_nb.case_study import (LocalModelClient, OpenAICompatibleClient, case_messages, case_study_main,
                                 default_plan_path, extract_numbers, extract_terms, load_cases, results_table,
                                 run_case_study, score_answer)
from t2sql_nb.core import T2SQLError, read_jsonl

PLAN = default_plan_path().read_text(encoding="utf-8")
CASES = load_cases()
CASE = {
    "id": "toy",
    "prompt": "智学通的推理成本为什么能降低？",
    "expected_points": ["端侧推理 分担云端负载", "知识点缓存 重复推理", "自动扩缩容"],
}
TOY_PLAN = "智学通采用端侧推理分担云端负载，知识点缓存避免重复推理，推理服务自动扩缩容。内测期间日均推理成本下降 23%，注册用户 1,000 人。"


# ---- scorer ---------------------------------------------------------------------------------------

def test_scorer_full_coverage():
    answer = "一是端侧推理分担了云端的负载；二是知识点缓存减少重复推理；三是服务自动扩缩容。"
    score = score_answer(answer, CASE, TOY_PLAN)
    assert score["coverage"] == 1.0
    assert score["missing_points"] == []
    assert score["unsupported_numbers"] == []


def test_scorer_partial_coverage():
    score = score_answer("主要靠端侧推理分担云端负载。", CASE, TOY_PLAN)
    assert score["coverage"] == pytest.approx(1 / 3)
    assert score["covered_points"] == ["端侧推理 分担云端负载"]
    assert score["missing_points"] == ["知识点缓存 重复推理", "自动扩缩容"]


def test_scorer_no_coverage():
    score = score_answer("因为它覆盖的年级更广。", CASE, TOY_PLAN)
    assert score["coverage"] == 0.0
    assert all(value < 0.5 for value in score["point_scores"].values())


def test_scorer_flags_invented_numbers():
    answer = "知识点缓存使日均推理成本下降 23%，服务 1000 名用户，整体降本 65%，覆盖 3.5 万所学校。"
    score = score_answer(answer, CASE, TOY_PLAN)
    assert score["unsupported_numbers"] == ["65", "3.5"]


def test_scorer_skips_list_markers():
    score = score_answer("1. 端侧推理；2. 知识点缓存；3. 自动扩缩容", CASE, TOY_PLAN)
    assert score["unsupported_numbers"] == []


def test_scorer_flags_invented_terms():
    answer = "它使用量子计算芯片和 TPU 集群，并依靠端侧推理分担云端负载。"
    score = score_answer(answer, CASE, TOY_PLAN)
    assert "量子计算芯片" in score["unsupported_terms"]
    assert "tpu" in score["unsupported_terms"]
    assert "端侧推理分担云端负载" not in score["unsupported_terms"]


def test_scorer_accepts_terms_from_prompt():
    case = dict(CASE, prompt="Serverless 架构为什么能降低推理成本？")
    score = score_answer("Serverless 架构可以自动扩缩容。", case, TOY_PLAN)
    assert "serverless" not in score["unsupported_terms"]


def test_scorer_rejects_bad_threshold():
    with pytest.raises(T2SQLError, match="term_threshold: must be in"):
        score_answer("答案", CASE, TOY_PLAN, term_threshold=1.5)


NUMBER_CASES = [
    ("降低 40%", ["40"]),
    ("共 4,200 万人", ["4200"]),
    ("42.0 分钟与 42 分钟", ["42", "42"]),
    ("Qwen2.5 与 7B 模型", ["7"]),
    ("１２３ 个全角数字", ["123"]),
    ("1. 甲；2、乙；(3) 丙", []),
]


@pytest.mark.parametrize("text, expected", NUMBER_CASES)
def test_extract_numbers_table(text, expected):
    assert extract_numbers(text) == expected


def test_extract_terms_cuts_at_stop_words():
    assert extract_terms("此外，它还利用了自适应神经网络压缩技术来优化性能") == ["自适应神经网络压缩技术", "优化性能"]


def test_recorded_cases_score_as_failures():
    for case in CASES:
        observed = score_answer(case["observed_answer"], case, PLAN)
        expected = score_answer(case["expected_answer"], case, PLAN)
        assert observed["coverage"] < expected["coverage"], case["id"]
        assert expected["coverage"] == 1.0, case["id"]


# ---- mock OpenAI-compatible server ---------------------------------------------------------------

class MockServer:
    "An OpenAI-compatible server on 127.0.0.1 that answers each case's prompt with a fixed reply."

    def __init__(self, replies: dict[str, str], model: str = "mock-model", delay: float = 0.0):
        self.replies = replies
        self.model = model
        self.delay = delay
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict | str):
                data = body.encode() if isinstance(body, str) else json.dumps(body, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"unknown path {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
                time.sleep(server.delay)
                prompt = body["messages"][-1]["content"]
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"unknown path {self.path}"}})
                elif prompt == "server error":
                    self._send(500, {"error": {"message": "model crashed"}})
                elif prompt == "not json":
                    self._send(200, "<html>proxy page</html>")
                elif prompt == "no choices":
                    self._send(200, {"object": "chat.completion", "choices": []})
                else:
                    self._send(200, {"object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": server.replies.get(prompt, "计划书没有提到。")}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with MockServer({case["prompt"]: case["expected_answer"] for case in CASES}) as mock:
        yield mock


def test_runner_against_mock_server(server):
    client = OpenAICompatibleClient(server.url, model="auto", timeout=10)
    rows = run_case_study(CASES, PLAN, client, max_new_tokens=64)
    assert client.name == "mock-model"
    assert [row["id"] for row in rows] == [case["id"] for case in CASES]
    for row, case in zip(rows, CASES):
        assert row["model"] == "mock-model"
        assert row["model_answer"] == case["expected_answer"]
        assert row["model_score"]["coverage"] == 1.0
        assert row["observed_score"]["coverage"] < 1.0
    table = results_table(rows)
    assert list(table.index) == [case["id"] for case in CASES]
    assert (table["model coverage"] == 1.0).all()


def test_runner_sends_plan_and_limits(server):
    client = OpenAICompatibleClient(server.url, model="mock-model", timeout=10)
    run_case_study(CASES[:1], PLAN, client, max_new_tokens=64)
    posts = [r for r in server.requests if r["method"] == "POST"]
    assert len(posts) == 1
    body = posts[0]["body"]
    assert body["model"] == "mock-model"
    assert body["max_tokens"] == 64
    assert body["temperature"] == 0
    assert body["messages"] == case_messages(CASES[0], PLAN)
    assert PLAN in body["messages"][0]["content"]
    assert "Authorization" not in posts[0]["headers"]
    assert not [r for r in server.requests if r["method"] == "GET"], "a named model needs no /models request"


def test_client_sends_api_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    OpenAICompatibleClient(server.url, model="auto", timeout=10).complete([{"role": "user", "content": "问题"}])
    assert {r["headers"].get("Authorization") for r in server.requests} == {"Bearer test-key"}


def test_client_accepts_full_completions_url(server):
    client = OpenAICompatibleClient(server.url + "/chat/completions", model="m", timeout=10)
    assert client.complete([{"role": "user", "content": "问题"}]) == "计划书没有提到。"


ERROR_REPLIES = [
    ("server error", "HTTP 500"),
    ("not json", "the reply is not JSON"),
    ("no choices", "reply has no choices[0].message.content"),
]


@pytest.mark.parametrize("prompt, message", ERROR_REPLIES)
def test_client_reports_bad_replies(server, prompt, message):
    client = OpenAICompatibleClient(server.url, model="m", timeout=10)
    with pytest.raises(T2SQLError, match=re.escape(message)):
        client.complete([{"role": "user", "content": prompt}])


def test_client_reports_unknown_path(server):
    with pytest.raises(T2SQLError, match="HTTP 404"):
        OpenAICompatibleClient(server.url.removesuffix("/v1") + "/wrong", model="auto", timeout=10)


def test_client_reports_timeout(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with MockServer({}, delay=1.0) as slow:
        client = OpenAICompatibleClient(slow.url, model="m", timeout=0.2)
        with pytest.raises(T2SQLError, match="timed out after 0.2 s"):
            client.complete([{"role": "user", "content": "问题"}])


def test_client_reports_refused_connection():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OpenAICompatibleClient(f"http://127.0.0.1:{port}/v1", model="m", timeout=5)
    with pytest.raises(T2SQLError, match="connection failed"):
        client.complete([{"role": "user", "content": "问题"}])


def test_cli_writes_rows(server, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    status = case_study_main(["--endpoint", server.url, "--out", str(out), "--max-new-tokens", "32"])
    assert status == 0
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == [case["id"] for case in CASES]
    assert all(row["model_score"]["coverage"] == 1.0 for row in rows)
    printed = capsys.readouterr().out
    assert "unesco-modules: coverage 1.00 (recorded answer 0.00)" in printed


def test_cli_reports_bad_input(tmp_path, capsys):
    assert case_study_main(["--plan", str(tmp_path / "absent.md"), "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    assert "business plan not found" in capsys.readouterr().err


# ---- local model -------------------------------------------------------------------------------------

def test_local_client_with_tiny_model(tmp_path):
    from t2sql_nb.models import load_tokenizer, tiny_qwen2

    folder = tmp_path / "tiny"
    tiny_qwen2(max_position_embeddings=4096).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    client = LocalModelClient(str(folder))
    case = dict(CASES[0], prompt="列出框架的模块。")
    rows = run_case_study([case], "智学通商业计划书（测试用的短文本）。", client, max_new_tokens=4)
    assert rows[0]["model"] == client.name
    assert isinstance(rows[0]["model_answer"], str)
    assert 0.0 <= rows[0]["model_score"]["coverage"] <= 1.0
