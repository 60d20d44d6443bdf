"""The web chat page in a real browser (headless Chromium driven by selenium) against a live server."""

import shutil
import time
from pathlib import Path

import httpx
import pytest

from .server_fixtures import start

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "Debian's chromium and chromium-driver are not installed (`make test` installs them where apt runs)"
    return None


@pytest.fixture(scope="module")
def live():
    server, served = start(api_key="sesame")
    yield server, served
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1100,800"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _generated_tokens(url: str) -> float:
    with httpx.Client(base_url=url, timeout=10, headers={"authorization": "Bearer sesame"}) as c:
        text = c.get("/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("herd_generation_tokens_total ")))


def _wait(predicate, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_page_is_served_and_root_still_answers_clients(live):
    url = live[0].url
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/").text == "Ollama is running"  # what Ollama clients probe, no key needed
        r = c.get("/", headers={"accept": "text/html,application/xhtml+xml"})
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        page = c.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace("http-equiv", "")  # no CDN: nothing loaded from elsewhere
        assert c.get("/ui/app.js").status_code == 200 and c.get("/ui/style.css").status_code == 200
        assert c.get("/ui/secret.py").status_code == 404
        assert c.get("/v1/models").status_code == 401  # the API stays guarded


def test_chat_in_the_browser_streams_stops_and_is_kept(live, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url = live[0].url
    browser.get(url + "/")  # a browser at the root lands on the page
    assert browser.current_url.endswith("/ui/")
    # The key is needed for the API: the page says so, then lists the model once it is given.
    _wait(lambda: browser.find_element(By.ID, "notice").is_displayed(), what="the API-key notice")
    browser.find_element(By.ID, "api-key").send_keys("sesame")
    _wait(lambda: [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")] == ["tiny-llama3"],
          what="the model picker")

    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")
    # Model output is text, never markup: a prompt with HTML is shown literally in the user's bubble too.
    browser.find_element(By.ID, "input").send_keys("Hello <b>there</b>")
    browser.find_element(By.ID, "send").click()
    done = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"), what="the first reply")
    reply = done[0]
    assert reply.find_element(By.CSS_SELECTOR, ".body").text.strip(), "no streamed text"
    assert "tokens/s" in reply.find_element(By.CSS_SELECTOR, ".stats").text
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user .body")
    assert user.text == "Hello <b>there</b>" and not user.find_elements(By.TAG_NAME, "b")

    # A long reply, stopped while it streams: the text stops growing, the reply says it was stopped, and the
    # server stops generating (the aborted fetch closes the stream; the engine drops the request).
    generated_before = _generated_tokens(url)
    max_tokens.clear()
    max_tokens.send_keys("1900")
    browser.find_element(By.ID, "input").send_keys("Write a long story")
    browser.find_element(By.ID, "send").click()
    _wait(lambda: browser.find_element(By.ID, "stop").is_displayed(), what="the stop button")
    streaming = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming"), what="streaming")[0]
    _wait(lambda: len(streaming.find_element(By.CSS_SELECTOR, ".body").text) > 20, what="streamed text")
    browser.find_element(By.ID, "stop").click()
    _wait(lambda: browser.find_element(By.ID, "send").is_displayed(), what="the send button back")
    second = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert second.find_element(By.CSS_SELECTOR, ".stats").text.startswith("stopped")
    before = second.find_element(By.CSS_SELECTOR, ".body").text
    time.sleep(0.5)
    assert second.find_element(By.CSS_SELECTOR, ".body").text == before
    with httpx.Client(base_url=url, timeout=10, headers={"authorization": "Bearer sesame"}) as c:
        _wait(lambda: c.get("/health").json()["running"] == 0, what="the engine to drop the stopped request")
    assert _generated_tokens(url) - generated_before < 1900

    # Conversations survive a reload (localStorage), and the page is usable at phone width.
    browser.set_window_size(390, 844)
    browser.refresh()
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4, what="the restored conversation")
    composer = browser.find_element(By.ID, "composer")
    assert composer.rect["x"] + composer.rect["width"] <= 390 + 1 and browser.find_element(By.ID, "input").is_displayed()
    assert not browser.find_element(By.ID, "sidebar").is_displayed() or \
        browser.find_element(By.ID, "sidebar").rect["x"] < 0
    browser.set_window_size(1100, 800)
    shot = tmp_path / "web-chat.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# A bounded city name: the random tiny model ends the constrained call only where the schema makes it.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string", "maxLength": 12}},
                                                            "required": ["city"], "additionalProperties": False}}}


def test_tool_calls_are_shown(live, browser):
    """Tools from the settings go with the request; the streamed tool call is shown as a call, not as text."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(live[0].url + "/ui/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    # Without a key the page opens its settings and asks for one.
    _wait(lambda: browser.find_element(By.ID, "api-key").is_displayed(), what="the settings asking for the key")
    browser.find_element(By.ID, "api-key").send_keys("sesame")
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), what="the model picker")
    tools = browser.find_element(By.ID, "tools")
    tools.send_keys("[not json")
    browser.find_element(By.ID, "input").send_keys("Weather in Paris?")
    browser.find_element(By.ID, "send").click()
    assert "Tools is not valid JSON" in browser.find_element(By.ID, "notice").text
    assert browser.find_element(By.ID, "input").get_attribute("value") == "Weather in Paris?"  # kept, not sent
    tools.clear()
    tools.send_keys(json.dumps([WEATHER]))
    Select(browser.find_element(By.ID, "tool_choice")).select_by_visible_text("required")
    for field, value in (("max_tokens", "150"), ("temperature", "0.7")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "send").click()
    # The first request with a tool grammar compiles it over the 128K vocabulary (tens of seconds here).
    done = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"), timeout=180,
                 what="the reply")[0]
    call = done.find_element(By.CSS_SELECTOR, ".tool-call").text
    assert call.startswith("tool call: get_weather(") and isinstance(json.loads(call[len("tool call: get_weather("):-1])["city"], str)


def test_markdown_from_the_model_is_rendered_without_html_injection(live, browser):
    """The page's renderer on hostile model output: code blocks and emphasis become elements, HTML stays text."""
    from selenium.webdriver.common.by import By

    browser.get(live[0].url + "/ui/")
    hostile = ("# Title\n**bold** and `code` <img src=x onerror=\"window.pwned=1\">\n"
               "```python\nprint('<script>window.pwned=2</script>')\n```\n- item [link](javascript:alert(1))")
    browser.execute_script("""
        const box = document.getElementById('messages');
        const node = document.createElement('div'); node.id = 'probe'; box.appendChild(node);
        renderMarkdown(arguments[0], node);""", hostile)
    probe = browser.find_element(By.ID, "probe")
    assert probe.find_element(By.TAG_NAME, "strong").text == "bold"
    assert probe.find_element(By.CSS_SELECTOR, "pre code.language-python").text == "print('<script>window.pwned=2</script>')"
    assert not probe.find_elements(By.TAG_NAME, "img") and not probe.find_elements(By.TAG_NAME, "script")
    assert not probe.find_elements(By.CSS_SELECTOR, "a[href^='javascript']")
    assert browser.execute_script("return window.pwned === undefined")


@pytest.mark.slow
def test_screenshot_of_the_default_model_in_the_page(browser, tmp_path_factory):
    """The README's screenshot (docs/web-chat.png): the default model answering in the page, as served."""
    from selenium.webdriver.common.by import By

    from llamaherd import load, store
    from llamaherd.server import ServedModel

    from .server_fixtures import LiveServer

    pytest.importorskip(store.PACKAGED[store.DEFAULT_MODEL].module, reason="install llamaherd[models]")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMAHERD_HOME", str(tmp_path_factory.mktemp("herd")))
    try:
        path = store.default_model(progress=lambda *_: None)
    finally:
        mp.undo()
    server = LiveServer(ServedModel(load(path), store.DEFAULT_MODEL, kv_cache_bytes=64 << 20))
    try:
        browser.get(server.url + "/ui/")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), what="the model picker")
        browser.find_element(By.ID, "toggle-settings").click()
        for field, value in (("temperature", "0"), ("max_tokens", "48")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "input").send_keys("List the planets of the solar system, in order from the Sun.")
        browser.find_element(By.ID, "send").click()
        done = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"), timeout=120,
                     what="the default model's reply")[0]
        assert done.find_element(By.CSS_SELECTOR, ".body").text.strip()
        assert "tokens/s" in done.find_element(By.CSS_SELECTOR, ".stats").text
        browser.find_element(By.ID, "toggle-settings").click()  # settings closed: the conversation in view
        DOCS.mkdir(exist_ok=True)
        browser.save_screenshot(str(DOCS / "web-chat.png"))
    finally:
        server.stop()
