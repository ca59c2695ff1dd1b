"""`entroflow view` on the demo's training traces, driven in Debian's Chromium through Selenium:
open, switch step, open a response, filter by entropy, search, sort, export CSV (checked against
the data layer), and a screenshot under the test's tmp dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from entroflow.viewer.data import EntropySource
from entroflow.viewer.render import token_view

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trace_dir(request) -> Path:
    """The session demo run's trace; ENTROFLOW_VIEWER_TRACE=<dir> points at an existing one
    instead (quick iteration on the viewer without the 15-minute demo)."""
    if os.environ.get("ENTROFLOW_VIEWER_TRACE"):
        return Path(os.environ["ENTROFLOW_VIEWER_TRACE"])
    return request.getfixturevalue("demo_run").work / "results/runs/demo/trace"


@pytest.fixture(scope="module")
def server(trace_dir):
    pytest.importorskip("dash", reason="the viewer extra (dash) is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "entroflow"), "view", str(trace_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"entroflow view exited: {proc.stdout.read()}")
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("entroflow view did not start within 60 s")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (make test installs them as root)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,2400",
    ):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 (element not there yet / stale while Dash re-renders)
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def click_cell(driver, table: str, row: int, column: str) -> None:
    cell = f'#{table} td[data-dash-row="{row}"][data-dash-column="{column}"]'
    wait_for(lambda: driver.find_element("css selector", cell), what=cell).click()


def set_input(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", element_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(value, Keys.ENTER)  # inputs are debounced: Enter commits


def table_rows(driver, table: str) -> list[dict[str, str]]:
    headers = [
        h.text.strip() for h in driver.find_elements("css selector", f"#{table} th.dash-header")
    ]
    rows = []
    for tr in driver.find_elements("css selector", f"#{table} tbody tr"):
        cells = [td.text for td in tr.find_elements("css selector", "td")]
        if cells:
            rows.append(dict(zip(headers, cells, strict=False)))
    return rows


@pytest.mark.workflow
def test_viewer_in_a_real_browser(server, browser, trace_dir, tmp_path):
    source = EntropySource(trace_dir)
    steps = source.steps()
    driver = browser
    driver.get(server)
    wait_for(lambda: len(table_rows(driver, "steps-table")) >= 3, what="the step list")
    first = int(steps["step"].iloc[0])
    wait_for(lambda: text_of(driver, "step-title").startswith(f"step {first}:"), what="step 1")

    # Switch step: the third row of the step list.
    step = int(steps["step"].iloc[2])
    click_cell(driver, "steps-table", 2, "step")
    wait_for(lambda: text_of(driver, "step-title").startswith(f"step {step}:"), what="step switch")
    responses = source.responses(step)
    assert f"{len(responses)} responses" in text_of(driver, "step-title")

    # Open a response; the prompt and an unfiltered view (the default hides nothing).
    click_cell(driver, "responses-table", 1, "response")
    wait_for(lambda: text_of(driver, "response-title") == f"step {step} · response 1")
    tokens = source.tokens(step, 1)
    wait_for(
        lambda: text_of(driver, "view-count").startswith(f"{len(tokens)} of {len(tokens)} tokens"),
        what="the unfiltered token count",
    )
    assert text_of(driver, "prompt") == source.prompt(step, 1)
    frame = driver.find_element("id", "heatmap")
    driver.switch_to.frame(frame)
    spans = driver.find_elements("css selector", "span.t")
    assert len(spans) == len(tokens)
    assert spans[0].get_attribute("title").startswith(f"pos 0 · id {tokens['token_id'][0]} · H = ")
    driver.switch_to.default_content()

    # Filter by entropy, search, sort; the table follows, the CSV export equals the data layer.
    set_input(driver, "h-min", "0.05")
    kept = token_view(tokens, 0.05)
    assert 0 < len(kept) < len(tokens)
    wait_for(lambda: text_of(driver, "view-count").startswith(f"{len(kept)} of {len(tokens)}"))
    needle = kept["token"].str.strip().replace("", np.nan).dropna().mode()[0]
    set_input(driver, "search", needle)
    found = token_view(tokens, 0.05, search=needle)
    wait_for(lambda: f"matching '{needle}'" in text_of(driver, "view-count"), what="search")
    assert text_of(driver, "view-count").startswith(f"{len(found)} of {len(tokens)}")
    driver.find_element("css selector", "#sort input[value='entropy-desc']").click()
    expected = token_view(tokens, 0.05, search=needle, sort="entropy-desc")
    wait_for(
        lambda: (
            table_rows(driver, "tokens-table")[0]["position"] == str(expected["position"].iloc[0])
        ),
        what="sorted table",
    )
    driver.find_element("id", "export").click()
    csv = wait_for(lambda: list(driver.downloads.glob("*.csv")), what="the CSV download")[0]
    exported = pd.read_csv(csv)
    assert csv.name == f"step{step}_response1_tokens.csv"
    assert exported["position"].tolist() == expected["position"].tolist()
    np.testing.assert_allclose(exported["entropy"], expected["entropy"], rtol=1e-6)
    assert (exported["entropy"] >= 0.05).all()
    assert exported["token"].astype(str).str.contains(needle, regex=False).all()

    # Top-K and the word cloud of the step.
    high, _ = source.extreme_tokens(step, 20)
    top_row = table_rows(driver, "top-high")[0]
    assert float(top_row["entropy"]) == pytest.approx(high["entropy"][0], rel=1e-3)
    assert driver.find_element("id", "wordcloud").get_attribute("src").startswith("data:image/png")

    shot = tmp_path / "viewer.png"
    driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
