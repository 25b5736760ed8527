"""Scoring with a judge model: the request the book sends, the printed average, and one clear
line (no traceback, nothing lost) for a judge that is down, slow or not speaking JSON. The judge
is a small HTTP server on 127.0.0.1 started by the test."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from numpygpt.cli import main
from numpygpt.finetune.judge import JudgeError, judge_prompt, parse_score, query_judge

ENTRIES = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."},
    {"instruction": "What type of cloud is typically associated with thunderstorms?", "input": "",
     "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
     "model_response": "The type of cloud associated with thunderstorms is a cumulus cloud."},
    {"instruction": "Name the author of 'Pride and Prejudice'.", "input": "",
     "output": "Jane Austen.", "model_response": "The author of 'Pride and Prejudice' is Jane Austen."},
]


class Judge:
    """A fake Ollama /api/chat: answers the queued replies in order (a str body; ("sleep", s, body)
    to wait s seconds first; ("status", code, body) for an HTTP error) and records each request."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                judge.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                reply = judge.replies.pop(0) if judge.replies else "{}"
                status = 200
                if isinstance(reply, tuple):
                    if reply[0] == "sleep":
                        time.sleep(reply[1])
                    else:
                        status = reply[1]
                    reply = reply[2]
                data = reply.encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def answer(text):
    return json.dumps({"model": "llama3", "message": {"role": "assistant", "content": text}, "done": True})


@pytest.fixture
def judge_server():
    servers = []

    def start(*replies):
        servers.append(Judge(replies))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def responses_file(tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(ENTRIES))
    return path


def test_judge_prompt_is_the_books():
    assert judge_prompt(ENTRIES[0]) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
        "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model response "
        "`The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only.")


def test_parse_score_reads_as_the_books_int():
    """int(reply), as ollama_evaluate.py: white space around is fine, a score outside 0-100
    is kept as it is (the script has no range check), anything else is unreadable."""
    assert parse_score(" 85\n") == 85 and parse_score("0") == 0 and parse_score("100") == 100
    assert parse_score("101") == 101 and parse_score("-3") == -3
    for reply in ("85.", "Score: 85", "", "eighty", "8 5"):
        assert parse_score(reply) is None, reply


def test_empty_responses_score_0_unasked_and_out_of_range_scores_are_kept(judge_server, tmp_path, capsys):
    """The book's script: an empty response scores 0 and the judge is not asked; a score of
    150 counts as 150 in the average (no range check)."""
    entries = [dict(ENTRIES[0]), dict(ENTRIES[1], model_response=""), dict(ENTRIES[2])]
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(entries))
    server = judge_server(answer("150"), answer("30"))
    assert main(["score-responses", str(path), "--judge-url", server.url, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert [r["body"]["messages"][0]["content"] for r in server.requests] == [judge_prompt(entries[0]),
                                                                                judge_prompt(entries[2])]
    assert "Number of scores: 3 of 3" in out and "Average score: 60.00" in out  # (150 + 0 + 30) / 3
    assert "Empty responses: 1" in out and "Scores outside 0-100: 1" in out
    scores = json.loads((tmp_path / "responses-scores.json").read_text())
    assert [(s["score"], s["judge_reply"]) for s in scores] == [(150, "150"), (0, None), (30, "30")]


def test_request_body_and_printed_average(judge_server, responses_file, capsys):
    server = judge_server(answer("80"), answer(" 61\n"), answer("I would say 90"))
    rc = main(["score-responses", str(responses_file), "--judge-model", "llama3", "--judge-url", server.url,
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Average score: 70.50" in out and "Number of scores: 2 of 3" in out and "Unreadable answers: 1" in out
    assert len(server.requests) == 3
    first = server.requests[0]
    assert first["path"] == "/api/chat" and first["headers"]["Content-Type"] == "application/json"
    assert first["body"] == {"model": "llama3", "messages": [{"role": "user", "content": judge_prompt(ENTRIES[0])}],
                             "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}, "stream": False}
    assert [r["body"]["messages"][0]["content"] for r in server.requests] == [judge_prompt(e) for e in ENTRIES]
    scores = json.loads((responses_file.parent / "responses-scores.json").read_text())
    assert [s["score"] for s in scores] == [80, 61, None]
    assert scores[2]["judge_reply"] == "I would say 90" and scores[0]["model_response"] == ENTRIES[0]["model_response"]


def test_streamed_reply_is_joined(judge_server):
    server = judge_server("\n".join(json.dumps({"message": {"content": c}, "done": d})
                                    for c, d in (("7", False), ("5", False), ("", True))))
    assert query_judge("p", "m", server.url + "/api/chat", timeout=5) == "75"
    assert server.requests[0]["path"] == "/api/chat"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_unreachable_judge_is_one_line(responses_file, capsys):
    rc = main(["score-responses", str(responses_file), "--judge-url", f"http://127.0.0.1:{free_port()}",
               "--no-progress"])
    assert rc == 1
    err = one_line_error(capsys)
    assert "cannot reach the judge" in err and "ollama serve" in err


def test_slow_judge_times_out_and_keeps_the_scores_so_far(judge_server, responses_file, capsys):
    server = judge_server(answer("50"), ("sleep", 1.5, answer("60")))
    out_path = responses_file.parent / "scores.json"
    rc = main(["score-responses", str(responses_file), "--judge-url", server.url, "--timeout", "0.5",
               "--out", str(out_path), "--no-progress"])
    assert rc == 1
    err = one_line_error(capsys)
    assert "did not answer within 0.5 s" in err and "the 1 scores so far are in" in err
    assert [s["score"] for s in json.loads(out_path.read_text())] == [50]


def test_non_json_reply_then_resume(judge_server, responses_file, capsys):
    server = judge_server(answer("40"), answer("70"), "<html>Bad gateway</html>")
    out_path = responses_file.parent / "scores.json"
    argv = ["score-responses", str(responses_file), "--out", str(out_path), "--no-progress"]
    assert main(argv + ["--judge-url", server.url]) == 1
    err = one_line_error(capsys)
    assert "not JSON" in err and "Bad gateway" in err
    assert [s["score"] for s in json.loads(out_path.read_text())] == [40, 70]
    # a rerun asks only for what is missing
    again = judge_server(answer("100"))
    assert main(argv + ["--judge-url", again.url]) == 0
    assert len(again.requests) == 1
    assert again.requests[0]["body"]["messages"][0]["content"] == judge_prompt(ENTRIES[2])
    assert "Average score: 70.00" in capsys.readouterr().out
    assert [s["score"] for s in json.loads(out_path.read_text())] == [40, 70, 100]


def test_json_without_content_http_error_and_bad_url(judge_server):
    server = judge_server(json.dumps({"error": "unexpected"}),
                          ("status", 404, json.dumps({"error": "model 'llama3' not found, try pulling it first"})))
    with pytest.raises(JudgeError, match="without message.content"):
        query_judge("p", "llama3", server.url, timeout=5)
    with pytest.raises(JudgeError, match="answered HTTP 404 Not Found: .*model 'llama3' not found"):
        query_judge("p", "llama3", server.url, timeout=5)
    with pytest.raises(JudgeError, match="must start with http"):
        query_judge("p", "llama3", "localhost:11434", timeout=5)


def test_responses_file_without_responses_is_refused(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    assert main(["score-responses", str(path), "--judge-url", "http://127.0.0.1:9", "--no-progress"]) == 2
    assert "entry 0 has no 'model_response'" in one_line_error(capsys)
    assert main(["score-responses", str(path), "--timeout", "0", "--no-progress"]) == 2
    assert "timeout must be more than 0 seconds" in one_line_error(capsys)
