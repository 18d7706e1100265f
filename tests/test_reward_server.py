"""`heed rm serve` and `--reward http://HOST:PORT`: scores through the server equal the local
reward model's (PPO's too), the token is required, limits give 413, malformed bodies 400
naming the field and row, and the client stops with a clear error when the server is gone.
Every server here is started by the test, on 127.0.0.1."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from heed.cli import main
from heed.reward_server import TOKEN_ENV, RemoteRewardModel, RewardServeConfig, make_server, resolve_token
from heed.rules import load_reward
from heed.utils import HeedError

TOKEN = "test-token-0123456789abcdef"
MAX_BATCH, MAX_BODY = 8, 6000
SHORT = ["--max-prompt-len", "40", "--max-response-len", "40", "--lr", "1e-3", "--norm-max-new-tokens", "12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rows(world_dir):
    """(prompt, response) rows: world prompts, a chat prompt, an empty response; more than a request holds."""
    prompts = [json.loads(line)["prompt"] for line in (world_dir / "prompts_train.jsonl").read_text().splitlines()]
    out = [(p, r) for p, r in zip(prompts[:18], ["Yes.", "No, it is a fish.", "The Zalko is red. " * 3] * 6)]
    return out + [([{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": "Yes."},
                    {"role": "user", "content": "Sure?"}], "Quite sure."), (prompts[1], "")]


@pytest.fixture(scope="module")
def rm_dir(tiny_base, world_dir, rows, tmp_path_factory):
    """A 2-member ensemble trained with `heed rm train` on a few pairs (so its spread is not 0)."""
    d = tmp_path_factory.mktemp("served_rm")
    prompts = [json.loads(line)["prompt"] for line in (world_dir / "prompts_train.jsonl").read_text().splitlines()]
    pairs = [{"prompt": p, "chosen": "Yes, it is.", "rejected": "What a stupid question. " * 2} for p in prompts[:32]]
    assert main(["rm", "train", "--model", str(tiny_base), "--data", str(write_jsonl(d / "pairs.jsonl", pairs)),
                 "--out", str(d / "rm"), *SHORT, "--ensemble", "2", "--epochs", "1", "--batch-size", "16",
                 "--micro-batch-size", "16", "--eval-fraction", "0.25", "--norm-samples", "8"]) == 0
    return d / "rm"


@pytest.fixture(scope="module")
def server(rm_dir):
    """`heed rm serve` in a thread of this process (the real config path: make_server), small limits."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        port = free_port()
        srv = make_server(RewardServeConfig(model=str(rm_dir), port=port, max_batch=MAX_BATCH,
                                            max_body_bytes=MAX_BODY, batch_size=4, device="cpu"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        deadline = time.time() + 20
        while not srv.started and time.time() < deadline:
            time.sleep(0.02)
        assert srv.started
        yield f"http://127.0.0.1:{port}"
        srv.should_exit = True
        thread.join(10)


def request(url: str, path: str, body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(url + path, data=body, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def brevity(prompts, responses):
    return [-len(r) / 20 for r in responses]


def test_scores_through_the_server_equal_the_local_reward_model(server, rm_dir, rows):
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    local_total, local_parts, local_stds = load_reward([str(rm_dir)]).score(prompts, responses)
    remote = load_reward([server])
    total, parts, stds = remote.score(prompts, responses)
    assert len(rows) > MAX_BATCH  # the client split them into several requests
    assert total == pytest.approx(local_total, abs=1e-5)
    assert parts[server] == pytest.approx(local_parts[str(rm_dir)], abs=1e-5)
    assert stds[server] == pytest.approx(local_stds[str(rm_dir)], abs=1e-5) and max(stds[server]) > 1e-4
    (_, _, client), = remote.models
    assert client.n_members == 2 and client.max_batch == MAX_BATCH
    # requests within the server's limits: at most MAX_BATCH rows and MAX_BODY bytes each
    chunks = list(client._requests(prompts * 4, responses * 4))
    assert sum(map(len, chunks)) == 4 * len(rows) and max(map(len, chunks)) <= MAX_BATCH
    assert max(sum(len(r) + 2 for r in c) + 32 for c in chunks) <= MAX_BODY
    # weighted, and mixed with a rule, exactly as a local reward model mixes
    mixed, mixed_parts, _ = load_reward([f"0.5*{server}", f"{__file__}:brevity"]).score(prompts, responses)
    expected = [0.5 * a + b for a, b in zip(local_parts[str(rm_dir)], brevity(prompts, responses))]
    assert mixed == pytest.approx(expected, abs=1e-5) and len(mixed_parts) == 2


def test_rm_score_through_the_server_writes_the_ensemble_spread(server, rm_dir, rows, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": p, "response": r} for p, r in rows])
    out = {}
    for name, target in (("local", str(rm_dir)), ("remote", server)):
        assert main(["rm", "score", "--data", str(data), "--reward", target, "--out", str(tmp_path / name)]) == 0
        out[name] = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
    for a, b in zip(out["local"], out["remote"]):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-5)
        assert b["reward_std"] == pytest.approx(a["reward_std"], abs=1e-5)


def test_ppo_scoring_through_the_server_gets_the_local_scores(server, rm_dir, tiny_base, world_dir, tmp_path):
    from heed.algos.ppo import PPOConfig, run

    logged = {}
    for name, target in (("local", str(rm_dir)), ("remote", server)):
        run(PPOConfig(policy=str(tiny_base), prompts=str(world_dir / "prompts_train.jsonl"), reward=[target],
                      out=str(tmp_path / name), steps=1, prompts_per_iteration=8, mini_batch_size=8,
                      micro_batch_size=8, ppo_epochs=1, max_new_tokens=12, save_every=1000, samples_every=1000))
        logged[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward/raw", "reward/score", "reward/score_std", "objective/kl"):
        assert logged["remote"][key] == pytest.approx(logged["local"][key], abs=1e-5), key


def test_every_request_needs_the_token(server, monkeypatch):
    for path, body in (("/info", None), ("/score", b'{"rows": []}'), ("/nowhere", None)):
        for token in (None, "wrong", TOKEN[:-1] + "X", TOKEN + "X"):
            status, answer = request(server, path, body, token=token)
            assert status == 401 and "token" in answer["error"], (path, token)
    assert request(server, "/info")[1]["n_members"] == 2
    assert request(server, "/score", b'{"rows": []}') == (200, {"rewards": [], "stds": []})
    monkeypatch.setenv(TOKEN_ENV, "wrong-token-0123456789")
    with pytest.raises(HeedError, match=f"reward server at {server} refused the token in \\${TOKEN_ENV}"):
        load_reward([server])
    monkeypatch.setenv("OTHER_TOKEN", TOKEN)  # another variable, named in the term
    assert load_reward([f"{server}?token_env=OTHER_TOKEN"]).models[0][2].n_members == 2
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(HeedError, match=f"no token; set \\${TOKEN_ENV}"):
        load_reward([server])


def test_too_large_requests_are_refused_with_413(server):
    row = {"prompt": "p", "response": "r"}
    status, answer = request(server, "/score", json.dumps({"rows": [row] * (MAX_BATCH + 1)}).encode())
    assert status == 413 and f"at most {MAX_BATCH}" in answer["error"] and answer["field"] == "rows"
    big = json.dumps({"rows": [{"prompt": "p", "response": "x" * MAX_BODY}]}).encode()
    status, answer = request(server, "/score", big)
    assert status == 413 and f"over {MAX_BODY} bytes" in answer["error"]
    # without a Content-Length (chunked), the body is counted as it arrives
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/score", body=iter([big[:1000], big[1000:]]),
                 headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "bytes" in json.loads(response.read())["error"]
    conn.close()
    # the client never sends what the server would refuse
    client = RemoteRewardModel(server, tries=1)
    with pytest.raises(HeedError, match=r"row 1 alone is \d+ bytes, over the server's --max-body-bytes"):
        client.score(["p", "p"], ["short", "x" * MAX_BODY])


@pytest.mark.parametrize("body,field,fragment", [
    (b"{not json", None, "not valid JSON"),
    (b"[" * 5000, None, "RecursionError"),  # nested too deep for the parser
    (b'{"prompts": []}', "rows", "expected {\"rows\""),
    (b'{"rows": "p"}', "rows", "expected {\"rows\""),
    (b'{"rows": [{"prompt": "p", "response": "r"}, 7]}', "rows[1]", "expected an object"),
    (b'{"rows": [{"prompt": "p", "response": "r"}, {"prompt": 5, "response": "r"}]}', "rows[1].prompt",
     "expected a string"),
    (b'{"rows": [{"prompt": "p", "response": "r"}, {"prompt": "", "response": "r"}]}', "rows[1].prompt", "empty"),
    (b'{"rows": [{"prompt": "p", "response": "r"}, {"prompt": "p"}, {"prompt": "p", "response": "r"}]}',
     "rows[1].response", "missing"),
    (b'{"rows": [{"prompt": [{"role": "robot", "content": "x"}], "response": "r"}]}', "rows[0].prompt[0].role",
     "unknown role"),
])
def test_malformed_bodies_get_400_naming_field_and_row(server, body, field, fragment):
    status, answer = request(server, "/score", body)
    assert status == 400 and fragment in answer["error"]
    assert answer.get("field") == field and (field is None or answer["error"].startswith(f"{field}: "))


def test_client_stops_with_a_clear_error_when_the_server_is_gone():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    with pytest.raises(HeedError, match=rf"reward server at {url} is gone \(.*refused.*\): 3 tries failed"):
        RemoteRewardModel(url, tries=3, backoff_s=0.01)
    assert time.time() - t0 < 5


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` requests, then like a 1-member reward server."""

    failures = 0
    seen = 0

    def do_GET(self):
        type(self).seen += 1
        if type(self).seen <= type(self).failures:
            return self.answer(503, {"error": "warming up"})
        self.answer(200, {"model": "flaky", "n_members": 1, "max_batch": 4, "max_body_bytes": 10000})

    def answer(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_client_retries_5xx_with_backoff_then_gives_up(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    sleeps = []
    monkeypatch.setattr("heed.reward_server.time.sleep", sleeps.append)
    try:
        Flaky.failures, Flaky.seen = 2, 0
        assert RemoteRewardModel(url, tries=3, backoff_s=0.5).n_members == 1  # third try answers
        assert sleeps == [0.5, 1.0] and Flaky.seen == 3
        Flaky.failures, Flaky.seen, sleeps[:] = 10, 0, []
        with pytest.raises(HeedError, match=r"keeps failing \(503 warming up\): 4 tries failed"):
            RemoteRewardModel(url, tries=4, backoff_s=0.5)
        assert sleeps == [0.5, 1.0, 2.0] and Flaky.seen == 4
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_token_from_the_environment_or_made_and_printed(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    token = resolve_token(TOKEN_ENV)
    assert len(token) >= 32 and token in capsys.readouterr().out
    assert resolve_token(TOKEN_ENV) != token  # random each time
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(HeedError, match="at least 16 characters"):
        resolve_token(TOKEN_ENV)
    for unusable in ("é" * 20, "two words, both long enough"):  # a header cannot carry them as they are
        monkeypatch.setenv(TOKEN_ENV, unusable)
        with pytest.raises(HeedError, match="printable ASCII without spaces"):
            resolve_token(TOKEN_ENV)
        with pytest.raises(HeedError, match="printable ASCII without spaces"):
            RemoteRewardModel(f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert resolve_token(TOKEN_ENV) == TOKEN


def test_cli_help_and_bad_options(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["rm", "serve", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--host", "--port", "--token-env", "--max-batch", "--max-body-bytes"):
        assert flag in text
    assert "(default: 127.0.0.1)" in text and "(default: HEED_REWARD_TOKEN)" in text and "(default: 256)" in text
    assert main(["rm", "serve", "--model", str(tmp_path)]) == 2
    assert "not a reward model directory" in capsys.readouterr().err
    assert main(["rm", "serve", "--model", str(tmp_path), "--port", "0"]) == 2
