"""The web console (GET /) and the API docs (/docs) in a real headless Chromium against a real HTTP
server: pick a user, see the profile (readable labels), history and recommendations, the cache status after a
refresh, a cold start and an error; post an event and roll the history (with an API key where the server
needs one) and see the cache status and scores change; the live server state read from /metrics; a 400 px
wide layout; Swagger UI and ReDoc rendered from local assets. No request may leave the test server.

Needs Debian's Chromium (/usr/bin/chromium) and the `playwright` package (its bundled driver only;
no `playwright install`). Without them the test fails, unless GRINFER_SKIP_BROWSER=1 makes it skip.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from grinfer.config import EngineConfig, preset
from grinfer.data import generate_synthetic
from grinfer.data.movielens import AGE_CODES, NUM_OCCUPATIONS
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
FOREIGN_REQUESTS: list[str] = []  # requests the page made to anything but a test server on 127.0.0.1
JS_ERRORS: list[str] = []  # uncaught exceptions in the page


def _local(url: str) -> bool:
    """A request to a test server (or a blob: of a page served by one)."""
    return urlsplit(url.removeprefix("blob:")).hostname == "127.0.0.1"


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
        self.service = RecommenderService(self.engine, self.ds.catalog, self.store, self.cache, model_name=cfg.name)
        self.metrics = Metrics(self.engine, "eager")
        self.engine.on_step = self.metrics.on_step
        self.server = BackgroundServer(create_app(AppState(self.service, self.metrics)))
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
    """A fresh headless Chromium page at 1280x800; records page errors and any request that leaves 127.0.0.1."""
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        pg = context.new_page()
        pg.on("request", lambda r: None if _local(r.url) else FOREIGN_REQUESTS.append(r.url))
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


def expect(locator):
    """playwright's `expect` (imported here: the module must load without playwright, to skip)."""
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect(locator)


def _check_profile_labels(page, codes) -> None:
    """The profile shows MovieLens labels for the stored codes (grinfer/data/movielens.py's encoding), not numbers."""
    gender, age, occupation, zip_bucket = (int(c) for c in codes)
    label = lambda field: page.inner_text(f"#profile dd[data-field={field}]")
    assert label("gender") == {1: "female", 2: "male"}[gender]
    age_group = AGE_CODES[age - 1]  # ML-1M age codes are the groups' lower bounds (1: under 18)
    if age_group == 1:
        assert label("age") == "under 18"
    else:  # "18–24" ... "50–55", then "56+"
        assert label("age") == (f"{age_group}–{AGE_CODES[age] - 1}" if age < len(AGE_CODES) else f"{age_group}+")
    assert label("zip") == f"{zip_bucket - 1:02d}xxx"
    occupations = page.evaluate(f"[...Array({NUM_OCCUPATIONS}).keys()].map((i) => profileLabel('occupation', i + 1))")
    assert len(set(occupations)) == NUM_OCCUPATIONS and occupations[12] == "programmer"  # ML-1M code 12
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9 /-]+", o) for o in occupations)
    assert label("occupation") == occupations[occupation - 1]
    assert page.evaluate("profileLabel('age', 0)") == "unknown"


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
    _check_profile_labels(page, next(u for u in stack.ds.users if str(u.user_id) == user).profile)
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


def _users_with_room(stack: WebStack) -> list[str]:
    """Users with some history and plenty of unseen items, other than the end-to-end test's (each test writes
    to its own user: the stack is shared by the module)."""
    return [str(u.user_id) for u in stack.ds.users if 10 < len(u) <= 20]


def _open(page, url: str, user: str) -> None:
    """Open the console on `user` (#user= in the address) and wait until its answers are rendered."""
    with page.expect_response(re.compile(r"/v1/recommend$")):
        page.goto(f"{url}/#user={user}")
    page.wait_for_selector("body[data-state=ready]", state="attached")


def _scores(page) -> dict[int, float]:
    rows = page.locator("[data-testid=rec-row]")
    return {int(rows.nth(i).get_attribute("data-item")): float(rows.nth(i).get_by_test_id("score").inner_text())
            for i in range(rows.count())}


def _act(page, button: str) -> None:
    """Click a write action and wait until it is answered (and the user re-ranked, when it succeeded)."""
    page.evaluate("document.body.removeAttribute('data-action')")
    page.click(button)
    page.wait_for_selector("body[data-action=done], body[data-action=error]", state="attached")


def _fresh_scrape(page) -> None:
    """Wait until the page has read /metrics again after this point."""
    seen = int(page.get_attribute("body", "data-scrapes") or 0)
    page.wait_for_function(f"Number(document.body.dataset.scrapes || 0) > {seen}")


def test_post_event_and_roll_history(stack: WebStack, page, tmp_path):
    user = _users_with_room(stack)[-1]
    _open(page, stack.url, user)
    before = _scores(page)
    assert page.inner_text("#history-version") == "1"
    assert page.get_by_test_id("delta").all_inner_texts() == [""] * K  # nothing to compare with yet

    # clicking a recommendation picks its item; posting it makes the next ranking reuse the cached prefix
    picked = page.locator("[data-testid=rec-row]").nth(2)
    item = int(picked.get_attribute("data-item"))
    picked.click()
    assert page.input_value("#event-item") == str(item)
    page.select_option("#event-action", "5")
    with page.expect_response(re.compile(r"/v1/events$")) as posted:
        _act(page, "#post-event")
    assert posted.value.status == 200 and page.get_attribute("body", "data-action") == "done"
    assert posted.value.request.post_data_json == {"user": user, "events": [{"item": item, "action": 5}]}
    assert "real-time event" in page.inner_text("#action-note")
    assert page.inner_text("#cache") == "partial"
    first = page.get_by_test_id("history-row").first
    assert first.get_attribute("data-item") == str(item) and first.locator(".stars").get_attribute("title") == "5 / 5"
    assert "real-time events\n1" in page.inner_text("#profile")
    after = _scores(page)
    assert item not in after, "an item the user has just rated is not recommended again"
    common = before.keys() & after.keys()
    assert common and max(abs(after[i] - before[i]) for i in common) > 1e-4, "the new event moves the scores"
    for row in page.locator("[data-testid=rec-row]").all():  # each row shows its change since the last ranking
        i, text = int(row.get_attribute("data-item")), row.get_by_test_id("delta").inner_text()
        if i in before:
            assert float(text.replace("−", "-")) == pytest.approx(after[i] - before[i], abs=2e-3)
        else:
            assert text == "new"
    page.screenshot(path=str(tmp_path / "after_event.png"), full_page=True)

    # a roll folds the event into a new history version: the old K/V are void
    _act(page, "#roll-history")
    assert "Rolled 1 real-time event" in page.inner_text("#action-note")
    assert page.inner_text("#history-version") == "2" and page.inner_text("#cache") == "miss"
    # nothing left to fold: the version stays and the cached K/V are used whole
    _act(page, "#roll-history")
    assert page.inner_text("#action-note") == "Nothing to roll: no real-time events; history version stays 2."
    assert page.inner_text("#history-version") == "2" and page.inner_text("#cache") == "hit"

    # a wrong item is the server's 422, shown beside the action
    page.fill("#event-item", str(NUM_ITEMS + 50))
    _act(page, "#post-event")
    assert page.get_attribute("body", "data-action") == "error"
    assert page.inner_text("#action-note").startswith("Error 422") and page.is_hidden("#api-key-row")
    assert JS_ERRORS == [] and FOREIGN_REQUESTS == []


def test_api_key_for_writes(stack: WebStack, page):
    with BackgroundServer(create_app(AppState(stack.service, stack.metrics, api_key="s3cret"))) as url:
        user = _users_with_room(stack)[-2]
        _open(page, url, user)
        assert page.is_hidden("#api-key-row")
        page.locator("[data-testid=rec-row]").first.click()
        with page.expect_response(re.compile(r"/v1/events$")) as refused:
            _act(page, "#post-event")
        assert refused.value.status == 401
        assert page.is_visible("#api-key") and "needs an API key" in page.inner_text("#action-note")
        page.fill("#api-key", "s3cret")
        with page.expect_response(re.compile(r"/v1/events$")) as accepted:
            _act(page, "#post-event")
        assert accepted.value.status == 200 and accepted.value.request.headers["x-api-key"] == "s3cret"
        assert page.inner_text("#cache") == "partial"
        page.reload()  # the key is kept for the tab's session
        page.wait_for_selector("body[data-users=loaded]", state="attached")
        assert page.input_value("#api-key") == "s3cret" and page.is_visible("#api-key")
        assert JS_ERRORS == [] and FOREIGN_REQUESTS == []


def _expected_live(text: str) -> dict:
    """What the page's tiles must show, from a /metrics page parsed by prometheus_client's own parser."""
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    named = lambda name: [v for (n, _), v in values.items() if n == name]
    kv = {k: sum(named(f"grinfer_kv_cache_{k}_total") or named(f"grinfer_kv_cache_{k}"))
          for k in ("hits", "partial_hits", "misses")}
    backends = {dict(labels)["backend"] for (n, labels) in values if n == "grinfer_request_seconds_count"}
    return {"kv": (kv["hits"] + kv["partial_hits"]) / sum(kv.values()), "kv_counts": kv,
            "queue": sum(named("grinfer_queue_depth")), "memory": sum(named("grinfer_device_memory_bytes")),
            "backends": backends}


def test_live_state_reads_metrics(stack: WebStack, page):
    user = _users_with_room(stack)[0]
    _open(page, stack.url, user)
    for _ in range(3):  # a few more API requests inside the page's 30 s window
        with page.expect_response(re.compile(r"/v1/recommend$")):
            page.click("#refresh")
        page.wait_for_selector("body[data-state=ready]", state="attached")
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text  # nothing ranks from here on: the counters stay
    want = _expected_live(text)
    c = want["kv_counts"]
    expect(page.locator("#live-kv-detail")).to_have_text(  # within a scrape or two (every 2 s)
        f"{c['hits']:.0f} hit · {c['partial_hits']:.0f} partial · {c['misses']:.0f} miss", timeout=10_000)
    live = lambda name: page.get_attribute(f"#live-{name}", "data-value")
    assert float(live("kv")) == pytest.approx(want["kv"])
    assert float(live("queue")) == want["queue"] == 0
    assert float(live("memory")) == want["memory"] > 0
    assert re.fullmatch(r"\d+\.\d (KiB|MiB|GiB)", page.inner_text("#live-memory"))
    assert want["backends"] == {"eager"} and page.inner_text("#live-backend") == "eager"
    assert float(live("rps")) > 0 and 0 < float(live("p99")) <= 10
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", page.inner_text("#live-p99"))

    # the page's parser reads every sample as prometheus_client's parser does
    parsed = page.evaluate("(text) => parseMetrics(text).map((s) => [s.name, s.labels, String(s.value)])", text)
    ours = {(n, tuple(sorted(labels.items()))): float(v.replace("Infinity", "inf")) for n, labels, v in parsed}
    theirs = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert ours == theirs and any("{user}" in dict(k[1]).get("endpoint", "") for k in ours)
    # histogram quantiles as Prometheus computes them (linear inside a bucket; +Inf: the last finite bound)
    q = lambda qq, buckets: page.evaluate(f"histogramQuantile({qq}, {buckets})")
    assert q(0.99, "[[0.01, 50], [0.025, 99], [0.05, 100], [Infinity, 100]]") == pytest.approx(0.025)
    assert q(0.5, "[[0.01, 50], [0.025, 99], [0.05, 100], [Infinity, 100]]") == pytest.approx(0.01)
    assert q(0.75, "[[0.01, 50], [0.02, 100], [Infinity, 100]]") == pytest.approx(0.015)
    assert q(0.99, "[[0.01, 10], [0.02, 10], [Infinity, 20]]") == pytest.approx(0.02)
    assert q(0.99, "[[0.01, 0], [Infinity, 0]]") is None
    assert JS_ERRORS == [] and FOREIGN_REQUESTS == []


def _check_fits(page, width: int) -> None:
    """No horizontal scrolling, no box past the right edge, tables within their cards."""
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow} px of horizontal overflow at {width} px"
    boxes = page.evaluate("""[...document.querySelectorAll('.card, .tile, .bar, .stats, header, table')]
        .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5).map((e) => e.id || e.className)""")
    assert boxes == [], f"boxes past the right edge at {width} px"
    for selector in ("#recs", "#history"):  # tables fit their card: no hidden columns
        assert page.evaluate(f"(() => {{ const t = document.querySelector('{selector}');"
                             f" return t.scrollWidth <= t.parentElement.clientWidth + 1; }})()"), selector


@pytest.mark.parametrize("width", [1280, 400])
def test_layout_fits_the_window(stack: WebStack, page, tmp_path, width):
    page.set_viewport_size({"width": width, "height": 900})
    _open(page, stack.url, _users_with_room(stack)[1])
    _check_fits(page, width)
    _fresh_scrape(page)  # the live tiles filled in
    _check_fits(page, width)
    assert page.locator("[data-testid=rec-row]").count() == K
    assert page.is_visible("#post-event") and page.is_visible("#live-p99")
    page.screenshot(path=str(tmp_path / f"console_{width}.png"), full_page=True)
    assert JS_ERRORS == [] and FOREIGN_REQUESTS == []


def test_docs_render_offline(stack: WebStack, page):
    """Swagger UI (/docs) renders every operation from assets the server itself serves; no /redoc (its page
    fetches a logo from a CDN)."""
    spec = httpx.get(f"{stack.url}/openapi.json", timeout=10).json()
    operations = [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]
    page.goto(stack.url + "/docs")
    page.wait_for_selector(".opblock", state="visible")
    shown = [(b.locator(".opblock-summary-method").inner_text(), b.locator(".opblock-summary-path").inner_text())
             for b in page.locator(".opblock").all()]
    assert sorted(shown) == sorted(operations) and len(operations) >= 8
    page.locator(".opblock-summary", has_text="/v1/rank").first.click()  # expand: the request schema renders
    page.wait_for_selector(".opblock-body .model-example, .opblock-body .body-param", state="visible")
    assert page.title() == "grinfer - Swagger UI"
    assert JS_ERRORS == [] and FOREIGN_REQUESTS == [], "the docs must not fetch anything but their own server"
    assert httpx.get(f"{stack.url}/redoc", timeout=10).status_code == 404


def test_not_ready_is_shown_until_ready(stack: WebStack, page):
    """While /readyz answers 503 the header says why; once it answers 200 the page shows the model instead."""
    state = AppState(stack.service, stack.metrics, draining=True)
    with BackgroundServer(create_app(state)) as url:
        page.goto(url + "/")
        page.wait_for_selector("body[data-users=loaded]", state="attached")
        assert page.inner_text("#not-ready") == "not ready: server is shutting down"
        assert page.inner_text("#error-status") == "Error 503" and page.inner_text("#model-name") == ""
        state.draining = False
        page.wait_for_selector("#not-ready", state="hidden", timeout=10_000)  # /readyz is asked again every 2 s
        assert page.inner_text("#model-name") == "model mtgr-tiny"
        expect(page.locator("#users-total")).to_have_text(f"{NUM_USERS} of {NUM_USERS} users")  # list read again
        assert page.is_hidden("#error")
    assert JS_ERRORS == [] and FOREIGN_REQUESTS == []
