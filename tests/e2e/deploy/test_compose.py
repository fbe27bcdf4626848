"""The production-shaped stack as far as this machine can take it without a Docker engine:
`docker-compose config` validates docker-compose.yml, every variable it gives the app is one the
app reads, every command it runs exists, and its set-up scripts run for real where they can."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import make_url
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from core.temporal import client_connect_config
from tests.conftest import ROOT, installed_binary

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = ("migrate", "api", "worker")
EXPECTED_SERVICES = {
    "postgresql",
    "temporal-admin-tools",
    "temporal",
    "temporal-setup",
    "temporal-ui",
    "mailpit",
    "migrate",
    "api",
    "worker",
    "prometheus",
    "grafana",
}
# Read by temporalio.envconfig (the SDK's environment configuration), not by our Settings.
TEMPORAL_ENVCONFIG_VARIABLES = {
    "TEMPORAL_ADDRESS",
    "TEMPORAL_NAMESPACE",
    "TEMPORAL_API_KEY",
    "TEMPORAL_TLS",
    "TEMPORAL_TLS_CLIENT_CERT_PATH",
    "TEMPORAL_TLS_CLIENT_CERT_DATA",
    "TEMPORAL_TLS_CLIENT_KEY_PATH",
    "TEMPORAL_TLS_CLIENT_KEY_DATA",
    "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
    "TEMPORAL_TLS_SERVER_CA_CERT_DATA",
    "TEMPORAL_TLS_SERVER_NAME",
    "TEMPORAL_TLS_DISABLE_HOST_VERIFICATION",
    "TEMPORAL_PROFILE",
    "TEMPORAL_CONFIG_FILE",
}


# The tests that run docker-compose: CI must run them (tests/conftest.py).
NEEDS_COMPOSE = pytest.mark.ci_must_run


def docker_compose() -> str:
    """The docker-compose binary; a test that needs it is marked NEEDS_COMPOSE, so with CI set a
    missing one fails the run (.ci/run installs the Debian package docker-compose)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    return binary


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    # A clean environment: the shell's variables would win over the env file in interpolation.
    return subprocess.run(
        [docker_compose(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose resolves it with the example .env."""
    result = run_compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"][name]
    return found


@NEEDS_COMPOSE
def test_compose_file_validates_and_has_the_production_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == EXPECTED_SERVICES


@NEEDS_COMPOSE
def test_compose_refuses_to_render_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_compose_config(empty)
    assert result.returncode != 0
    assert re.search(r"set [A-Z_]+ in \.env", result.stderr), result.stderr


@NEEDS_COMPOSE
def test_app_services_run_in_production_mode_on_postgresql(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        environment = service(compose, name)["environment"]
        assert environment["ORDERFLOW_ENV"] == "production"
        url = make_url(environment["DATABASE_URL"])
        assert url.drivername == "postgresql+asyncpg"
        assert url.host == "postgresql"
        assert environment["TEMPORAL_ADDRESS"] == "temporal:7233"
        assert environment["SMTP_HOST"] == "mailpit"


@NEEDS_COMPOSE
def test_every_variable_given_to_the_app_is_one_it_reads(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in APP_SERVICES:
        environment: dict[str, str] = service(compose, name)["environment"]
        unknown = {
            variable
            for variable in environment
            if variable not in Settings.model_fields
            and variable not in TEMPORAL_ENVCONFIG_VARIABLES
            and not variable.startswith("OTEL_")
        }
        assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"
        # And the values parse: the settings load from exactly this environment.
        for variable in list(os.environ):
            if variable in Settings.model_fields or variable.startswith("TEMPORAL_"):
                monkeypatch.delenv(variable)
        for variable, value in environment.items():
            monkeypatch.setenv(variable, str(value))
        settings = Settings()
        assert settings.ORDERFLOW_ENV == "production"
        assert environment["DATABASE_URL"] == settings.DATABASE_URL
        assert client_connect_config(settings)["target_host"] == "temporal:7233"


def _console_scripts() -> set[str]:
    return {script.name for script in entry_points(group="console_scripts")}


def _runtime_files() -> set[str]:
    """What the Dockerfile's last stage copies into its working directory."""
    runtime = DOCKERFILE.read_text().split("\nFROM ")[-1]
    files: set[str] = set()
    for line in runtime.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _target = line.split()[1:]
            files.update(sources)
    return files


@NEEDS_COMPOSE
def test_every_command_the_app_services_run_exists(compose: dict[str, Any]) -> None:
    scripts = _console_scripts()
    runtime_files = _runtime_files()
    for name in APP_SERVICES:
        command: list[str] = service(compose, name)["command"]
        program = command[0]
        if program == "python":
            script = command[1]
            assert (ROOT / script).is_file() and script in runtime_files, command
            assert callable(import_module(Path(script).stem).main)
            continue
        assert program in scripts, f"{name}: {program} is not an installed console script"
        if program == "uvicorn":
            module, _, attribute = command[1].partition(":")
            assert hasattr(import_module(module), attribute), command
        if program == "alembic":
            assert {"alembic.ini", "migrations"} <= runtime_files


@NEEDS_COMPOSE
def test_the_migrate_command_migrates_a_database(tmp_path: Path, compose: dict[str, Any]) -> None:
    command: list[str] = service(compose, "migrate")["command"]
    database = tmp_path / "migrated.db"
    result = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:]],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{database}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Running upgrade" in result.stderr and database.stat().st_size > 0


@NEEDS_COMPOSE
def test_start_up_order_is_enforced_by_depends_on_conditions(compose: dict[str, Any]) -> None:
    def conditions(name: str) -> dict[str, str]:
        depends: dict[str, dict[str, str]] = service(compose, name).get("depends_on", {})
        return {dependency: spec["condition"] for dependency, spec in depends.items()}

    done = "service_completed_successfully"
    assert conditions("temporal-admin-tools") == {"postgresql": "service_healthy"}
    assert conditions("temporal") == {"temporal-admin-tools": done}
    assert conditions("temporal-setup") == {"temporal": "service_healthy"}
    assert conditions("migrate") == {"postgresql": "service_healthy"}
    for app in ("api", "worker"):
        assert conditions(app)["migrate"] == done
        assert conditions(app)["temporal-setup"] == done
    # A service_healthy condition needs a healthcheck on the service it waits for.
    for name in compose["services"]:
        for dependency, condition in conditions(name).items():
            if condition == "service_healthy":
                assert "healthcheck" in service(compose, dependency), dependency


@NEEDS_COMPOSE
def test_two_workers_and_nothing_published_beyond_loopback(compose: dict[str, Any]) -> None:
    assert service(compose, "worker")["deploy"]["replicas"] == 2
    assert "ports" not in service(compose, "postgresql")
    published = {name: spec.get("ports", []) for name, spec in compose["services"].items()}
    assert published["temporal"] and published["temporal-ui"]
    for name, ports in published.items():
        for port in ports:
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond the host"


@NEEDS_COMPOSE
def test_worker_replicas_follow_worker_processes(tmp_path: Path) -> None:
    env_file = tmp_path / "three-workers.env"
    env_file.write_text(f"{ENV_EXAMPLE.read_text()}\nWORKER_PROCESSES=3\n")
    result = run_compose_config(env_file)
    assert result.returncode == 0, result.stderr
    rendered: dict[str, Any] = yaml.safe_load(result.stdout)
    assert service(rendered, "worker")["deploy"]["replicas"] == 3
    # Every app service reads it too, so a count below 1 stops the stack at migrate instead of
    # running no worker.
    for name in APP_SERVICES:
        assert service(rendered, name)["environment"]["WORKER_PROCESSES"] == "3"


@NEEDS_COMPOSE
def test_mounted_set_up_files_exist_and_scripts_parse(compose: dict[str, Any]) -> None:
    mounted = 0
    for name, spec in compose["services"].items():
        for volume in spec.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if not source.startswith("/"):
                continue  # a named volume
            path = Path(source)
            assert path.exists(), f"{name} mounts {source}, which is not in the repository"
            mounted += 1
            if path.suffix == ".sh":
                assert os.access(path, os.X_OK), path
                check = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
                assert check.returncode == 0, check.stderr
    assert mounted >= 4


def test_dockerfile_is_multi_stage_and_runs_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, flags=re.MULTILINE)
    assert len(stages) >= 2, stages
    runtime = text.split("\nFROM ")[-1]
    users = re.findall(r"^USER (\S+)$", runtime, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    # Every package pyproject installs is in the build context the Dockerfile copies.
    for package in ("api", "core", "workflows", "activities", "devsinks"):
        assert f"COPY {package} ./{package}" in text
    assert {"alembic.ini", "worker.py", "migrations"} <= _runtime_files()
    cmd = re.findall(r"^CMD (.+)$", runtime, flags=re.MULTILINE)[-1]
    assert '"uvicorn", "api.main:app"' in cmd
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".env", ".git"} <= set(ignored)


async def _set_up_namespace(
    env: WorkflowEnvironment, namespace: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    binaries = Path(installed_binary("temporal")).parent
    result = await asyncio.to_thread(
        subprocess.run,
        ["sh", str(ROOT / "deploy/temporal/setup-namespace.sh")],
        env={
            "PATH": f"{binaries}{os.pathsep}{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "TEMPORAL_NAMESPACE": namespace,
            **extra,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


async def _retention(env: WorkflowEnvironment, namespace: str) -> timedelta:
    described = await env.client.workflow_service.describe_namespace(
        DescribeNamespaceRequest(namespace=namespace)
    )
    return described.config.workflow_execution_retention_ttl.ToTimedelta()


async def test_set_up_script_registers_order_status_on_a_real_server(
    env: WorkflowEnvironment,
) -> None:
    """deploy/temporal/setup-namespace.sh (compose service temporal-setup) against the session's
    dev server, with a namespace of its own: created, and OrderStatus registered as Keyword."""
    namespace = f"setup-{uuid.uuid4().hex[:10]}"
    for _ in range(2):  # a second run (a restarted stack) must succeed too
        await _set_up_namespace(env, namespace)
    assert await _retention(env, namespace) == timedelta(days=30), "the documented default"
    listed = await env.client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    assert listed.custom_attributes["OrderStatus"] == IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD


async def test_set_up_script_sets_the_retention_of_a_namespace_that_exists(
    env: WorkflowEnvironment,
) -> None:
    """A namespace created before (by hand, or by an earlier deploy with another retention) is
    brought to TEMPORAL_NAMESPACE_RETENTION, not left as it was."""
    namespace = f"setup-{uuid.uuid4().hex[:10]}"
    await _set_up_namespace(env, namespace, TEMPORAL_NAMESPACE_RETENTION="3d")
    assert await _retention(env, namespace) == timedelta(days=3)
    await _set_up_namespace(env, namespace, TEMPORAL_NAMESPACE_RETENTION="45d")
    assert await _retention(env, namespace) == timedelta(days=45)


@pytest.fixture
def postgres_admin_url() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.skip("PostgreSQL only: set TEST_DATABASE_URL (.ci/run does)")
    yield url


def test_postgres_init_script_creates_the_app_role_and_database(postgres_admin_url: str) -> None:
    """deploy/postgres/init-orderflow.sh, run as the postgres image runs it, on this machine's
    server with names of its own."""
    admin = make_url(postgres_admin_url)
    suffix = uuid.uuid4().hex[:8]
    role, database = f"orderflow_app_{suffix}", f"orderflow_app_{suffix}"
    connection = {
        "PGHOST": admin.host or "127.0.0.1",
        "PGPORT": str(admin.port or 5432),
        "PATH": os.environ["PATH"],
    }
    psql = ["psql", "-U", admin.username or "postgres", "-d", "postgres", "-tAc"]
    try:
        subprocess.run(
            ["sh", str(ROOT / "deploy/postgres/init-orderflow.sh")],
            env={
                **connection,
                "POSTGRES_USER": admin.username or "postgres",
                "ORDERFLOW_DB_USER": role,
                "ORDERFLOW_DB_NAME": database,
                "ORDERFLOW_DB_PASSWORD": "it's a 'quoted' secret",
            },
            check=True,
            capture_output=True,
            timeout=60,
        )
        owner = subprocess.run(
            [
                *psql,
                f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{database}'",
            ],
            env=connection,
            check=True,
            capture_output=True,
            text=True,
        )
        assert owner.stdout.strip() == role
    finally:
        for statement in (f'DROP DATABASE IF EXISTS "{database}"', f'DROP ROLE IF EXISTS "{role}"'):
            subprocess.run([*psql, statement], env=connection, capture_output=True)
