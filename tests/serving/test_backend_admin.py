"""`--backend auto` through the real server's assembly: the probe table and the backend chain reach
GET /v1/admin/backends and /metrics, and the chosen backend serves. (The probe is limited to fast
backends here; the CPU's `compiled` probe compiles for minutes on 2 cores.)"""

from __future__ import annotations

import asyncio

import httpx

from grinfer.config import ServerConfig
from grinfer.serving.app import create_app
from grinfer.serving.server import build_server


def test_auto_probes_chooses_and_reports(served_checkpoint, tmp_path, monkeypatch):
    import grinfer.engine.probe as probe

    monkeypatch.setattr(probe, "available_backends", lambda device: ["eager", "baseline"])
    cfg = ServerConfig(home=str(tmp_path / "home"), store=f"sqlite:///{tmp_path / 'g.db'}", engine={"backend": "auto"},
                       grpc_port=0)
    server = build_server(cfg, served_checkpoint, "cpu")
    try:
        app = create_app(server.state)

        async def calls():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
                return (await http.get("/v1/admin/backends")).json(), (await http.get("/metrics")).text

        admin, metrics = asyncio.run(calls())
    finally:
        server.close()
    probes = {p["backend"]: p for p in admin["probes"]}
    assert set(probes) == {"eager", "baseline"} and all(p["healthy"] for p in probes.values())
    fastest = min(probes.values(), key=lambda p: p["probe_ms"])["backend"]
    assert admin["configured"] == "auto" and admin["primary"] == fastest == admin["active"]
    assert admin["chain"][-1]["backend"] == "baseline" and admin["fallbacks"] == []
    assert f'grinfer_backend_active{{backend="{fastest}"}} 1.0' in metrics
    for name, p in probes.items():
        assert f'grinfer_backend_info{{backend="{name}",healthy="true",probe_ms="{p["probe_ms"]:.2f}"}} 1.0' \
            in metrics
