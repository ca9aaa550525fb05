"""gRPC server reflection on a real router process: what grpcurl/Postman/Evans rely on."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.fixtures.processes import ProcessFactory


def test_router_lists_and_describes_its_services(procs: ProcessFactory) -> None:
    router = procs.router([])
    with grpc.insecure_channel(router.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "snakepit.bridge.v1.BridgeService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        # A client with no .proto resolves the whole API, down to the request messages.
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("snakepit.bridge.v1.BridgeService")
        methods = {m.name: m for m in service.methods}
        assert {"ExecuteTool", "ExecuteStreamingTool", "GetPoolStatus"} <= set(methods)
        request = methods["ExecuteTool"].input_type
        assert [f.name for f in request.fields][:3] == ["tool_name", "arguments", "session_id"]
