"""The web page (GET /) in a real headless Chromium against a real HTTP server: pick a user, see the
profile, history and recommendations, the cache status after a refresh, a cold start and an error.

Needs Debian's Chromium (/usr/bin/chromium) and the `playwright` package (its bundled driver only;
no `playwright install`). Without them the test fails, unless GRINFER_SKIP_BROWSER=1 makes it skip.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
import torch

from grinfer.config import EngineConfig, preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.model import build_model
from grinfer.serving.app import AppState, create_app
from grinfer.serving.background import BackgroundServer
from grinfer.serving.metrics import Metrics
from grinfer.serving.service import RecommenderService
from grinfer.storage import open_cache, open_store
from grinfer.storage.importer import import_dataset

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NUM_ITEMS, NUM_USERS, K = 200, 15, 10
TIMEOUT_MS = 30_000
FOREIGN_REQUESTS: list[str] = []  # requests the page made to anything but the test server
JS_ERRORS: list[str] = []  # uncaught exceptions in the page


def _browser_or_skip():
    """playwright's sync API, or a skip (GRINFER_SKIP_BROWSER=1) / failure saying what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright package (pip install 'playwright>=1.40,<2')")
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("GRINFER_SKIP_BROWSER") == "1":
            pytest.skip(reason + "; skipped because GRINFER_SKIP_BROWSER=1")
        pytest.fail(reason + " (set GRINFER_SKIP_BROWSER=1 to skip instead)", pytrace=False)
    return sync_playwright


class WebStack:
    """Tiny random MTGR + synthetic users in SQLite, served over HTTP by uvicorn on a background thread."""

    def __init__(self, tmp: Path):
        torch.manual_seed(0)
        self.ds = generate_synthetic(num_users=NUM_USERS, num_items=NUM_ITEMS, mean_events=15, seed=0)
        cfg = preset("mtgr-tiny").with_vocab(num_items=NUM_ITEMS, num_genres=self.ds.catalog.num_genres,
                                             num_year_buckets=max(19, self.ds.catalog.num_year_buckets))
        self.store, self.cache = open_store(f"sqlite:///{tmp / 'web.db'}"), open_cache("memory://")
        import_dataset(self.ds, self.store, progress=False)
        self.engine = Engine(build_model(cfg).eval(), self.ds.catalog, EngineConfig()).start()
        service = RecommenderService(self.engine, self.ds.catalog, self.store, self.cache, model_name=cfg.name)
        metrics = Metrics(self.engine, "eager")
        self.engine.on_step = metrics.on_step
        self.server = BackgroundServer(create_app(AppState(service, metrics)))
        try:
            self.url = self.server.start()
        except RuntimeError:
            self.close()
            raise

    def titles_of(self, user: str, last: int) -> list[str]:
        """Titles of the user's last `last` events, newest first (as GET /v1/users/{id} lists them)."""
        timeline = next(u for u in self.ds.users if str(u.user_id) == user)
        return [self.ds.catalog.titles[int(i)] for i in timeline.items[-last:][::-1]]

    def close(self) -> None:
        self.server.stop()
        self.engine.shutdown()
        self.cache.close()
        self.store.close()


@pytest.fixture(scope="module", autouse=True)
def sync_playwright():
    """Checked first (autouse), so that a missing browser skips or fails before the server is built."""
    return _browser_or_skip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = WebStack(tmp_path_factory.mktemp("web"))
    yield s
    s.close()


@pytest.fixture
def page(sync_playwright, stack, tmp_path):
    """A fresh headless Chromium page at 1280x800; records page errors and any request off the server."""
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        pg = context.new_page()
        pg.on("request", lambda r: None if r.url.startswith(stack.url) else FOREIGN_REQUESTS.append(r.url))
        pg.on("pageerror", lambda e: JS_ERRORS.append(str(e)))
        FOREIGN_REQUESTS.clear()
        JS_ERRORS.clear()
        try:
            yield pg
        finally:
            context.close()


def _submit(page, user: str) -> None:
    """Type a user id into the text box, press Enter and wait until the page has rendered the answers."""
    with page.expect_response(re.compile(r"/v1/recommend$")):
        page.fill("#user-input", user)
        page.press("#user-input", "Enter")
    page.wait_for_selector("body[data-state=ready], body[data-state=error]", state="attached")


def test_web_page_end_to_end(stack: WebStack, page, tmp_path):
    rows, history = page.locator("[data-testid=rec-row]"), page.locator("[data-testid=history-row]")
    page.goto(stack.url + "/")
    page.wait_for_selector("body[data-users=loaded]", state="attached")
    options = page.locator("#user-select option").all_inner_texts()
    assert options[1:] == [str(u.user_id) for u in stack.ds.users]
    assert page.inner_text("#users-total") == f"{NUM_USERS} of {NUM_USERS} users"
    assert page.inner_text("#model-name") == "model mtgr-tiny"

    # pick a known user from the list: profile, history and K recommendations render
    # (a user who has seen every item gets no recommendation; pick one with plenty left and a long history)
    user = next(str(u.user_id) for u in stack.ds.users if 20 < len(u) < NUM_ITEMS - K)
    with page.expect_response(re.compile(r"/v1/recommend$")):
        page.select_option("#user-select", user)
    page.wait_for_selector("body[data-state=ready]", state="attached")
    assert rows.count() == K
    api = httpx.post(f"{stack.url}/v1/recommend", json={"user": user, "k": K}, timeout=30).json()
    by_item = {it["item"]: it for it in api["items"]}
    shown = []
    for i in range(K):
        row = rows.nth(i)
        item = int(row.get_attribute("data-item"))
        assert item in by_item, f"row {i}: item {item} is not among the API's top {K}"
        cells = row.locator("td").all_inner_texts()
        assert cells[0] == str(i + 1)
        assert cells[1].startswith(by_item[item]["title"]) and by_item[item]["title"]
        for task, p in by_item[item]["probabilities"].items():
            assert float(row.locator(f"td[data-task={task}]").inner_text()) == pytest.approx(p, abs=2e-3)
        shown.append(float(row.get_by_test_id("score").inner_text()))
        assert shown[-1] == pytest.approx(by_item[item]["score"], abs=2e-3)
    assert shown == sorted(shown, reverse=True)
    assert page.inner_text("#current-user") == user
    assert re.fullmatch(r"\d+\.\d ms", page.inner_text("#latency"))
    assert page.inner_text("#history-version") == "1"
    assert page.inner_text("#cache") in ("miss", "partial", "hit")
    assert page.is_hidden("#cold-start") and page.is_hidden("#error")
    profile = page.inner_text("#profile")
    for field in ("gender", "age", "occupation", "static events"):
        assert field in profile
    timeline_len = len(next(u for u in stack.ds.users if str(u.user_id) == user))
    expected = stack.titles_of(user, 20)
    assert history.count() == min(20, timeline_len)
    assert [history.nth(i).locator("td").first.get_attribute("title") for i in range(history.count())] == expected
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", history.first.inner_text())
    assert history.first.locator(".stars").get_attribute("title") in {f"{n} / 5" for n in range(1, 6)}
    page.screenshot(path=str(tmp_path / "recommendations.png"), full_page=True)

    # refresh: the same user again finds its context K/V in the cache
    with page.expect_response(re.compile(r"/v1/recommend$")):
        page.click("#refresh")
    page.wait_for_selector("body[data-state=ready]", state="attached")
    assert page.inner_text("#cache") == "hit"
    assert rows.count() == K

    # an unknown user: a cold start, still recommended, no history, no error
    _submit(page, "newcomer-42")
    page.wait_for_selector("#cold-start", state="visible")
    assert page.inner_text("#cold-start").lower() == "cold start"
    assert page.inner_text("#history-version") == "0"
    assert "Unknown user" in page.inner_text("#profile")
    assert history.count() == 0 and rows.count() == K
    assert page.is_hidden("#error")
    page.screenshot(path=str(tmp_path / "cold_start.png"), full_page=True)

    # an invalid id (spaces): the server's error message and its field are shown
    _submit(page, "not a valid id")
    page.wait_for_selector("#error", state="visible")
    assert page.inner_text("#error-field") == "field: user"
    assert "user" in page.inner_text("#error-message") and page.inner_text("#error-status") == "Error 422"
    assert rows.count() == 0 and page.is_hidden("#cold-start") and page.is_hidden("#stats")
    assert page.inner_text("#profile") == "No profile."
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

    # a valid id again clears the error
    _submit(page, user)
    assert page.is_hidden("#error") and rows.count() == K

    assert JS_ERRORS == []
    assert FOREIGN_REQUESTS == [], "the page must not fetch anything but its own server"
