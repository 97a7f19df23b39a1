"""SDK objects without a server: status shaping, renderings, config builder, the package."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

import hotswap
from hotswap.clients._channels import Channels
from hotswap.clients._deploy import DeployResult, status_dict
from hotswap.clients._model import Model, ModelList
from hotswap.clients._pipeline_version import PipelineVersion, PipelineVersionList
from hotswap.clients._render import format_cell, grid_text, kv_html
from hotswap.v1 import control_pb2, types_pb2

SHA = "e22a0831aafd9917f3cc87a15ed267797f80e2afa12ad7d8810ca58f173b8cc6"


@pytest.fixture
def session() -> Iterator[Channels]:
    # A channel is lazy: nothing connects unless an RPC is made.
    s = Channels("127.0.0.1:1")
    yield s
    s.close()


def _model_version(name: str = "housing-rf", version: str = "v-1") -> types_pb2.ModelVersion:
    return types_pb2.ModelVersion(
        workspace="ws",
        name=name,
        version=version,
        sha256=SHA,
        size_bytes=225_818,
        inputs=[types_pb2.TensorSpec(name="float_input", type="tensor(float)", shape=[-1, 18])],
        outputs=[types_pb2.TensorSpec(name="variable", type="tensor(float)", shape=[-1, 1])],
        created_ms=1_700_000_000_000,
        framework="onnx",
    )


def test_status_has_the_tutorial_shape() -> None:
    proto = control_pb2.PipelineStatus(
        workspace="ws",
        pipeline="hotswappipeline",
        status="Running",
        replicas=1,
        engines=[
            control_pb2.EngineStatus(
                name="engine-1",
                address="10.0.0.7:50052",
                status="Running",
                serving_version=3,
                models=[
                    control_pb2.ModelStatus(
                        name="housing-rf", version="v-1", sha256=SHA, status="Running"
                    )
                ],
                last_seen_ms=1,
            )
        ],
    )
    assert status_dict(proto) == {
        "status": "Running",
        "details": [],
        "engines": [
            {
                "ip": "10.0.0.7",
                "address": "10.0.0.7:50052",
                "name": "engine-1",
                "status": "Running",
                "reason": None,
                "details": [],
                "pipeline_statuses": {
                    "pipelines": [{"id": "hotswappipeline", "status": "Running", "version": 3}]
                },
                "model_statuses": {
                    "models": [
                        {"name": "housing-rf", "version": "v-1", "sha": SHA, "status": "Running"}
                    ]
                },
            }
        ],
        "rates": [],
    }


def test_status_carries_details_and_reasons() -> None:
    proto = control_pb2.PipelineStatus(
        status="Error",
        details="engine-2: model housing-rf: sha256 mismatch",
        engines=[control_pb2.EngineStatus(name="engine-2", address="[::1]:7", status="Error",
                                          reason="sha256 mismatch")],
    )  # fmt: skip
    status = status_dict(proto)
    assert status["details"] == ["engine-2: model housing-rf: sha256 mismatch"]
    assert status["engines"][0]["reason"] == "sha256 mismatch"
    assert status["engines"][0]["ip"] == "::1"


def test_status_carries_live_rates_per_version() -> None:
    rate = control_pb2.VersionRate(
        number=2, requests_per_second=12.5, errors_per_second=0.5, mean_latency_ms=0.8, engines=2
    )
    assert status_dict(control_pb2.PipelineStatus(rates=[rate]))["rates"] == [
        {"version": 2, "requests_per_second": 12.5, "errors_per_second": 0.5,
         "mean_latency_ms": 0.8, "engines": 2}
    ]  # fmt: skip


def test_model_renders_in_a_terminal_and_in_jupyter(session: Channels) -> None:
    model = Model(session, _model_version())
    assert (model.name(), model.version(), model.sha()) == ("housing-rf", "v-1", SHA)
    assert model.inputs()[0].shape == (-1, 18)
    text = repr(model)
    assert "housing-rf" in text and SHA in text and "2023-11-14 22:13:20 UTC" in text
    html = model._repr_html_()
    assert html.startswith("<table>") and "<th>SHA</th>" in html


def test_configure_binds_columns_by_position(session: Channels) -> None:
    model = Model(session, _model_version())
    assert model.configure(tensor_fields=["features"]) is model
    assert model.column_renames() == {"features": "tensor"}
    assert model.configure(tensor_fields=["tensor"]).column_renames() == {}
    with pytest.raises(hotswap.InvalidInputError, match="1 input"):
        model.configure(tensor_fields=["a", "b"])


def test_lists_render_as_tables(session: Channels) -> None:
    models = ModelList([Model(session, _model_version(), 2)])
    assert "# of Versions" in repr(models)
    assert "<td>housing-rf</td>" in models._repr_html_()
    version = types_pb2.PipelineVersion(
        pipeline="p", version_id="pv-1", number=1, steps=[_model_version()], created_ms=1
    )
    versions = PipelineVersionList([PipelineVersion(session, version)], deployed=1)
    lines = repr(versions).splitlines()
    assert lines[0].split() == ["Version", "Id", "Created", "Steps", "Deployed"]
    assert "housing-rf" in lines[2] and "True" in lines[2]
    assert "<th>Deployed</th>" in versions._repr_html_()


def test_html_is_escaped() -> None:
    assert "&lt;script&gt;" in kv_html([("name", "<script>")])


def test_cells_shorten_long_lists() -> None:
    assert format_cell([1.0] * 18) == "[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, … (18 items)]"
    assert grid_text(["a"], [[None]]).split("\n")[-1] == ""


def test_deployment_config_builder() -> None:
    builder = hotswap.DeploymentConfigBuilder().replica_count(2)
    # Wallaroo's resource options are accepted, and say they are not applied.
    with pytest.warns(hotswap.HotswapWarning, match=r"cpus\(1\).*not applied"):
        builder.cpus(1)
    with pytest.warns(hotswap.HotswapWarning, match="memory.*not applied"):
        builder.memory("1Gi")
    assert builder.build().replicas == 2
    with pytest.raises(hotswap.InvalidInputError):
        hotswap.DeploymentConfigBuilder().replica_count(0)


def test_deploy_result_from_proto() -> None:
    resp = control_pb2.DeployResponse(
        version=types_pb2.PipelineVersion(number=2, version_id="pv-2"),
        previous=types_pb2.PipelineVersion(number=1),
        engines=[control_pb2.EngineSwapTiming(engine="e", prepare_ms=9.5, commit_ms=0.8)],
        prepare_ms=10.0,
        commit_ms=1.0,
        total_ms=12.0,
    )
    result = DeployResult.from_proto(resp, wall_ms=15.0)
    assert (result.version, result.previous, result.wall_ms) == (2, 1, 15.0)
    assert result.engines[0].prepare_ms == 9.5


def test_public_names_resolve() -> None:
    for name in hotswap.__all__:
        assert getattr(hotswap, name) is not None
    with pytest.raises(AttributeError):
        _ = hotswap.NoSuchThing


def test_importing_hotswap_is_light() -> None:
    code = (
        "import sys, hotswap; assert 'pyarrow' not in sys.modules and 'grpc' not in sys.modules;"
        "hotswap.Client; assert 'pandas' not in sys.modules, 'pandas imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
