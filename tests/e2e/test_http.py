"""Wallaroo's HTTP formats at ``pipeline.url()``, through curl: pandas-records JSON and Arrow
files in and out, the tutorial's numbers, and a hot swap under HTTP load that fails nothing."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pytest

import hotswap
from hotswap.clients._stack import LocalStack
from tests.e2e import _api

RECORDS = "application/json; format=pandas-records"
ARROW = "application/vnd.apache.arrow.file"


@pytest.fixture
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


def _curl(curl: str, url: str, content_type: str, body: Path, out: Path) -> dict[str, str]:
    """POSTs `body` as curl does in the README; the answer goes to `out`; returns headers."""
    done = subprocess.run(
        [
            curl,
            "-sS",
            "--fail-with-body",
            "-D",
            "-",
            "-o",
            str(out),
            "-X",
            "POST",
            url,
            "-H",
            f"Content-Type: {content_type}",
            "--data-binary",
            f"@{body}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + out.read_text(errors="replace")
    lines = done.stdout.splitlines()[1:]
    fields = (line.partition(":") for line in lines if ":" in line)
    return {name.lower(): value.strip() for name, _, value in fields}


def test_curl_gets_the_tutorials_numbers_at_pipeline_url(
    stack: LocalStack, assets: Path, xtest: np.ndarray, curl: str, tmp_path: Path
) -> None:
    client = hotswap.Client(stack.control_address)
    client.set_current_workspace(client.get_workspace("housing", create_if_not_exist=True))
    models = {
        m: client.upload_model(m, assets / "models" / f"{m}_model.onnx") for m in ("rf", "gbr")
    }
    pipeline = client.build_pipeline("houseprice").add_model_step(models["rf"]).deploy()
    url = pipeline.url()
    assert (
        url == f"http://{stack.http_address('engine-1')}/v1/api/pipelines/infer/housing/houseprice"
    )

    for number, model in enumerate(("rf", "gbr"), start=1):
        if number == 2:
            pipeline.replace_with_model_step(0, models["gbr"]).deploy()
        expected = _api.reference(
            assets / "models" / f"{model}_model.onnx", xtest.astype(np.float32)
        )

        out = tmp_path / f"{model}.json"
        headers = _curl(curl, url, RECORDS, assets / "data" / "xtest-1k.df.json", out)
        assert headers["content-type"] == "application/json"
        assert headers["x-hotswap-pipeline-version"] == str(number)
        assert json.loads(headers["x-hotswap-models"])[0]["name"] == model
        rows = json.loads(out.read_text())
        assert len(rows) == len(xtest)
        assert set(rows[0]) == {"time", "in", "out", "check_failures", "metadata"}
        assert rows[0]["in"]["tensor"] == pytest.approx(xtest[0].tolist())
        assert json.loads(rows[0]["metadata"]["last_model"])["model_name"] == model
        got = np.asarray([row["out"]["variable"] for row in rows], np.float32)
        np.testing.assert_array_equal(got, expected)

        out = tmp_path / f"{model}.arrow"
        headers = _curl(curl, url, ARROW, assets / "data" / "xtest-1k.arrow", out)
        assert headers["content-type"] == ARROW
        assert headers["x-hotswap-pipeline-version"] == str(number)
        table = pa.ipc.open_file(out.read_bytes()).read_all()
        assert table.column_names == ["time", "in.tensor", "out.variable", "check_failures"]
        got = np.asarray(table.column("out.variable").combine_chunks().flatten(), np.float32)
        np.testing.assert_array_equal(got.reshape(-1, 1), expected)


def test_a_hot_swap_under_http_load_fails_nothing(stack: LocalStack, assets: Path) -> None:
    client = hotswap.Client(stack.control_address)
    client.set_current_workspace(client.get_workspace("housing", create_if_not_exist=True))
    rf = client.upload_model("rf", assets / "models" / "rf_model.onnx")
    gbr = client.upload_model("gbr", assets / "models" / "gbr_model.onnx")
    pipeline = client.build_pipeline("houseprice").add_model_step(rf).deploy()
    target = urlsplit(pipeline.url())
    row = json.loads((assets / "data" / "xtest-1.df.json").read_text())
    x = np.asarray(row[0]["tensor"], np.float32).reshape(1, 18)
    value = {
        str(n): float(_api.reference(assets / "models" / f"{m}_model.onnx", x)[0, 0])
        for n, m in ((1, "rf"), (2, "gbr"))
    }
    body = json.dumps(row).encode()
    stop = threading.Event()
    seen: dict[str, int] = {}
    failures: list[str] = []
    mixed: list[str] = []
    lock = threading.Lock()
    first = threading.Barrier(5)

    def load() -> None:
        connection = http.client.HTTPConnection(target.netloc, timeout=10)  # kept alive
        waiting = True
        for _ in range(20_000):  # bounded; the swap ends it far sooner
            if stop.is_set():
                break
            connection.request("POST", target.path, body, {"Content-Type": RECORDS})
            response = connection.getresponse()
            data = response.read()
            with lock:
                if response.status != 200:
                    failures.append(f"{response.status}: {data[:200]!r}")
                    continue
                version = response.getheader("x-hotswap-pipeline-version", "")
                got = json.loads(data)[0]["out"]["variable"][0]
                seen[version] = seen.get(version, 0) + 1
                if got != pytest.approx(value[version], rel=1e-6):
                    mixed.append(f"version {version} answered {got}")
            if waiting:
                waiting = False
                first.wait(timeout=10)
        connection.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    first.wait(timeout=10)  # every thread has an answer from version 1
    pipeline.replace_with_model_step(0, gbr).deploy()
    _api.until(lambda: seen.get("2", 0) >= 50, "50 answers from version 2")
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    assert failures == []
    assert mixed == []
    assert seen["1"] > 0
    assert seen["2"] >= 50
