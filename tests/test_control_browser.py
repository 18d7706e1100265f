"""A person labels robot clips in a real browser, and the control training loop learns from them.

`heed control train --labeler human` (Christiano et al. 2017 with people answering) writes
its queries as pairs of animated GIFs into the feedback app's store and waits for the first
answers before RL starts. Here headless Chromium, driven by Playwright, logs into the app,
waits for the clips, checks that both are GIFs the browser actually decoded, answers the
first pair "A" (the left clip) and the second "B", and the run finishes with exactly those
two preferences, mapped back through the order the app showed the clips in.

The clips are HalfCheetah's, rendered offscreen by MuJoCo (EGL); where MuJoCo cannot render
here, Pendulum's (pygame) instead. `.ci/install-browser.sh` installs Chromium.
"""

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# tests/ is not a package: pytest's default (prepend) import mode puts it on sys.path
from test_feedback_e2e import CHROMIUM_ARGS, browser_parts, log_in, serving

from heed.utils import HeedError

pytestmark = pytest.mark.slow

HORIZON, CLIP = 30, 10  # every step is rendered (MuJoCo's ~0.2 s a frame on a busy CPU): few steps


def renderable_env() -> tuple[str, str]:
    """HalfCheetah when MuJoCo renders in this process, else Pendulum; and why."""
    from heed.control.envs import preference_env

    try:
        env = preference_env("HalfCheetah-v5", HORIZON, render=True)
        env.reset()
        env.close()
    except HeedError as e:
        if "MUJOCO_GL" not in str(e):
            raise
        pytest.importorskip("pygame", reason=f"MuJoCo cannot render ({e}) and Pendulum needs pygame")
        return "Pendulum-v1", f"Pendulum-v1: MuJoCo cannot render here ({e})"
    return "HalfCheetah-v5", f"HalfCheetah-v5, MuJoCo rendering with MUJOCO_GL={os.environ.get('MUJOCO_GL')}"


def answer_everything_left(store, annotator: str, thread: threading.Thread) -> None:
    """After a failure: tie whatever is still open so the training thread finishes instead of waiting."""
    deadline = time.time() + 60
    while thread.is_alive() and time.time() < deadline:
        while (shown := store.next_item(annotator)) is not None:
            store.submit(annotator, shown[0]["id"], {"choice": "tie"})
        thread.join(timeout=0.5)


def test_a_person_labels_clips_in_the_browser_and_training_uses_them(tmp_path):
    sync_api, chromium = browser_parts()
    from heed.config import build
    from heed.control.train import ControlTrainConfig, train
    from heed.feedback.app import create_app
    from heed.feedback.store import Store

    env_id, which = renderable_env()
    db, out = tmp_path / "labels.db", tmp_path / "run"
    values = dict(env=env_id, labeler="human", db=str(db), out=str(out), horizon=HORIZON,
                  initial_steps=2 * HORIZON, total_timesteps=2 * HORIZON + 20, labels=2, initial_label_fraction=1.0,
                  human_wait=2, poll_seconds=0.2, clip_length=CLIP, eval_episodes=1, baseline=False,
                  rm_initial_steps=20, rm_steps=10, n_envs=2, rl_kwargs="{n_steps: 16, batch_size: 32, n_epochs: 1}")
    if env_id.startswith("Pendulum"):
        values["algo"] = "ppo"  # HalfCheetah's own defaults choose PPO; Pendulum's would be SAC
    cfg = build(ControlTrainConfig, values)  # as on the command line: the environment's defaults under these
    assert cfg.algo == "ppo", which
    if env_id.startswith("HalfCheetah"):
        assert cfg.normalize and cfg.net_arch == [256, 256], which  # HalfCheetah's defaults applied

    store = Store(db)
    token = store.add_user("ana")
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = train(cfg)
        except BaseException as e:  # reported by the test below
            result["error"] = e

    trainer = threading.Thread(target=run, daemon=True, name="control-train")
    seen: list[dict] = []
    errors: list[str] = []
    media_responses: dict[str, tuple[int, str]] = {}
    t0 = time.time()
    trainer.start()
    try:
        with serving(create_app(store)) as url, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(20000)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def note_media(response) -> None:  # what the browser itself got for each clip
                if "/media/" in response.url:
                    media_responses[response.url.removeprefix(url)] = (response.status,
                                                                       response.headers.get("content-type", ""))

            page.on("response", note_media)
            log_in(page, url, token)
            # training has to warm up and render its first clips before there is anything to label
            deadline = time.time() + 120
            while page.locator("#answer-form").count() == 0:
                assert trainer.is_alive(), f"training stopped before asking anything ({which}): {result}"
                assert time.time() < deadline, f"no clips to label after 120 s ({which})"
                page.wait_for_timeout(1000)
                page.reload()
            asked_after = time.time() - t0
            for choice, key in (("A", "1"), ("B", "2")):
                page.wait_for_selector("#answer-form")
                page.wait_for_function("() => { const imgs = document.querySelectorAll('.response img.media');"
                                       " return imgs.length === 2 && [...imgs].every(i => i.complete"
                                       " && i.naturalWidth > 0); }")
                imgs = page.eval_on_selector_all(
                    ".response img.media", "els => els.map(i => [i.getAttribute('src'), i.naturalWidth,"
                    " i.naturalHeight, i.closest('.response').dataset.pos])")
                item_id = page.get_attribute("input[name=item_id]", "value")
                page.keyboard.press(key)
                chosen = page.eval_on_selector_all(".response.chosen", "els => els.map(e => e.dataset.pos)")
                with page.expect_navigation():
                    page.keyboard.press("Enter")
                seen.append({"item_id": item_id, "choice": choice, "imgs": imgs, "chosen": chosen})
            done = page.locator("#done").count()
            browser.close()
        trainer.join(timeout=120)
        assert not trainer.is_alive(), f"training did not finish within 120 s of the answers ({which})"
    finally:
        if trainer.is_alive():
            answer_everything_left(store, "ana", trainer)
    wall = time.time() - t0
    if "error" in result:
        raise AssertionError(f"training failed ({which})") from result["error"]
    report = result["report"]

    # the page: two clips per item, each a GIF from the app's /media/ route that the browser decoded
    assert not errors, (which, errors)
    assert done == 1, which
    clips = out / "clips"
    items = {item["id"]: item for item in store.all_items()}
    expected_mu = {}
    for s in seen:
        item = items[s["item_id"]]
        assert item["kind"] == "pair", (which, item)
        order = []
        for pos, (src, width, height, data_pos) in enumerate(s["imgs"]):
            m = re.fullmatch(r"/media/(\d+)/([01])", src)
            assert m and int(m[1]) == item["seq"] and data_pos == str(pos), (which, s)
            assert media_responses.get(src) == (200, "image/gif"), (which, src, media_responses)
            k = int(m[2])
            order.append(k)
            path = Path(item["responses"][k]["media"])
            assert path.parent == clips.resolve() and path.suffix == ".gif", (which, path)
            with Image.open(path) as gif:
                assert gif.format == "GIF" and gif.n_frames == CLIP, (which, path)
                assert (width, height) == gif.size and width > 0, (which, s, gif.size)
        assert sorted(order) == [0, 1], (which, s)
        shown_pos = 0 if s["choice"] == "A" else 1  # A is the left clip, B the right one
        assert s["chosen"] == [str(shown_pos)], (which, s)
        preferred = order[shown_pos]  # original index of the clip clicked
        expected_mu[s["item_id"]] = 1.0 if preferred == 0 else 0.0  # mu = 1: clip 0 preferred
    assert len(expected_mu) == 2, (which, seen)
    stored = {a["item_id"]: a["choice"] for a in store.answers()}
    assert stored == {i: "0" if mu == 1.0 else "1" for i, mu in expected_mu.items()}, (which, stored)
    store.close()

    # the training loop: both answers used, saved as comparisons with the preferences clicked
    assert report["learned"]["labels_used"] == 2, (which, report["learned"])
    assert report["learned"]["labels_asked"] == 2 and report["learned"]["labels_pending"] == 0, which
    assert len(list(clips.glob("*.gif"))) == 4, (which, sorted(p.name for p in clips.iterdir()))
    with np.load(out / "labels.npz") as z:
        labels = {k: z[k] for k in z.files}
    assert len(labels["mu"]) == 2 and labels["obs0"].shape[1] == CLIP, (which, labels["mu"])
    for item_id, mu in expected_mu.items():
        with np.load(clips / f"{item_id}.npz") as asked:  # the clip arrays the labeler sent with the item
            (j,) = [j for j in range(2) if np.array_equal(labels["obs0"][j], asked["obs0"][0])
                    and np.array_equal(labels["obs1"][j], asked["obs1"][0])]
        assert labels["mu"][j] == mu, (which, item_id, labels["mu"], expected_mu)
    print(f"{which}: clips to label after {asked_after:.1f} s, whole run {wall:.1f} s")


def test_mujoco_without_a_display_names_mujoco_gl(tmp_path):
    """GLFW (MuJoCo's default) with no display: the error tells people what to set."""
    script = textwrap.dedent("""
        from heed.control.envs import preference_env
        from heed.utils import HeedError
        try:
            preference_env("HalfCheetah-v5", 10, render=True).reset()
        except HeedError as e:
            print("HEEDERROR", e)
        else:
            print("RENDERED")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYOPENGL_PLATFORM")}
    env["MUJOCO_GL"] = "glfw"
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "RENDERED" in proc.stdout:
        pytest.skip("MuJoCo rendered through GLFW without a display here")
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("HEEDERROR")]
    assert "MUJOCO_GL" in line, line
