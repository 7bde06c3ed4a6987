"""grpc.health.v1 for the server: NOT_SERVING while the model loads and warms up, SERVING once the
engine runs, NOT_SERVING for good once shutdown begins — for "" (the whole server) and for each of
our service names, so load balancers and `grpc_health_probe -service=...` agree.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loraplex.api.pb.loraplex.v1 import adapters_pb2, generation_pb2

SERVICE_NAMES = (
    "",  # the server as a whole
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)


class Health:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._shutting_down = False

    def add_to_server(self, server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_serving(self, serving: bool) -> None:
        if self._shutting_down:
            return  # shutdown is final
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in SERVICE_NAMES:
            await self.servicer.set(name, status)

    async def begin_shutdown(self) -> None:
        # Sets NOT_SERVING everywhere and ignores any later set(): no flip back during shutdown.
        self._shutting_down = True
        await self.servicer.enter_graceful_shutdown()
