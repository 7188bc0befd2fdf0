"""docker-compose.yml: the production-like stack's services and wiring."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from handoff.cli import load_agents
from handoff.constants import SEARCH_ATTRIBUTES
from handoff.examples import ALL_AGENTS
from handoff.server import search_attribute_args
from tests.support import ROOT

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _waits_for(service: dict, other: str, condition: str) -> bool:
    return service.get("depends_on", {}).get(other, {}).get("condition") == condition


def test_temporal_starts_after_schema_setup_on_postgres(services):
    assert "postgresql" in services
    assert _waits_for(services["temporal-setup-schema"], "postgresql", "service_healthy")
    assert _waits_for(services["temporal"], "temporal-setup-schema", "service_completed_successfully")
    assert services["temporal"]["environment"]["DB"] == "postgres12"
    assert not any("auto-setup" in s.get("image", "") for s in services.values()), "auto-setup is deprecated"
    setup = "\n".join(services["temporal-setup-schema"]["command"])
    for schema in ("temporal", "visibility"):
        assert f"/etc/temporal/schema/postgresql/v12/{schema}/versioned" in setup


def test_namespace_setup_registers_every_search_attribute(services):
    script = "\n".join(services["temporal-setup-namespace"]["command"])
    registered = [arg for arg in search_attribute_args() if arg != "--search-attribute"]
    assert len(registered) == len(SEARCH_ATTRIBUTES)
    for name_and_type in registered:  # the same names and types `handoff server` registers
        assert name_and_type in script


def test_every_example_agent_has_a_worker_service_on_temporal(services):
    worker_services = {name: s for name, s in services.items() if s.get("command", [None])[0] == "worker"}
    assert worker_services["chain-worker"]["command"] == ["worker", "--chains"]
    served = {}
    for name, service in worker_services.items():
        assert service["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
        assert _waits_for(service, "temporal-setup-namespace", "service_completed_successfully")
        if "--agent" in service["command"]:
            spec = service["command"][service["command"].index("--agent") + 1]
            for agent in load_agents(spec):
                served[agent.id] = name
    assert set(served) == {a.id for a in ALL_AGENTS}
    assert services["auditor"]["deploy"]["replicas"] == 2


def test_ui_points_at_the_server(services):
    ui = services["temporal-ui"]
    assert ui["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert "${TEMPORAL_UI_PUBLISH_ADDRESS:-127.0.0.1}:8080:8080" in ui["ports"]


def test_the_server_and_the_ui_publish_on_loopback_only(services):
    """Neither has authentication in this stack: nothing listens beyond this host by default."""
    for name in ("temporal", "temporal-ui"):
        for port in services[name]["ports"]:
            assert port.startswith("${") and ":-127.0.0.1}:" in port, (name, port)


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose (Debian's v1) is not installed: `apt-get install docker-compose`")
def test_docker_compose_config_validates():
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
