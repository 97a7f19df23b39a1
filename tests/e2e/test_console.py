"""The web console in a real browser (Debian's headless Chromium) against a real secured stack:
it asks for a token, shows the pipeline at v1, follows a deploy the test makes (v2, with the
swap and each engine's stage in the timeline), shows live requests/s while the test sends
requests, and its rollback button swaps back to v1 for real. Screenshots are kept."""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import hotswap
from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import control_pb2_grpc as cg
from hotswap.v1 import engine_pb2 as e
from hotswap.v1 import engine_pb2_grpc as eg
from tests._artifacts import artifacts_dir
from tests.e2e import _api
from tests.e2e._console import ADMIN, ALICE, WS, secured_stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DEADLINE = 30.0


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[LocalStack]:
    with secured_stack(tmp_path) as stack:
        yield stack


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, chromedriver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1400",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


@dataclass
class Load:
    """1-row Infer requests with Alice's token, until stopped: the versions that answered."""

    address: str
    body: bytes
    served: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        stub: Any = eg.EngineStub(grpc.insecure_channel(self.address))  # type: ignore[arg-type]
        request = e.InferRequest(workspace=WS, pipeline="p", arrow=self.body)
        while not self.stop.is_set():
            try:
                answer = stub.Infer(request, metadata=(("authorization", f"Bearer {ALICE}"),),
                                    timeout=10)  # fmt: skip
                self.served.append(answer.pipeline_version)
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            self.stop.wait(0.005)


def _wait(driver: Any, what: str, check: Callable[[Any], Any], deadline: float = DEADLINE) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def safe(d: Any) -> Any:
        try:
            return check(d)
        except StaleElementReferenceException:  # re-rendered between find and read
            return False

    try:
        return WebDriverWait(driver, deadline, poll_frequency=0.05).until(safe)
    except Exception:
        shot = artifacts_dir("console") / "failed.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"the console never showed {what} (screenshot {shot})") from None


def _css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def _serving(driver: Any, version: int) -> bool:
    row = _css(driver, f'tr[data-pipeline="{WS}/p"][data-serving-version="{version}"]')
    header = _css(driver, f'#deployed-version[data-serving-version="{version}"]')
    return bool(row and header and header[0].is_displayed())


def _swap_listed(driver: Any, kind: str, before: int, after: int) -> bool:
    rows = _css(driver, f'#swaps tr[data-kind="{kind}"][data-from="{before}"]'
                        f'[data-to="{after}"][data-outcome="ok"]')  # fmt: skip
    if not rows:
        return False
    stages = rows[0].find_elements("css selector", 'li[data-engine="engine-1"]')
    return bool(stages) and stages[0].get_attribute("data-stage") == "committed"


def _swapping(driver: Any, version: int) -> bool:
    box = _css(driver, f'#swap-in-progress[data-target-version="{version}"]')
    stage = _css(driver, '#swap-stages li[data-engine="engine-1"][data-stage="preparing"]')
    return bool(box and box[0].is_displayed() and stage)


def _rate(driver: Any, version: int) -> float:
    rows = _css(driver, f'#rates tr[data-rate-version="{version}"]')
    return float(rows[0].get_attribute("data-requests-per-second")) if rows else 0.0


def _shot(driver: Any, name: str, shots: list[Path]) -> None:
    path = artifacts_dir("console") / name
    driver.save_screenshot(str(path))
    shots.append(path)


def test_console_follows_a_swap_shows_traffic_and_rolls_back(
    secured: LocalStack, browser: Any, assets: Path
) -> None:
    admin = hotswap.Client(secured.control_address, token=ADMIN)
    admin.create_workspace(WS)
    wl = hotswap.Client(secured.control_address, token=ALICE)
    wl.set_current_workspace(wl.get_workspace(WS))
    rf = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
    gbr = wl.upload_model("gbr", assets / "models" / "gbr_model.onnx")
    pipeline = wl.build_pipeline("p").add_model_step(rf).deploy()  # v1
    shots: list[Path] = []

    browser.get(secured.console_url)
    _wait(
        browser,
        "the token prompt",
        lambda d: "needs a token" in d.find_element("id", "notice").text,
    )
    _shot(browser, "01-asks-for-a-token.png", shots)
    browser.find_element("id", "token").send_keys(ALICE)
    browser.find_element("id", "token-save").click()
    _wait(browser, "the pipeline at v1", lambda d: _serving(d, 1))
    _shot(browser, "02-serving-v1.png", shots)

    load = Load(
        secured.engine_addresses[0],
        _api.ipc_stream(_api.tensor_table(np.ones((1, 18), np.float32))),
    )
    sender = threading.Thread(target=load.run, daemon=True)
    sender.start()
    try:
        # The engine is held still (SIGSTOP) so the swap stays in its prepare phase long
        # enough for the page to show it: the deploy to v2 runs while the page watches.
        secured.kill("engine-1", signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            try:
                deploying = pool.submit(pipeline.replace_with_model_step(0, gbr).deploy)
                _wait(browser, "the swap to v2, engine-1 preparing", lambda d: _swapping(d, 2),
                      deadline=4)  # fmt: skip
                _shot(browser, "03-swapping-to-v2.png", shots)
            finally:
                secured.kill("engine-1", signal.SIGCONT)
            deploying.result(timeout=DEADLINE)
        _wait(browser, "the pipeline at v2", lambda d: _serving(d, 2))
        _wait(
            browser,
            "the swap 1 -> 2 with engine-1 committed",
            lambda d: _swap_listed(d, "deploy", 1, 2),
        )
        _shot(browser, "04-swapped-to-v2.png", shots)
        _wait(browser, "live requests/s of v2", lambda d: _rate(d, 2) > 0)
        _shot(browser, "05-live-traffic.png", shots)

        button = _wait(browser, "a roll back to v1 button",
                       lambda d: _css(d, 'button[data-rollback="1"]'))[0]  # fmt: skip
        assert button.text == "Roll back to v1"
        button.click()
        _wait(browser, "the pipeline back at v1", lambda d: _serving(d, 1))
        _wait(browser, "the rollback 2 -> 1", lambda d: _swap_listed(d, "rollback", 2, 1))
        _shot(browser, "06-rolled-back-to-v1.png", shots)
    finally:
        load.stop.set()
        sender.join(timeout=15)
    print("console screenshots:", *(str(s) for s in shots), sep="\n  ")

    # The rollback was a real Deploy through the API, by Alice, through the console.
    control: Any = cg.ControlPlaneStub(grpc.insecure_channel(secured.control_address))  # type: ignore[arg-type]
    auth = (("authorization", f"Bearer {ALICE}"),)
    status = control.GetPipelineStatus(
        c.GetPipelineStatusRequest(workspace=WS, pipeline="p"), metadata=auth
    )
    assert status.deployed.number == 1
    [latest, *_] = control.ListSwaps(
        c.ListSwapsRequest(workspace=WS, pipeline="p"), metadata=auth
    ).swaps
    assert (latest.kind, latest.version_after, latest.requested_by) == (
        "rollback",
        1,
        "alice (console)",
    )
    engine: Any = eg.EngineStub(grpc.insecure_channel(secured.engine_addresses[0]))  # type: ignore[arg-type]
    answer = engine.Infer(
        e.InferRequest(workspace=WS, pipeline="p", arrow=load.body), metadata=auth, timeout=10
    )
    assert answer.pipeline_version == 1 and [m.name for m in answer.models] == ["rf"]
    # Not one request failed across both swaps, and both versions answered some.
    assert load.failures == []
    assert {1, 2} <= set(load.served)
    # The page broke none of its own policy (inline code, other hosts).
    violations = [
        x["message"]
        for x in browser.get_log("browser")
        if "Content Security Policy" in x["message"]
    ]
    assert violations == []
