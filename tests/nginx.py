"""Debian's nginx as a private process in front of a test's edges.

The server blocks are the repository's own ``infra/nginx/voteflow.conf``,
with only their ``listen 443`` and ``listen 80`` moved to free loopback ports;
the edges go in ``voteflow-upstream.conf`` and the certificate's paths in
``voteflow-tls.conf`` next to the main configuration, as the file's contract
says. The certificate is self-signed for 127.0.0.1 by
``infra/nginx/self_signed_cert.py``, and clients trust it alone
(:attr:`Nginx.ssl`). Every path nginx writes (pid, logs, temporary files) is
in the test's directory, so nginx runs without touching /etc, /var or /run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import REPO, REQUEST_TIMEOUT
from voteflow.servers import free_port

CONF = REPO / "infra" / "nginx" / "voteflow.conf"
SELF_SIGNED = REPO / "infra" / "nginx" / "self_signed_cert.py"
LISTEN = "listen 443 ssl http2 default_server;"
LISTEN_HTTP = "listen 80 default_server;"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# Bodies of nginx's own 429 (its limit_req) and of an edge's (VOTEFLOW_RATE_LIMIT_PER_IP).
NGINX_TOO_MANY = "too many requests from your address, slow down"
EDGE_TOO_MANY = "too many votes, slow down"


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"  # /usr/sbin is not on every user's PATH
    return found


class Nginx:
    """One nginx master (one worker) serving voteflow.conf on 127.0.0.1:<port>
    over TLS (:attr:`url`), and its redirect on 127.0.0.1:<http_port>."""

    def __init__(
        self, binary: str, directory: Path, edges: list[str], real_ip_from: str = ""
    ) -> None:
        """`real_ip_from`: a network whose X-Forwarded-For nginx's realip module
        believes, as behind another load balancer (voteflow.conf's advice): a
        test client on loopback then sends as any address, IPv6 ones too."""
        self.binary = binary
        self.real_ip_from = real_ip_from
        self.dir = directory
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.error_log = directory / "error.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.certificate = directory / "tls" / "tls.crt"
        self._make_certificate()
        # What a client of this nginx trusts: its certificate, nothing else.
        self.ssl = ssl.create_default_context(cafile=self.certificate)
        self._write_config(edges)

    def _make_certificate(self) -> None:
        # The script the Compose project runs, run the same way.
        done = subprocess.run(
            [sys.executable, str(SELF_SIGNED), str(self.dir / "tls"), "127.0.0.1", "localhost"],
            capture_output=True,
            timeout=STARTUP_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")

    def _write_config(self, edges: list[str]) -> None:
        text = CONF.read_text()
        # The one change to the file under test: where it listens.
        for listen in (LISTEN, LISTEN_HTTP):
            assert text.count(listen) == 1, f"{CONF} must hold exactly one {listen!r}"
        text = text.replace(LISTEN, f"listen 127.0.0.1:{self.port} ssl http2 default_server;")
        text = text.replace(LISTEN_HTTP, f"listen 127.0.0.1:{self.http_port} default_server;")
        (self.dir / "voteflow.conf").write_text(text)
        (self.dir / "voteflow-upstream.conf").write_text(
            "".join(f"server {edge.removeprefix('http://')};\n" for edge in edges)
        )
        tls = self.dir / "tls"
        (self.dir / "voteflow-tls.conf").write_text(
            f"ssl_certificate {tls}/tls.crt;\nssl_certificate_key {tls}/tls.key;\n"
        )
        d = self.dir
        # As root nginx would run its worker as nobody, who cannot enter the
        # test's directory (mode 0700).
        user = "user root;\n" if os.geteuid() == 0 else ""
        real_ip = (
            f"set_real_ip_from {self.real_ip_from};\n    real_ip_header X-Forwarded-For;\n    "
            if self.real_ip_from
            else ""
        )
        (d / "nginx.conf").write_text(
            f"""daemon off;
{user}worker_processes 1;
pid {d}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 1024; }}
http {{
    log_format voteflow '$remote_addr "$request" $status $upstream_addr "$http_x_forwarded_for"';
    access_log {d}/access.log voteflow;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    {real_ip}include {d}/voteflow.conf;
}}
"""
        )

    def _command(self, *extra: str) -> list[str]:
        d = self.dir
        return [
            self.binary,
            "-p",
            f"{d}/",
            "-c",
            f"{d}/nginx.conf",
            "-e",
            str(self.error_log),
            *extra,
        ]

    def check_config(self) -> None:
        """``nginx -t``: fails the test with nginx's own words."""
        done = subprocess.run(self._command("-t"), capture_output=True, timeout=STARTUP_TIMEOUT)
        assert done.returncode == 0, done.stderr.decode(errors="replace")

    def _launch(self) -> subprocess.Popen[bytes]:
        self.check_config()
        # A session of its own, so that nginx's worker can be killed with its
        # master should the master not stop.
        return subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    async def start(self) -> None:
        self.popen = self._launch()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._accepts():
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"nginx exited with {self.popen.returncode}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx did not listen within {STARTUP_TIMEOUT:.0f}s")
            await asyncio.sleep(0.05)

    def _accepts(self) -> bool:
        try:
            for port in (self.port, self.http_port):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    def session(self, address: str | None = None, limit: int = 100) -> aiohttp.ClientSession:
        """A client that trusts this nginx's certificate, its connections from
        `address` (a 127/8 address) if given."""
        local = (address, 0) if address is not None else None
        connector = aiohttp.TCPConnector(local_addr=local, limit=limit, ssl=self.ssl)
        return aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT)

    async def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: open live streams do not hold it up),
        SIGKILL to its whole session if it outlives STOP_TIMEOUT."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=STOP_TIMEOUT)
            raise AssertionError(f"nginx outlived SIGTERM; killed\n{self.log_tail()}")
        assert popen.returncode == 0, f"nginx exited with {popen.returncode}\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.error_log.read_text(errors="replace")
        except OSError:
            return "(no nginx error log)"
        return "--- nginx error log ---\n" + "\n".join(text.splitlines()[-lines:])

    def keepalive(self) -> int:
        """The idle connections per worker that voteflow.conf keeps to the edges."""
        for line in CONF.read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "keepalive":
                return int(words[1].rstrip(";"))
        raise AssertionError(f"no keepalive in {CONF}")


def live_streams_per_client() -> int:
    """The live streams per client that voteflow.conf's limit_conn allows, the
    same on the SSE and the WebSocket routes."""
    limits = set()
    for line in CONF.read_text().splitlines():
        words = line.split()
        if words[:2] == ["limit_conn", "voteflow_live"]:
            limits.add(int(words[2].rstrip(";")))
    assert len(limits) == 1, f"{CONF}: limit_conn voteflow_live {limits}"
    return limits.pop()


def established_to(ports: set[int]) -> int:
    """TCP connections on this host, in state ESTABLISHED, whose remote end is
    one of ``ports`` (IPv4, from /proc/net/tcp)."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) in ports:
                count += 1
    return count


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` with these labels in Prometheus text."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )
