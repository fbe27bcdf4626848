"""Temporal beyond the dev server: connection settings through the SDK's environment
configuration (temporalio.envconfig), and TLS / mTLS for real through a TLS-terminating proxy in
front of the session's dev server (the dev server itself has no TLS option)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.service import RPCError, TLSConfig
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from core.temporal import client_connect_config, connect_temporal
from devsinks.smtp import MailSink
from devsinks.warehouse import WarehouseReceiver
from tests.conftest import api_client, running_worker
from tests.support import new_key, order_body, wait_until

SERVER_NAME = "temporal.orderflow.test"
TEMPORAL_VARIABLES = (
    "TEMPORAL_ADDRESS",
    "TEMPORAL_NAMESPACE",
    "TEMPORAL_API_KEY",
    "TEMPORAL_TLS",
    "TEMPORAL_TLS_CLIENT_CERT_PATH",
    "TEMPORAL_TLS_CLIENT_KEY_PATH",
    "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
    "TEMPORAL_TLS_SERVER_NAME",
    "TEMPORAL_PROFILE",
    "TEMPORAL_CONFIG_FILE",
)


@pytest.fixture
def temporal_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No Temporal variable from the caller's shell, and no config file from its home."""
    for name in TEMPORAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    return monkeypatch


# --- what the connect config carries -----------------------------------------------------------


def test_defaults_are_the_local_dev_server(temporal_env: pytest.MonkeyPatch) -> None:
    config = client_connect_config(Settings())
    assert config == {"target_host": "localhost:7233", "namespace": "default"}


def test_temporal_cloud_with_an_api_key(temporal_env: pytest.MonkeyPatch) -> None:
    temporal_env.setenv("TEMPORAL_ADDRESS", "eu-west-1.aws.api.temporal.io:7233")
    temporal_env.setenv("TEMPORAL_NAMESPACE", "shop-prod.a1b2c")
    temporal_env.setenv("TEMPORAL_API_KEY", "cloud-api-key")

    config = client_connect_config(Settings())

    assert config["target_host"] == "eu-west-1.aws.api.temporal.io:7233"
    assert config["namespace"] == "shop-prod.a1b2c"
    assert config["api_key"] == "cloud-api-key"
    assert config["tls"] is True  # an API key implies TLS with the system's roots


def test_temporal_cloud_with_mtls_client_certificates(
    temporal_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(b"client certificate bytes")
    key.write_bytes(b"client key bytes")
    temporal_env.setenv("TEMPORAL_ADDRESS", "shop-prod.a1b2c.tmprl.cloud:7233")
    temporal_env.setenv("TEMPORAL_NAMESPACE", "shop-prod.a1b2c")
    temporal_env.setenv("TEMPORAL_TLS_CLIENT_CERT_PATH", str(cert))
    temporal_env.setenv("TEMPORAL_TLS_CLIENT_KEY_PATH", str(key))

    config = client_connect_config(Settings())

    tls = config["tls"]
    assert isinstance(tls, TLSConfig)
    assert tls.client_cert == b"client certificate bytes"
    assert tls.client_private_key == b"client key bytes"
    assert "api_key" not in config


def test_a_profile_from_the_config_file_is_not_clobbered_by_our_defaults(
    temporal_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file = tmp_path / "temporal.toml"
    config_file.write_text(
        "[profile.default]\n"
        'address = "localhost:7233"\n'
        "[profile.cloud]\n"
        'address = "shop.a1b2c.tmprl.cloud:7233"\n'
        'namespace = "shop.a1b2c"\n'
        'api_key = "profile-key"\n'
        "[profile.cloud.tls]\n"
        f'server_name = "{SERVER_NAME}"\n'
    )
    temporal_env.setenv("TEMPORAL_CONFIG_FILE", str(config_file))
    temporal_env.setenv("TEMPORAL_PROFILE", "cloud")

    config = client_connect_config(Settings())

    assert config["target_host"] == "shop.a1b2c.tmprl.cloud:7233"
    assert config["namespace"] == "shop.a1b2c"
    assert config["api_key"] == "profile-key"
    tls = config["tls"]
    assert isinstance(tls, TLSConfig) and tls.domain == SERVER_NAME

    # A variable set in the environment wins over the profile, as the SDK documents...
    temporal_env.setenv("TEMPORAL_NAMESPACE", "shop-staging.a1b2c")
    assert client_connect_config(Settings())["namespace"] == "shop-staging.a1b2c"
    # ...and so does a value the code passes to Settings explicitly (the tests do).
    explicit = client_connect_config(Settings(TEMPORAL_ADDRESS="127.0.0.1:7999"))
    assert explicit["target_host"] == "127.0.0.1:7999"
    assert explicit["api_key"] == "profile-key"


def test_an_unknown_profile_fails_loudly(temporal_env: pytest.MonkeyPatch) -> None:
    temporal_env.setenv("TEMPORAL_PROFILE", "no-such-profile")
    with pytest.raises(Exception, match="no-such-profile"):
        client_connect_config(Settings())


# --- TLS for real --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for SERVER_NAME and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=orderflow test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    leaves = {
        "server": f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth\n",
        "client": "subjectAltName=DNS:orderflow-worker\nextendedKeyUsage=clientAuth\n",
    }
    for name, extensions in leaves.items():
        (directory / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n" + extensions
        )
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


@dataclass
class TlsProxy:
    """Terminates TLS on a loopback port and relays the plaintext gRPC stream to the dev server."""

    upstream: tuple[str, int]
    context: ssl.SSLContext
    port: int = 0
    # One entry per completed handshake: the client certificate's subject, if it sent one.
    handshakes: list[str | None] = field(default_factory=list)
    _relays: set[asyncio.Task[None]] = field(default_factory=set)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        self.handshakes.append(str(peer["subject"]) if peer else None)
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        relays = [
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ]
        self._relays.update(relays)
        try:
            await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for relay in relays:
                relay.cancel()
                self._relays.discard(relay)
            for stream in (writer, up_writer):
                stream.close()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[TlsProxy]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for relay in list(self._relays):
                relay.cancel()
            await asyncio.gather(*self._relays, return_exceptions=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()


def _server_context(pki: Pki, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.set_alpn_protocols(["h2"])  # gRPC speaks HTTP/2
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


def _upstream(env: WorkflowEnvironment) -> tuple[str, int]:
    host, _, port = env.client.service_client.config.target_host.rpartition(":")
    return host, int(port)


def _tls_settings(settings: Settings, proxy: TlsProxy) -> Settings:
    return settings.model_copy(update={"TEMPORAL_ADDRESS": proxy.address})


async def _order_completes_through(
    tls_settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
    warehouse: WarehouseReceiver,
) -> None:
    """The API and a worker, both connected only through the TLS proxy, finish an order."""
    client = await connect_temporal(tls_settings)
    async with (
        running_worker(client, tls_settings, sessions),
        api_client(tls_settings) as api,
    ):
        body = order_body()
        response = await api.post("/orders", json=body, headers={"Idempotency-Key": new_key()})
        assert response.status_code == 202, response.text
        order_id = response.json()["order_id"]
        await wait_until(
            lambda: _order_status(api, order_id, "completed"), within=30, message="completed"
        )
    assert len(mail.to(body["customer_email"])) == 1
    assert len(warehouse.deliveries_for(order_id)) == 1


async def _order_status(api: httpx.AsyncClient, order_id: str, status: str) -> bool:
    response = await api.get(f"/orders/{order_id}")
    return bool(response.json()["status"] == status)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
async def test_an_order_runs_through_tls_configured_by_environment_variables(
    mutual: bool,
    temporal_env: pytest.MonkeyPatch,
    pki: Pki,
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    mail: MailSink,
    warehouse: WarehouseReceiver,
) -> None:
    proxy = TlsProxy(_upstream(env), _server_context(pki, require_client_cert=mutual))
    async with proxy.serving():
        temporal_env.setenv("TEMPORAL_TLS_SERVER_CA_CERT_PATH", str(pki.ca))
        temporal_env.setenv("TEMPORAL_TLS_SERVER_NAME", SERVER_NAME)
        if mutual:
            temporal_env.setenv("TEMPORAL_TLS_CLIENT_CERT_PATH", str(pki.client_cert))
            temporal_env.setenv("TEMPORAL_TLS_CLIENT_KEY_PATH", str(pki.client_key))
        await _order_completes_through(_tls_settings(settings, proxy), sessions, mail, warehouse)
    assert proxy.handshakes
    if mutual:
        assert all(subject is not None and "client" in subject for subject in proxy.handshakes)
    else:
        assert all(subject is None for subject in proxy.handshakes)


async def test_tls_refuses_a_server_it_cannot_verify_and_mtls_a_client_without_a_cert(
    temporal_env: pytest.MonkeyPatch, pki: Pki, env: WorkflowEnvironment, settings: Settings
) -> None:
    async def connects(tls_settings: Settings) -> bool:
        try:
            client = await asyncio.wait_for(connect_temporal(tls_settings), timeout=20)
            await client.service_client.check_health(timeout=None)
        except (RuntimeError, RPCError, TimeoutError):
            return False
        return True

    one_way = TlsProxy(_upstream(env), _server_context(pki, require_client_cert=False))
    async with one_way.serving():
        # TLS on, but the server's CA is not trusted (system roots only): no connection.
        temporal_env.setenv("TEMPORAL_TLS", "true")
        temporal_env.setenv("TEMPORAL_TLS_SERVER_NAME", SERVER_NAME)
        assert not await connects(_tls_settings(settings, one_way))
        # The right CA but the wrong name: no connection either.
        temporal_env.setenv("TEMPORAL_TLS_SERVER_CA_CERT_PATH", str(pki.ca))
        temporal_env.setenv("TEMPORAL_TLS_SERVER_NAME", "someone-else.test")
        assert not await connects(_tls_settings(settings, one_way))
        temporal_env.setenv("TEMPORAL_TLS_SERVER_NAME", SERVER_NAME)
        assert await connects(_tls_settings(settings, one_way))

    mutual = TlsProxy(_upstream(env), _server_context(pki, require_client_cert=True))
    async with mutual.serving():
        assert not await connects(_tls_settings(settings, mutual))
        temporal_env.setenv("TEMPORAL_TLS_CLIENT_CERT_PATH", str(pki.client_cert))
        temporal_env.setenv("TEMPORAL_TLS_CLIENT_KEY_PATH", str(pki.client_key))
        assert await connects(_tls_settings(settings, mutual))
