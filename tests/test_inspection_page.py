"""The HTML inspect page in a real browser: headless Chromium (Debian's chromium + chromium-driver, which
./dev and .ci/run install when root) driven with selenium. The page of ResNet-18 after
``sparse_lowrank,lower_int8`` loads without console errors, search finds a module by its path, clicking the
result shows its formula, and the cost table sorts. A screenshot is written to tests/artifacts/."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision

import fxreduce as fr
from fxreduce import meta

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1440,1000")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="no Chromium here: ./dev and .ci/run install Debian's chromium and chromium-driver "
                              "when run as root with apt-get; elsewhere install them to run this test"),
    pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot is not installed (the page embeds its SVG)"),
]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    model = torchvision.models.resnet18().eval()
    gm = fr.trace(model, (torch.randn(2, 3, 224, 224),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    result = fr.apply(gm, "sparse_lowrank,lower_int8")
    path = tmp_path_factory.mktemp("page") / "resnet18-diff.html"
    return fr.inspect(gm, result.graph_module, at={"N": 1}, report=result.report).write(path)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="fxreduce-chromium-")
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_page_works_in_chromium(page, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page.as_uri())
    wait = WebDriverWait(browser, 20)
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#graph svg g.node")))
    assert "sparse_lowrank, lower_int8" in browser.find_element(By.ID, "title").text

    search = browser.find_element(By.ID, "search")
    search.send_keys("layer3.0.conv1")
    first = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#search-results li[data-index]")))
    assert "layer3_0_conv1" in first.text
    first.click()
    name = wait.until(ready.presence_of_element_located((By.ID, "detail-name"))).text
    assert name.startswith("layer3_0_conv1")
    formula = browser.find_element(By.ID, "detail-formula").text
    assert "ceil(H/16)" in formula and "ceil(W/16)" in formula and "floor" not in formula
    assert "lower_int8" in browser.find_element(By.ID, "details").text
    search.send_keys(Keys.ESCAPE)

    header = browser.find_element(By.CSS_SELECTOR, '#cost-table th[data-key="flops_after"]')
    browser.execute_script("arguments[0].scrollIntoView()", header)
    header.click()
    header = browser.find_element(By.CSS_SELECTOR, '#cost-table th[data-key="flops_after"]')
    assert header.get_attribute("aria-sort") == "descending"
    cells = browser.find_elements(By.CSS_SELECTOR, "#cost-table tbody td.num:nth-child(5)")
    values = [float(cell.get_attribute("data-value")) for cell in cells]
    assert len(values) > 40 and values == sorted(values, reverse=True) and values[0] > values[-1]

    browser.execute_script("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "inspect-resnet18.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_a_large_diff_draws_unchanged_runs_collapsed_and_still_finds_every_node(browser, tmp_path):
    """1,500 nodes, 7 rewritten: the SVG holds a box per run, and search still reaches a node inside one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from fxreduce.cost_models import NodeCost, NodeInfo
    from test_inspection import synthetic

    before, after = synthetic(1500), synthetic(1500)
    for node in list(after.graph.nodes)[100:1400:200]:
        meta.mark_rewritten(node, "zero")
        node.meta[meta.INFO] = NodeInfo(meta.shape(node), torch.float32, NodeCost())
    page = fr.inspect(before, after).write(tmp_path / "large.html")
    browser.get(page.as_uri())
    wait = WebDriverWait(browser, 30)
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#graph svg g.node")))
    drawn = len(browser.find_elements(By.CSS_SELECTOR, "#graph svg g.node"))
    assert drawn < 100
    browser.find_element(By.ID, "search").send_keys("relu_700")
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#search-results li[data-index]"))).click()
    details = wait.until(ready.presence_of_element_located((By.ID, "details"))).text
    assert "relu_700" in details and "collapsed run" in details
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
