"""ListPipelineVersions comes a page at a time; the SDK reads every page."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

import hotswap
from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api


def test_versions_are_paged_and_the_sdk_reads_them_all(tmp_path: Path, assets: Path) -> None:
    with LocalStack(tmp_path / "s", engines=0) as stack:
        stub = _api.control(stack.control_address)
        stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS))
        for name in ("rf", "gbr"):
            _api.upload(stub, name, (assets / "models" / f"{name}_model.onnx").read_bytes())
        stub.CreatePipeline(c.CreatePipelineRequest(workspace=_api.WS, name="p"))
        for i in range(7):
            _api.new_version(stub, "p", "rf" if i % 2 else "gbr")

        def page(size: int, token: str = "") -> c.ListPipelineVersionsResponse:
            return stub.ListPipelineVersions(  # type: ignore[no-any-return]
                c.ListPipelineVersionsRequest(
                    workspace=_api.WS, pipeline="p", page_size=size, page_token=token
                )
            )

        first = page(3)
        assert [v.number for v in first.versions] == [1, 2, 3] and first.next_page_token
        second = page(3, first.next_page_token)
        third = page(3, second.next_page_token)
        assert [v.number for v in [*second.versions, *third.versions]] == [4, 5, 6, 7]
        assert third.next_page_token == ""
        for bad in ({"size": 5000}, {"size": 2, "token": "x"}):
            with pytest.raises(grpc.RpcError) as excinfo:
                page(bad["size"], str(bad.get("token", "")))  # type: ignore[arg-type]
            assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        client = hotswap.Client(stack.control_address)
        client.set_current_workspace(_api.WS)
        assert [v.number() for v in client.get_pipeline("p").versions()] == list(range(1, 8))
