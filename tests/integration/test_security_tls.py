"""Transport security: the TLS entry `rtml up` starts (HAProxy of our configuration, certificates
from settings, minted by `rtml certs dev`), and Ray's own TLS between its processes.

The entry is first tested alone, in front of a small local HTTP + WebSocket server, for each
client-certificate policy: what a client without a certificate, with one from another CA, with the
minted one, and a plain HTTP client get. Then `rtml up` starts a Ray cluster with
``RAY_USE_TLS=1`` and the minted certificates (its own ports and temp dir), deploys the app and
puts the mutual-TLS entry in front of it; a client with the certificate gets `/healthz` and a
prediction through it, one without does not, and `rtml down` stops the entry and the cluster by
pid. Waits are bounded; nothing asserts on speed."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect as websocket_connect
from websockets.sync.server import serve as websocket_serve

from deployments import control
from rtml.errors import RtmlError
from rtml.settings import Settings
from rtml_up import rtml_up
from security.certs import DevPki, mint_dev_pki
from test_serving_deploy import _free_ports

pytestmark = pytest.mark.timeout(600)
BIN = Path(sys.executable).parent
WINDOW_LENGTH = 16


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> DevPki:
    return mint_dev_pki(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> DevPki:
    """Certificates of another CA, which the entry must not trust."""
    return mint_dev_pki(tmp_path_factory.mktemp("foreign"))


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    """A local server standing in for Serve's HTTP port: `GET /healthz` answers 200 with the
    forwarding headers it got; a WebSocket echoes what it receives."""

    def answer_http(connection, request):
        if request.headers.get("upgrade", "").lower() == "websocket":
            return None  # go on with the WebSocket handshake
        seen = {name: request.headers.get(name) for name in ("x-forwarded-proto", "x-forwarded-for")}
        return connection.respond(HTTPStatus.OK, json.dumps({"path": request.path, **seen}))

    def echo(websocket):
        for message in websocket:
            websocket.send(message)

    with websocket_serve(echo, "127.0.0.1", 0, process_request=answer_http) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"127.0.0.1:{server.socket.getsockname()[1]}"
        server.shutdown()
    thread.join(timeout=10)


def _settings(home: Path, pki: DevPki, client_auth: str) -> Settings:
    return Settings(
        home=home,
        security={
            "tls_cert_file": str(pki.server_cert),
            "tls_key_file": str(pki.server_key),
            "tls_client_ca_file": str(pki.ca_cert),
            "tls_client_auth": client_auth,
        },
        serving={"tls_port": _free_ports(1)[0]},
    )


@contextmanager
def _entry(tmp_path: Path, pki: DevPki, backend: str, client_auth: str) -> Iterator[tuple[Settings, str]]:
    settings = _settings(tmp_path / client_auth, pki, client_auth)
    url = control.start_tls_front(settings, backend)
    try:
        yield settings, url
    finally:
        control.stop_tls_front(settings)


def _client_context(pki: DevPki, identity: DevPki | None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client trusting ``pki``'s CA, presenting ``identity``'s client certificate (None: none)."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if identity is not None:
        context.load_cert_chain(identity.client_cert, identity.client_key)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def _tls_request(url: str, context: ssl.SSLContext) -> bytes:
    """``GET /healthz`` over one TLS connection; what came back (raises the TLS error, if any)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer


def _refusal(url: str, context: ssl.SSLContext) -> str:
    """The TLS alert the entry refused the connection with (fails when it answered)."""
    with pytest.raises(ssl.SSLError) as refused:
        _tls_request(url, context)
    return refused.value.reason


def _running(pid: int) -> bool:
    """Whether the process runs (a zombie, gone but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# the entry alone -------------------------------------------------------------------------------


def test_a_mutual_tls_entry_refuses_clients_without_a_certificate_of_its_ca_and_answers_one_with(tmp_path, pki, foreign, backend):
    with _entry(tmp_path, pki, backend, "required") as (_, url):
        # TLS 1.3: the server ends the handshake with the certificate_required alert (RFC 8446
        # 4.4.2.4), which the client reads on its first read; TLS 1.2: a handshake failure.
        assert _refusal(url, _client_context(pki, None, ssl.TLSVersion.TLSv1_3)) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
        assert _refusal(url, _client_context(pki, None, ssl.TLSVersion.TLSv1_2)) == "SSLV3_ALERT_HANDSHAKE_FAILURE"
        assert _refusal(url, _client_context(pki, foreign)) == "TLSV1_ALERT_UNKNOWN_CA"
        answer = httpx.get(f"{url}/healthz", verify=_client_context(pki, pki), timeout=10)
        assert answer.status_code == 200
        # The app learns that the request came over TLS, and from where (not from the client's say).
        assert answer.json() == {"path": "/healthz", "x-forwarded-proto": "https", "x-forwarded-for": "127.0.0.1"}
        spoofed = httpx.get(f"{url}/healthz", headers={"x-forwarded-for": "203.0.113.9"}, verify=_client_context(pki, pki), timeout=10)
        assert spoofed.json()["x-forwarded-for"] == "127.0.0.1"


def test_plain_http_to_the_tls_port_gets_no_http_answer(tmp_path, pki, backend):
    with _entry(tmp_path, pki, backend, "required") as (settings, _):
        with socket.create_connection(("127.0.0.1", settings.serving.tls_port), timeout=10) as plain:
            plain.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            try:
                answer = plain.recv(65536)
            except ConnectionResetError:
                answer = b""
        assert answer == b"", answer  # closed without a byte of HTTP (or of the app)


def test_an_optional_client_certificate_entry_answers_without_one_but_refuses_a_foreign_one(tmp_path, pki, foreign, backend):
    with _entry(tmp_path, pki, backend, "optional") as (_, url):
        assert _tls_request(url, _client_context(pki, None)).startswith(b"HTTP/1.1 200")
        assert _refusal(url, _client_context(pki, foreign)) == "TLSV1_ALERT_UNKNOWN_CA"
        assert _tls_request(url, _client_context(pki, pki)).startswith(b"HTTP/1.1 200")


def test_websockets_pass_through_the_entry(tmp_path, pki, backend):
    with _entry(tmp_path, pki, backend, "required") as (_, url):
        with websocket_connect(f"{url.replace('https', 'wss')}/graphql", ssl=_client_context(pki, pki), server_hostname="localhost") as socket_:
            socket_.send("ping through TLS")
            assert socket_.recv(timeout=10) == "ping through TLS"


def test_rtml_down_stops_the_entry_by_its_pid(tmp_path, pki, backend):
    settings = _settings(tmp_path, pki, "required")
    control.start_tls_front(settings, backend)
    pid = int((control.run_dir(settings) / f"{control.TLS_FRONT}.pid").read_text())
    assert control.down(settings) == [f"the TLS entry (pid {pid})"]
    assert not _running(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", settings.serving.tls_port), timeout=5).close()
    assert control.down(settings) == []


@pytest.mark.parametrize(
    "change, named",
    [
        ({"security": {"tls_client_ca_file": ""}}, "security.tls_client_ca_file"),
        ({"security": {"tls_key_file": ""}}, "security.tls_key_file"),
        ({"security": {"tls_cert_file": "/nonexistent/server.crt"}}, "/nonexistent/server.crt"),
        ({"serving": {"http_host": "0.0.0.0"}}, "serving.http_host=127.0.0.1"),
    ],
)
def test_a_tls_setting_that_cannot_work_is_refused_naming_the_fix(tmp_path, pki, change, named):
    base = _settings(tmp_path, pki, "required")
    sections = {name: getattr(base, name).model_copy(update=values) for name, values in change.items()}
    with pytest.raises(RtmlError, match=named.replace(".", r"\.")):
        control.check_tls_settings(base.model_copy(update=sections))


# Ray's own TLS, with the app behind the entry -----------------------------------------------------


def _ray_tls_environment(pki: DevPki) -> dict[str, str]:
    return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(pki.server_cert), "RAY_TLS_SERVER_KEY": str(pki.server_key), "RAY_TLS_CA_CERT": str(pki.ca_cert)}


def _gcs_answer(port: int, pki: DevPki, identified: bool) -> bytes:
    """What Ray's GCS at ``port`` answers an HTTP/2 client over TLS that trusts ``pki``'s CA and
    presents the Ray processes' certificate (``identified``) or none: the start of its first answer."""
    context = _client_context(pki, None)
    if identified:
        context.load_cert_chain(pki.server_cert, pki.server_key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as gcs:
        assert dict(field[0] for field in gcs.getpeercert()["subject"])["commonName"] == "rtml server"
        gcs.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))  # preface, empty SETTINGS
        try:
            return gcs.recv(64)
        except (ssl.SSLError, ConnectionResetError):
            return b""


def test_a_ray_cluster_with_ray_tls_runs_the_app_behind_the_mutual_tls_entry(tmp_path, pki):
    tls_port = _free_ports(1)[0]
    env = {
        **_ray_tls_environment(pki),
        "RTML_SECURITY__TLS_CERT_FILE": str(pki.server_cert),
        "RTML_SECURITY__TLS_KEY_FILE": str(pki.server_key),
        "RTML_SECURITY__TLS_CLIENT_CA_FILE": str(pki.ca_cert),
        "RTML_SERVING__TLS_PORT": str(tls_port),
        "RTML_MODELS__WINDOW_LENGTH": str(WINDOW_LENGTH),
        "RTML_SERVING__MODEL_KINDS": '["rnn", "cnn"]',
        "RTML_STREAMING__CONSUMERS": "1",
        "RTML_AGENTS__ENABLED": "false",  # the agents' deployments add start-up time, not TLS paths
        # A user's first `rtml up`: no Ray token in ~/.ray yet (`ray start` in token mode needs one).
        "HOME": str(tmp_path / "user"),
    }
    with rtml_up(tmp_path, env=env) as cluster:  # with the demo tenant's two small models
        url = f"https://127.0.0.1:{tls_port}"
        assert f"TLS entry {url}" in cluster.up_output, cluster.up_output
        ray_port = int(cluster.env["RTML_SERVING__RAY_PORT"])
        # Ray's GCS speaks TLS with the minted certificate, and gRPC only to a client presenting
        # one: the server's HTTP/2 SETTINGS frame with, the connection closed without.
        assert _gcs_answer(ray_port, pki, identified=True)[3] == 0x04
        assert _gcs_answer(ray_port, pki, identified=False) == b""

        assert _refusal(url, _client_context(pki, None, ssl.TLSVersion.TLSv1_3)) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
        client = _client_context(pki, pki)
        health = httpx.get(f"{url}/healthz", verify=client, timeout=60)
        assert health.status_code == 200, health.text  # the Ingress asked the router: replicas talk over Ray's TLS
        window = (20 + 5 * np.sin(np.arange(WINDOW_LENGTH) / 3)).tolist()
        predicted = httpx.post(f"{url}/v1/predict", json={"tenant": "demo", "window": window}, headers=cluster.auth("demo", "writer"), verify=client, timeout=60)
        assert predicted.status_code == 200, predicted.text
        assert predicted.json()["tenant"] == "demo" and len(predicted.json()["scores"]) == 2  # both models scored it

        front = int((cluster.home / "run" / f"{control.TLS_FRONT}.pid").read_text())
        stopped = subprocess.run([str(BIN / "rtml"), "down"], env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert f"pid {front}" in stopped.stdout and "Ray cluster" in stopped.stdout, stopped.stdout
        assert not _running(front)
        for port in (tls_port, ray_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
