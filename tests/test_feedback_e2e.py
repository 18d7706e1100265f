"""End to end in a real browser: headless Chromium (Debian's package) driven by Playwright.

One annotator logs in, labels a pair from the keyboard, gives a tie, skips, undoes the
skip and answers instead, ranks three responses, and exports from the admin page;
then `heed rm train` trains on the export. Along the way: a response full of HTML and
script is shown as text and never runs. Then, with and without JavaScript, the Back
button after an answer never carries that answer onto the next item; and a
20,000-character response with hidden characters keeps the choices and the progress in
view at desktop and phone sizes, with the hidden characters shown as marks. Spans are
marked by keyboard and by a mouse drag over a response with an emoji, a hidden character
and newlines before them, and the export holds Python's code-point offsets; without
JavaScript they are typed as offset lines.
`.ci/install-browser.sh` installs what it needs.
"""

import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from heed.feedback.app import create_app
from heed.feedback.store import Store

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EVIL = ('<script>window.__pwned = "script"</script><img src=x onerror="window.__pwned = \'img\'">'
        '<b>not bold</b>')
PAIRS = [("Describe the old mill.", "The old mill stands by the river.\nIt has a wooden wheel.",
          "mill mill mill mill"),
         ("Say hello.", EVIL, "Hello!"),
         ("Write a function that adds one.", "```python\ndef add_one(x):\n    return x + 1\n```",
          "def add_one(x): return x - 1")]
RANKING = ("List three colours.", ["red, green, blue", "colour colour colour", "Red, yellow and blue."])


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def browser_parts():
    """(playwright's sync_api, chromium's path), or the reason the test cannot run."""
    try:
        from playwright import sync_api
    except ImportError:  # part of the test extra: missing means a broken install, not a reason to skip
        pytest.fail("the playwright package is missing: run .ci/install-browser.sh (or pip install playwright)")
    chromium = chromium_path()
    if chromium is None:
        pytest.skip("chromium not found (run .ci/install-browser.sh, which installs Debian's chromium)")
    return sync_api, chromium


@contextmanager
def serving(app):
    """The app on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def log_in(page, url: str, token: str) -> None:
    page.goto(url + "/login")
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("#login-form button")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Run the whole browser session once; returns what it saw and the exported files."""
    sync_api, chromium = browser_parts()
    tmp = tmp_path_factory.mktemp("e2e")
    store = Store(tmp / "labels.db")
    store.add_items([{"id": f"pair{k}", "prompt": p, "responses": [a, b]} for k, (p, a, b) in enumerate(PAIRS)]
                    + [{"id": "rank0", "kind": "ranking", "prompt": RANKING[0], "responses": RANKING[1]}])
    token = store.add_user("ana", admin=True)
    app = create_app(store, guidelines="# How to judge\n\nPrefer **correct**, relevant answers.")
    seen: dict = {"alerts": [], "errors": []}
    with serving(app) as url:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.on("dialog", lambda d: (seen["alerts"].append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.set_default_timeout(15000)

            def shown() -> tuple[str, list[str]]:
                """The current item's id and its responses' text as displayed, left to right."""
                item_id = page.get_attribute("input[name=item_id]", "value")
                return item_id, [t for t in page.locator(".response .text").all_inner_texts()]

            def press_and_wait(key: str) -> None:
                with page.expect_navigation():
                    page.keyboard.press(key)

            # 1. login: every page needs the token
            page.goto(url + "/")
            assert page.url.endswith("/login")
            page.fill("#token", token)
            with page.expect_navigation():
                page.keyboard.press("Enter")
            page.wait_for_selector("#answer-form")

            seen["progress_start"] = page.inner_text("#progress")

            # 2. a pair by keyboard: "1" picks the left one, Enter submits
            item, texts = shown()
            seen["pair0"] = (item, texts)
            page.keyboard.press("1")
            assert page.locator(".response.chosen").count() == 1
            press_and_wait("Enter")

            # 3. the hostile response: shown as text, never run; then a tie by keyboard (↑)
            item, texts = shown()
            seen["pair1"] = (item, texts)
            seen["pwned"] = page.evaluate("window.__pwned === undefined ? null : window.__pwned")
            seen["evil_text"] = [t for t in texts if "script" in t]
            seen["evil_html_has_script_tag"] = page.locator(".response script, .response img").count()
            page.screenshot(path=str(tmp / "label-page.png"), full_page=True)
            page.keyboard.press("ArrowUp")
            press_and_wait("Enter")

            # 4. skip (0), 5. undo (u) brings it back, then answer B (→)
            item, texts = shown()
            page.keyboard.press("0")
            press_and_wait("Enter")
            seen["after_skip"] = shown()[0]
            press_and_wait("u")
            seen["notice"] = page.inner_text(".notice")
            seen["pair2"] = shown()
            seen["pair2_before_undo"] = (item, texts)
            page.keyboard.press("ArrowRight")
            press_and_wait("Enter")

            # 6. a ranking: press the responses' numbers best first
            item, texts = shown()
            seen["rank0"] = (item, texts)
            for key in ("3", "1", "2"):
                page.keyboard.press(key)
            seen["ranks"] = [page.input_value(f"select[name=rank_{k}]") for k in range(3)]
            press_and_wait("Enter")
            seen["done"] = page.locator("#done").count()

            seen["progress_end"] = page.inner_text("#progress")
            page.click("text=Guidelines")
            seen["guidelines"] = page.inner_text("article.guidelines")

            # 7. export from the admin page
            page.goto(url + "/admin")
            seen["admin_pairs_count"] = page.inner_text("#exports tbody tr:first-child td:nth-child(2)")
            for kind in ("pairs", "rankings"):
                with page.expect_download() as download:
                    page.click(f"#export-{kind}")
                download.value.save_as(tmp / f"{kind}.jsonl")
            browser.close()
    seen["answers"] = store.answers()
    seen["pairs"] = [json.loads(x) for x in (tmp / "pairs.jsonl").read_text().splitlines()]
    seen["rankings"] = [json.loads(x) for x in (tmp / "rankings.jsonl").read_text().splitlines()]
    seen["dir"] = tmp
    store.close()
    return seen


def original(displayed: str, candidates) -> str:
    """The original response a displayed text came from."""
    (match,) = [c for c in candidates if displayed.strip() in c]
    return match


def test_browser_labelling_session(labelled):
    s = labelled
    assert not s["errors"], s["errors"]
    # the hostile response is on the page as literal text and nothing in it ran
    assert s["pwned"] is None and s["alerts"] == [] and s["evil_html_has_script_tag"] == 0
    assert s["evil_text"] == [EVIL]
    # newlines and code blocks are shown as they are
    texts0 = s["pair0"][1]
    assert PAIRS[0][1] in texts0
    assert "def add_one(x):\n    return x + 1" in "\n".join(s["pair2"][1])
    # skip then undo: the same item comes back, with the same sides
    assert s["after_skip"] == "rank0" and "withdrawn" in s["notice"]
    assert s["pair2"] == s["pair2_before_undo"]
    assert s["ranks"] == ["2", "3", "1"] and s["done"] == 1
    assert "0 answered" in s["progress_start"] and "4 left for you" in s["progress_start"]
    assert "4 answered" in s["progress_end"] and "4/4 items complete" in s["progress_end"]
    assert s["guidelines"].startswith("How to judge")

    by_item = {a["item_id"]: a for a in s["answers"]}
    assert len(s["answers"]) == 4  # the skip was withdrawn
    left0 = texts0[0]
    assert PAIRS[0][1:].index(left0) == int(by_item["pair0"]["choice"])  # "1" = the left one, original index
    assert by_item["pair1"]["choice"] == "tie"
    right2 = original(s["pair2"][1][1], PAIRS[2][1:])  # the code block is shown without its fences
    assert by_item["pair2"]["choice"] == str(PAIRS[2][1:].index(right2))
    # the ranking, mapped from displayed positions (best first: 3rd, 1st, 2nd shown) to original indices
    shown_rank = s["rank0"][1]
    assert by_item["rank0"]["ranking"] == [RANKING[1].index(shown_rank[p]) for p in (2, 0, 1)]

    # the exported files, as `heed rm train` reads them
    assert s["admin_pairs_count"] == "3"
    assert s["pairs"][0] == {"prompt": PAIRS[0][0], "chosen": left0,
                             "rejected": [t for t in PAIRS[0][1:] if t != left0][0]}
    assert s["pairs"][1]["tie"] is True and {s["pairs"][1]["chosen"], s["pairs"][1]["rejected"]} == set(PAIRS[1][1:])
    assert s["pairs"][2]["chosen"] == right2 and "tie" not in s["pairs"][2]
    assert s["rankings"] == [{"prompt": RANKING[0], "responses": RANKING[1],
                              "ranking": by_item["rank0"]["ranking"]}]


def test_rm_train_trains_on_the_export(labelled, request, tmp_path):
    """`heed rm train` on the browser session's export (runs once heed.algos.reward exists)."""
    reward = pytest.importorskip("heed.algos.reward", reason="heed.algos.reward (the reward-model stage) "
                                 "is not in this checkout yet")
    from heed import cli

    tiny_base = request.getfixturevalue("tiny_base")  # only built when the stage exists

    pairs, rankings = labelled["dir"] / "pairs.jsonl", labelled["dir"] / "rankings.jsonl"
    out = tmp_path / "rm"
    code = cli.main(["rm", "train", "--model", str(tiny_base), "--data", f"{pairs},{rankings}",
                     "--eval-data", str(pairs), "--out", str(out), "--epochs", "2", "--batch-size", "2",
                     "--micro-batch-size", "2", "--warmup-steps", "1", "--eval-every", "1",
                     "--norm-samples", "4", "--norm-max-new-tokens", "8"])
    assert code == 0
    # the trained model reads back and scores the labelled responses
    from heed.reward_model import load_reward_model

    rm = load_reward_model(out)
    mean, std = rm.score([PAIRS[0][0]] * 2, list(PAIRS[0][1:]))
    assert len(mean) == len(std) == 2 and reward is not None

    # and it drives active selection: `heed label serve --reward-model DIR` scores the queue
    from heed.feedback.cli import _start_active_selection

    store = Store(tmp_path / "active.db")
    store.add_items([{"id": f"pair{k}", "prompt": p, "responses": [a, b]} for k, (p, a, b) in enumerate(PAIRS)])
    scorer = _start_active_selection(store, str(out))
    scorer.stopped.set()
    items = store.all_items()
    assert all(len(item["rm_scores"]) == 2 and item["priority"] >= 0 for item in items)
    store.close()


def test_the_back_button_never_answers_for_you(tmp_path):
    """Answer, press Back: the page shows the next item with nothing chosen and no comment, and
    no answer is stored without a new choice. With JavaScript and without."""
    sync_api, chromium = browser_parts()
    store = Store(tmp_path / "labels.db")
    store.add_items([{"id": f"b{k}", "prompt": f"Question {k}?", "responses": [f"yes {k}", f"no {k}"]}
                     for k in range(8)])
    tokens = {"js": store.add_user("js"), "nojs": store.add_user("nojs")}
    found: dict = {}
    with serving(create_app(store)) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        for who, script in (("js", True), ("nojs", False)):
            page = browser.new_context(java_script_enabled=script, viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(15000)
            log_in(page, url, tokens[who])
            first = page.get_attribute("input[name=item_id]", "value")
            page.click("label.opt.a")
            if script:
                page.keyboard.press("c")
                page.keyboard.type("a note about the first item")
                page.keyboard.press("Escape")
            else:
                page.click("details.comment summary")
                page.fill("#comment", "a note about the first item")
            with page.expect_navigation():
                page.click("#submit")
            second = page.get_attribute("input[name=item_id]", "value")
            page.go_back()
            page.wait_for_selector("#answer-form")
            page.wait_for_load_state("load")
            found[who] = {
                "first": first, "second": second,
                "after_back": page.get_attribute("input[name=item_id]", "value"),
                "checked": page.locator("input[name=choice]:checked").count(),
                "comment": page.input_value("#comment"),
                "highlighted": page.locator(".response.chosen").count()}
            if script:
                page.keyboard.press("Enter")  # nothing chosen: the script says so and sends nothing
                page.wait_for_timeout(300)
                found[who]["hint"] = page.inner_text("#hint")
            else:
                with page.expect_navigation():
                    page.click("#submit")  # the server refuses an empty answer, and says so
                found[who]["hint"] = " ".join(page.locator(".notice").all_inner_texts())
            found[who]["answers"] = [a["item_id"] for a in store.answers() if a["annotator"] == who]
        browser.close()
    for who in ("js", "nojs"):
        f = found[who]
        assert f["after_back"] in (f["first"], f["second"]), f  # shown anew, never stale
        assert f["checked"] == 0 and f["comment"] == "" and f["highlighted"] == 0, (who, f)
        assert "Choose an answer" in f["hint"], (who, f)
        assert f["answers"] == [f["first"]], (who, f)  # only the answer actually given


@pytest.mark.parametrize("size", [(1280, 800), (390, 760)], ids=["desktop", "phone"])
def test_a_long_response_keeps_the_controls_in_view_and_hidden_characters_show(tmp_path, size):
    sync_api, chromium = browser_parts()
    store = Store(tmp_path / "labels.db")
    long = ("A long answer. " * 1400)[:20_000]
    sneaky = "Transfer to account \u202e9876\u202c now, and\u200bthen log in."
    store.add_items([{"id": "long", "prompt": "Explain everything.", "responses": [long, sneaky]},
                     {"id": "thumb", "kind": "thumbs", "prompt": "Is this fine?", "responses": [long]}])
    token = store.add_user("ann")
    width, height = size
    with serving(create_app(store, guidelines="# Guide\n\nJudge **correctness** first.")) as url, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(15000)
        log_in(page, url, token)
        page.wait_for_selector("#answer-form")
        page.screenshot(path=str(tmp_path / f"long-{width}.png"))
        boxes = {sel: page.locator(sel).bounding_box() for sel in ("#progress", ".choices", "#submit")}
        marks = page.locator(".cf").all_inner_texts()
        lengths = page.locator(".response .len").all_inner_texts()
        scrolls = page.evaluate("Array.from(document.querySelectorAll('.response .text'))"
                                ".map(e => [e.innerText.length > 10000, e.scrollHeight > e.clientHeight])")
        page.keyboard.press("g")  # the guidelines open beside the item, which stays where it is
        guide_shown = page.locator("#guidelines-panel aside").is_visible()
        form_still_there = page.locator("#answer-form").count()
        page.keyboard.press("g")
        guide_hidden = not page.locator("#guidelines-panel aside").is_visible()
        page.keyboard.press("1")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        page.screenshot(path=str(tmp_path / f"thumb-{width}.png"))
        thumb_boxes = {sel: page.locator(sel).bounding_box() for sel in ("#progress", ".choices", "#submit")}
        line = page.locator(".response .plain").first.bounding_box()
        browser.close()
    for where in (boxes, thumb_boxes):
        for sel, box in where.items():
            assert box is not None, sel
            assert 0 <= box["x"] and box["x"] + box["width"] <= width + 1, (sel, box, size)
            assert 0 <= box["y"] and box["y"] + box["height"] <= height + 1, (sel, box, size)
    assert marks == ["U+202E", "U+202C", "U+200B"]
    assert any("20,000 characters" in t for t in lengths)
    assert sorted(scrolls) == [[False, False], [True, True]]  # the long response scrolls inside its own box
    assert guide_shown and form_still_there == 1 and guide_hidden
    assert line["width"] <= 80 * 16  # one response: a readable line length, not the whole screen


# An astral character (2 UTF-16 units, 1 code point) and a zero-width space (shown as a mark
# 6 characters wide) before every marked span, and newlines between them: offsets counted in
# JavaScript's units, or in the rendered text's, would be off by one or by more.
SPANS_RESPONSE = "The mill 🏭 was\u200b built in 1850.\nIt grinds rubber, not grain.\nThanks for asking!"
SPANS_LABELS = "wrong,irrelevant,rude,good"


def test_marking_spans_by_keyboard_and_mouse_exports_code_point_offsets(tmp_path):
    """Two spans by keyboard, one by a mouse drag, a correction typed, then `heed label export`:
    the file reads back as spans feedback with exactly the offsets Python gives the words."""
    sync_api, chromium = browser_parts()
    from heed import cli
    from heed.data import read_feedback

    db = tmp_path / "labels.db"
    queue = tmp_path / "queue.jsonl"
    queue.write_text(json.dumps({"id": "marks", "kind": "spans", "prompt": "Tell me about the mill.",
                                 "responses": [SPANS_RESPONSE]}) + "\n", encoding="utf-8")
    assert cli.main(["label", "add", "--db", str(db), "--queue", str(queue), "--labels", SPANS_LABELS]) == 0
    store = Store(db)
    token = store.add_user("ana")
    correction = "The mill 🏭 was built in 1905.\nIt grinds grain."
    errors: list[str] = []
    with serving(create_app(store)) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(15000)
        log_in(page, url, token)
        page.wait_for_selector("#spantext")
        tools_shown = page.locator("button.tagbtn").all_inner_texts()
        typed_lines_hidden = not page.locator("#spans").is_visible()

        # 1. by keyboard: ↓ to the second line, Ctrl+Shift+→ three words, 1 = wrong
        page.keyboard.press("ArrowDown")
        for _ in range(3):
            page.keyboard.press("Control+Shift+ArrowRight")
        page.keyboard.press("1")
        # 2. ↓ to the third line, Home, Shift+End selects it, 2 = irrelevant
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Home")
        page.keyboard.press("Shift+End")
        page.keyboard.press("2")

        # 3. by mouse: drag across "1850" (after the emoji and the mark), then click "rude"
        def edge(index: int, right: bool) -> tuple[float, float]:
            """The screen point at the left or right edge of the response's code point `index`."""
            box = page.evaluate("""([index, right]) => {
                const piece = Array.from(document.querySelectorAll('#spantext [data-at]'))
                    .filter((el) => Number(el.dataset.at) <= index).pop();
                const node = piece.firstChild;
                let unit = 0;  // code points -> UTF-16 units inside this piece
                for (const c of Array.from(node.data).slice(0, index - Number(piece.dataset.at))) unit += c.length;
                const range = document.createRange();
                range.setStart(node, unit);
                range.setEnd(node, unit + 1);
                const r = range.getBoundingClientRect();
                return {x: right ? r.right - 1 : r.left + 1, y: r.top + r.height / 2};
            }""", [index, right])
            return box["x"], box["y"]

        start, end = SPANS_RESPONSE.index("1850"), SPANS_RESPONSE.index("1850") + 4
        page.mouse.move(*edge(start, right=False))
        page.mouse.down()
        page.mouse.move(*edge(start + 2, right=True), steps=4)
        page.mouse.move(*edge(end - 1, right=True), steps=4)
        page.mouse.up()
        page.click("button.tagbtn[data-label=rude]")
        listed = page.locator("#span-list li").all_inner_texts()
        highlighted = page.locator("#spantext .tagged.last").evaluate_all(
            "els => els.map((el) => [el.dataset.label, el.textContent])")

        # 4. a correction, typed; Ctrl+Enter submits from it
        page.keyboard.press("e")
        page.keyboard.type(correction)
        page.screenshot(path=str(tmp_path / "spans.png"), full_page=True)
        with page.expect_navigation():
            page.keyboard.press("Control+Enter")
        done = page.locator("#done").count()
        browser.close()
    out = tmp_path / "spans.jsonl"
    assert cli.main(["label", "export", "--db", str(db), "--out", str(out), "--kind", "spans"]) == 0
    (answer,) = store.answers()
    store.close()

    assert not errors, errors
    assert [" ".join(t.split()) for t in tools_shown] == ["1 wrong", "2 irrelevant", "3 rude", "4 good"]
    assert typed_lines_hidden
    assert done == 1 and answer["annotator"] == "ana" and answer["answered_in"] > 0

    def where(part: str, label: str) -> dict:
        start = SPANS_RESPONSE.index(part)
        return {"start": start, "end": start + len(part), "label": label}

    expected = [where("1850", "rude"), where("It grinds rubber", "wrong"), where("Thanks for asking!", "irrelevant")]
    assert [h[1] for h in highlighted] == ["1850", "It grinds rubber", "Thanks for asking!"], highlighted
    assert len(listed) == 3 and "rude" in listed[0] and "1850" in listed[0], listed
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row == {"prompt": "Tell me about the mill.", "response": SPANS_RESPONSE, "spans": expected,
                   "correction": correction}
    feedback = read_feedback(out)
    assert feedback.format == "spans"
    (marked,) = feedback.rows
    assert [SPANS_RESPONSE[s.start:s.end] for s in marked.spans] == ["1850", "It grinds rubber", "Thanks for asking!"]
    assert marked.correction == correction


def test_spans_without_javascript_are_typed_as_offset_lines(tmp_path):
    """No script: no marking tools, but the lines they would write, typed, and the correction;
    a bad line comes back said and kept."""
    sync_api, chromium = browser_parts()
    store = Store(tmp_path / "labels.db")
    store.add_items([{"id": "marks", "kind": "spans", "prompt": "Tell me about the mill.",
                      "responses": [SPANS_RESPONSE], "labels": SPANS_LABELS.split(",")}])
    token = store.add_user("nojs")
    with serving(create_app(store)) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_context(java_script_enabled=False).new_page()
        page.set_default_timeout(15000)
        log_in(page, url, token)
        tools = page.locator("button.tagbtn").first.is_visible()
        page.fill("#spans", "25-29 wrongish")
        with page.expect_navigation():
            page.click("#submit")
        said = page.inner_text(".notice")
        kept = page.input_value("#spans")
        page.fill("#spans", "25-29 wrong")
        page.click("details.correction summary")
        page.fill("#correction", "Built in 1905.")
        with page.expect_navigation():
            page.click("#submit")
        done = page.locator("#done").count()
        browser.close()
    (answer,) = store.answers()
    store.close()
    assert not tools and "'wrongish' is not one of this item's labels" in said and kept == "25-29 wrongish"
    assert done == 1 and answer["spans"] == [{"start": 25, "end": 29, "label": "wrong"}]
    assert SPANS_RESPONSE[25:29] == "1850" and answer["correction"] == "Built in 1905."
