"""Shared helpers for the external-tool suites (tests/external/suite_*).

Each suite starts its own cutover (and, when installed, nginx) on free
127.0.0.1 ports with a config in a temporary directory, plus a recording
upstream, and prints one line per case:

    PASS <name>            FAIL <name>: <why>
    NGINX-PASS <name>      NGINX-FAIL <name>: <why>      NGINX-SKIP <name>

`tests/external/run` totals the PASS/FAIL lines. Everything here talks to
loopback only and every wait is bounded.
"""

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CERT = os.path.join(ROOT, "certs-dev", "localhost.pem")
KEY = os.path.join(ROOT, "certs-dev", "localhost-key.pem")
CA = os.path.join(ROOT, "certs-dev", "ca.pem")
IO_TIMEOUT = 5.0


def free_port():
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc=None, timeout=15.0):
    """Waits until something accepts on 127.0.0.1:port (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# ---------------------------------------------------------------------------
# Recording upstream
# ---------------------------------------------------------------------------


class RecordingUpstream:
    """A small HTTP/1.1 origin that records every request it receives.

    It answers each request with 200 and the body "saw METHOD TARGET", keeps
    connections alive, and decodes Content-Length and chunked bodies. A
    request whose framing is broken is recorded with body None. The point is
    to see what a proxy forwards, so it is written for clarity, not speed.
    """

    def __init__(self):
        self.port = free_port()
        self.requests = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(128)
        self.stopped = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def count(self):
        with self.lock:
            return len(self.requests)

    def snapshot(self):
        with self.lock:
            return list(self.requests)

    def clear(self):
        with self.lock:
            self.requests.clear()

    def stop(self):
        self.stopped = True
        self.sock.close()

    def _accept_loop(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(30)
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline(65536)
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    continue
                headers = []
                crlf = line.endswith(b"\r\n")
                while True:
                    h = reader.readline(65536)
                    crlf = crlf and h.endswith(b"\r\n")
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    headers.append((name.strip().lower(), value.strip()))
                record = {
                    "line": line.decode("latin-1").rstrip("\r\n"),
                    "headers": headers,
                    "body": None,
                    # Whether every head line ended in CRLF (no bare LF).
                    "crlf": crlf,
                }
                with self.lock:
                    self.requests.append(record)
                body = self._read_body(reader, headers)
                record["body"] = body
                if body is None:
                    return
                parts = record["line"].split(" ")
                text = f"saw {parts[0]} {parts[1] if len(parts) > 1 else ''}".encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                    + str(len(text)).encode()
                    + b"\r\n\r\n"
                    + text
                )
        except OSError:
            return
        finally:
            conn.close()

    @staticmethod
    def _read_body(reader, headers):
        names = dict(headers)
        if "chunked" in names.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size_line = reader.readline(1024)
                if not size_line.endswith(b"\n"):
                    return None
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    return None
                if size == 0:
                    while reader.readline(65536) not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                chunk = reader.read(size + 2)
                if len(chunk) != size + 2:
                    return None
                body += chunk[:size]
        length = int(names.get("content-length", "0") or "0")
        body = reader.read(length) if length else b""
        return body if len(body) == length else None


# ---------------------------------------------------------------------------
# Servers under test
# ---------------------------------------------------------------------------


class Cutover:
    """cutover started from $CUTOVER_BIN with a generated config."""

    def __init__(self, upstream_port, limits="", tls=False):
        binary = os.environ.get("CUTOVER_BIN") or os.path.join(ROOT, "target", "release", "cutover")
        self.dir = tempfile.mkdtemp(prefix="cutover-ext-")
        self.http_port = free_port()
        self.https_port = free_port() if tls else None
        listeners = f'http = "127.0.0.1:{self.http_port}"\n'
        tls_block = ""
        if tls:
            listeners += f'https = "127.0.0.1:{self.https_port}"\n'
            tls_block = f'[[tls]]\ncert = "{CERT}"\nkey = "{KEY}"\n'
        config = (
            f"[server]\n{listeners}shutdown_timeout = \"2s\"\n"
            f"[server.limits]\n{limits}\n"
            f"{tls_block}\n"
            f'[[site]]\nhosts = ["*"]\nservice = "app"\n\n'
            f'[service.app]\nupstream = "127.0.0.1:{upstream_port}"\n'
        )
        self.config = os.path.join(self.dir, "proxy.toml")
        with open(self.config, "w") as f:
            f.write(config)
        self.log = open(os.path.join(self.dir, "cutover.log"), "wb")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", self.config],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_for_port(self.http_port, self.proc)
            if tls:
                wait_for_port(self.https_port, self.proc)
        except RuntimeError:
            self.stop()
            sys.stderr.write(open(os.path.join(self.dir, "cutover.log")).read())
            raise

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx:
    """nginx as an equivalent reverse proxy (proxy_pass, HTTP/1.1 upstream
    keep-alive), or None from `Nginx.start` when nginx is not installed."""

    @staticmethod
    def start(upstream_port, tls=False):
        if shutil.which("nginx") is None:
            return None
        return Nginx(upstream_port, tls)

    def __init__(self, upstream_port, tls):
        self.dir = tempfile.mkdtemp(prefix="nginx-ext-")
        self.http_port = free_port()
        self.https_port = free_port() if tls else None
        ssl_server = ""
        if tls:
            # nginx 1.22 (Debian 12) spells HTTP/2 as a listen parameter.
            ssl_server = (
                f"listen 127.0.0.1:{self.https_port} ssl http2;\n"
                f"ssl_certificate {CERT}; ssl_certificate_key {KEY};\n"
            )
        conf = f"""
worker_processes 1;
error_log {self.dir}/error.log warn;
pid {self.dir}/nginx.pid;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log {self.dir}/access.log;
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{self.http_port};
    {ssl_server}
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}
}}
"""
        self.config = os.path.join(self.dir, "nginx.conf")
        with open(self.config, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen(
            ["nginx", "-c", self.config, "-p", self.dir, "-e", f"{self.dir}/error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.http_port, self.proc)
        if tls:
            wait_for_port(self.https_port, self.proc)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# Raw HTTP/1 clients
# ---------------------------------------------------------------------------


def raw_exchange(port, data, timeout=IO_TIMEOUT):
    """Sends exact bytes, half-closes nothing, and reads until the server
    closes or `timeout` passes. Returns (bytes received, closed_by_server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
        return received, False


def statuses(response):
    """Every status code found at the start of a response head in `response`
    (pipelined answers come back in order)."""
    codes = []
    for part in response.split(b"HTTP/1.1 ")[1:]:
        code = part[:3]
        if code.isdigit():
            codes.append(int(code))
    return codes


def first_status(response):
    codes = statuses(response)
    return codes[0] if codes else 0


def tls_context(alpn):
    ctx = ssl.create_default_context(cafile=CA)
    ctx.set_alpn_protocols(alpn)
    return ctx


class Report:
    """Collects a suite's result lines and prints them as they come."""

    def __init__(self):
        self.failed = 0

    def result(self, name, why, prefix=""):
        if why is not None and len(why) > 300:
            why = why[:300] + "..."
        if why is None:
            print(f"{prefix}PASS {name}", flush=True)
        else:
            if not prefix:
                self.failed += 1
            print(f"{prefix}FAIL {name}: {why}", flush=True)

    def case(self, name, check, prefix=""):
        """Runs `check()` (None or why it failed); an exception is a FAIL."""
        try:
            why = check()
        except Exception as err:  # noqa: BLE001 - any crash is this case's failure
            why = f"exception {err!r}"
        self.result(name, why, prefix)

    def skip_nginx(self, name):
        print(f"NGINX-SKIP {name}", flush=True)
