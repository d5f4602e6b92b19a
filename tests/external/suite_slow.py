#!/usr/bin/env python3
"""Slow and idle clients, with raw sockets, while a probe keeps succeeding.

Cases, each against a cutover started with small limits (and against nginx
with the equivalent directives, when nginx is installed):

- slowloris: 500 connections each trickling one header byte every 0.5 s;
  all must be closed by the header timeout, and requests through the proxy
  must keep succeeding meanwhile;
- 1 byte/s request bodies: 10 POSTs sending exactly one body byte per
  second; each must be answered 408 (or at least closed) well before the
  body ends, which a per-gap body timeout alone cannot do;
- clients that never read: 10 clients with a 4 KiB receive buffer ask for a
  32 MiB response and read nothing; the proxy must drop them (send timeout)
  instead of holding them forever;
- 10,000 idle connections (RLIMIT_NOFILE raised as far as the hard limit
  allows): all open at once while a probe succeeds, then all closed by the
  idle/header timeouts.

One line per case: `PASS <name>` or `FAIL <name>: <why>`, and
`NGINX-PASS`/`NGINX-FAIL`/`NGINX-SKIP` for nginx. Loopback only; every
wait is bounded.
"""

import errno
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))

from harness import Cutover, Report, first_status, wait_for_port  # noqa: E402

BIG = 32 << 20
IDLE_CONNECTIONS = 10_000

# cutover's limits for these cases: small, so the suite runs in about a
# minute. nginx gets the same numbers through its own directives.
LIMITS = """
header_read_timeout = "2s"
idle_timeout = "2s"
body_timeout = "5s"
body_min_rate = 100
body_rate_grace = "2s"
send_timeout = "1s"
"""


# ---------------------------------------------------------------------------
# Upstream: a small answer for the probe, 32 MiB for /big.
# ---------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"z" * BIG if self.path.startswith("/big") else b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0") or "0")
        try:
            got = self.rfile.read(length)
            body = f"got {len(got)}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            # The proxy gave up on the client's body and closed this leg.
            self.close_connection = True


def start_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------------------
# nginx with the same limits
# ---------------------------------------------------------------------------


class TunedNginx:
    """nginx as a reverse proxy with timeouts equal to cutover's LIMITS."""

    def __init__(self, upstream_port, idle_timeout="2s"):
        self.dir = tempfile.mkdtemp(prefix="nginx-slow-")
        self.http_port = free_port()
        conf = f"""
worker_processes 1;
worker_rlimit_nofile 30000;
error_log {self.dir}/error.log warn;
pid {self.dir}/nginx.pid;
daemon off;
events {{ worker_connections 12000; }}
http {{
  access_log off;
  client_header_timeout {idle_timeout};
  client_body_timeout 5s;
  send_timeout 1s;
  keepalive_timeout {idle_timeout};
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  server {{
    listen 127.0.0.1:{self.http_port};
    location / {{
      proxy_pass http://127.0.0.1:{upstream_port};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
        path = os.path.join(self.dir, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen(
            ["nginx", "-c", path, "-p", self.dir, "-e", f"{self.dir}/error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.http_port, self.proc)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def probe(port):
    """One GET through the proxy; None if it got 200, else why not."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /probe HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            data = b""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as err:
        return f"probe failed: {err!r}"
    status = first_status(data)
    return None if status == 200 else f"probe got {status}: {data[:80]!r}"


class ProbeLoop:
    """Probes every 0.25 s in a thread until stopped; counts results."""

    def __init__(self, port):
        self.port = port
        self.ok = 0
        self.failures = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped.is_set():
            why = probe(self.port)
            if why is None:
                self.ok += 1
            else:
                self.failures.append(why)
            self.stopped.wait(0.25)

    def stop(self):
        """None when every probe succeeded (and there was at least one)."""
        self.stopped.set()
        self.thread.join(timeout=30)
        if self.failures:
            return f"{len(self.failures)} probe(s) failed, first: {self.failures[0]}"
        if self.ok == 0:
            return "no probe ran"
        return None


def peer_state(sock):
    """'open', 'closed', or 'data' (the server sent something), without
    waiting: a socket with a timeout would otherwise wait for data."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
    finally:
        sock.settimeout(timeout)
    return "data" if data else "closed"


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def raise_fd_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------
# Cases: each returns None (pass) or why it failed.
# ---------------------------------------------------------------------------


def slowloris(port, clients=500, bound=20.0):
    socks = []
    try:
        for i in range(clients):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(f"GET /loris{i} HTTP/1.1\r\nHost: app.test\r\n".encode())
            socks.append(s)
        probes = ProbeLoop(port)
        start = time.monotonic()
        open_socks = list(socks)
        while open_socks and time.monotonic() - start < bound:
            time.sleep(0.5)
            still = []
            for s in open_socks:
                if peer_state(s) != "open":
                    continue
                try:
                    s.send(b"X")
                    still.append(s)
                except OSError:
                    pass
            open_socks = still
        elapsed = time.monotonic() - start
        why = probes.stop()
        if open_socks:
            return f"{len(open_socks)}/{clients} still open after {bound:.0f}s of trickling"
        if why:
            return why
        print(f"# slowloris: {clients} closed within {elapsed:.1f}s, {probes.ok} probes ok", flush=True)
        return None
    finally:
        close_all(socks)


def one_byte_per_second(port, clients=10, length=1000, bound=30.0):
    socks = []
    try:
        for _ in range(clients):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(
                b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: "
                + str(length).encode()
                + b"\r\n\r\n"
            )
            socks.append(s)
        probes = ProbeLoop(port)
        start = time.monotonic()
        answers = {}
        sent = 0
        while len(answers) < clients and time.monotonic() - start < bound and sent < length:
            time.sleep(1.0)
            sent += 1
            for i, s in enumerate(socks):
                if i in answers:
                    continue
                state = peer_state(s)
                if state == "open":
                    try:
                        s.send(b"a")
                    except OSError:
                        answers[i] = b""
                else:
                    try:
                        s.settimeout(2)
                        answers[i] = s.recv(4096)
                    except OSError:
                        answers[i] = b""
        elapsed = time.monotonic() - start
        why = probes.stop()
        if len(answers) < clients:
            return f"{clients - len(answers)}/{clients} bodies still accepted after {sent} bytes at 1 byte/s"
        codes = sorted({first_status(a) for a in answers.values()})
        if codes != [408]:
            return f"answers {codes} (0 = closed without an answer), want 408"
        if why:
            return why
        print(f"# 1 byte/s: {clients} answered 408 after {elapsed:.1f}s ({sent} bytes each)", flush=True)
        return None
    finally:
        close_all(socks)


def never_reads(port, clients=10, wait=5.0):
    socks = []
    try:
        for _ in range(clients):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: app.test\r\n\r\n")
            socks.append(s)
        probes = ProbeLoop(port)
        # Read nothing for `wait` seconds (a lower bound: the proxy's
        # send timeout is 1 s), then drain: a proxy that kept the
        # connection delivers the whole body.
        time.sleep(wait)
        why = probes.stop()
        full = 0
        for s in socks:
            got = 0
            s.settimeout(2)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    chunk = s.recv(1 << 20)
                except OSError:
                    break
                if not chunk:
                    break
                got += len(chunk)
            if got >= BIG:
                full += 1
        if full:
            return f"{full}/{clients} clients that read nothing for {wait:.0f}s still got all {BIG} bytes"
        return why
    finally:
        close_all(socks)


def connect_batch(port, n, bound=30.0):
    """Opens `n` connections concurrently (non-blocking connects), so a
    dropped SYN costs one retransmit second for the batch, not for each
    connection. Raises if any fails."""
    batch = []
    selector = selectors.DefaultSelector()
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                s.close()
                raise OSError(err, os.strerror(err))
            batch.append(s)
            selector.register(s, selectors.EVENT_WRITE)
        pending = len(batch)
        deadline = time.monotonic() + bound
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                selector.unregister(key.fileobj)
                pending -= 1
                err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
        if pending:
            raise OSError(f"{pending} connects still pending after {bound:.0f}s")
        for s in batch:
            s.setblocking(True)
        return batch
    except BaseException:
        close_all(batch)
        raise
    finally:
        selector.close()


def server_fds(pid):
    """Open descriptors of `pid` and its child processes (nginx's workers):
    what the server really holds, unlike client sockets, which stay
    ESTABLISHED on the client side even when the server's accept queue
    overflowed and it never saw them."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


def wait_fds(pid, predicate, bound):
    """Polls server_fds until `predicate(fds)` or `bound` seconds; returns
    the last count."""
    deadline = time.monotonic() + bound
    fds = server_fds(pid)
    while not predicate(fds) and time.monotonic() < deadline:
        time.sleep(0.2)
        fds = server_fds(pid)
    return fds


def idle_connections(port, pid, count, bound=90.0):
    socks = []
    try:
        baseline = server_fds(pid)
        start = time.monotonic()
        for first in range(0, count, 250):
            socks.extend(connect_batch(port, min(250, count - first)))
            # Let the server accept before the next batch (bounded).
            opened = len(socks)
            # (A few descriptors of the baseline may close meanwhile: slack.)
            wait_fds(pid, lambda fds, opened=opened: fds - baseline >= opened - 10, 2.0)
        opened = time.monotonic() - start
        # A busy machine may leave some in the accept queue: wait for them
        # (bounded well below the 45 s idle timeouts).
        held = wait_fds(pid, lambda fds: fds - baseline >= count - 10, 15.0) - baseline
        probe_start = time.monotonic()
        why = probe(port)
        probe_time = time.monotonic() - probe_start
        if why:
            return f"with {held} idle connections held: {why}"
        if held < count * 9 // 10:
            return f"the server held only {held} of {count} connections (accept queue overflow?)"
        left = wait_fds(pid, lambda fds: fds - baseline <= 5, bound) - baseline
        if left > 5:
            return f"{left} of {held} idle connections still held after {bound:.0f}s"
        closed_after = time.monotonic() - start
        print(
            f"# idle: {count} connects in {opened:.1f}s, server held {held} at the probe "
            f"(probe {probe_time * 1000:.0f} ms), all released {closed_after:.1f}s after the first",
            flush=True,
        )
        return probe(port)
    finally:
        close_all(socks)


def main():
    report = Report()
    soft = raise_fd_limit(2 * IDLE_CONNECTIONS + 2000)
    idle = min(IDLE_CONNECTIONS, soft - 1000)
    if idle < IDLE_CONNECTIONS:
        print(f"# RLIMIT_NOFILE {soft}: idle case uses {idle} connections", flush=True)
    idle_name = f"idle-{idle}-connections"

    upstream = start_upstream()
    up_port = upstream.server_address[1]
    cases = [
        ("slowloris-500-connections", slowloris),
        ("body-1-byte-per-second", one_byte_per_second),
        ("client-never-reads", never_reads),
    ]
    cutover = Cutover(up_port, limits=LIMITS)
    try:
        for name, case in cases:
            report.case(name, lambda case=case: case(cutover.http_port))
    finally:
        cutover.stop()
    # The idle case runs with longer timeouts so that all connections are
    # open at the same moment (opening 10,000 takes a few seconds).
    idle_limits = LIMITS.replace('"2s"', '"45s"')
    cutover = Cutover(up_port, limits=idle_limits)
    try:
        report.case(idle_name, lambda: idle_connections(cutover.http_port, cutover.proc.pid, idle))
    finally:
        cutover.stop()

    if shutil.which("nginx") is None:
        for name, _ in cases:
            report.skip_nginx(name)
        report.skip_nginx(idle_name)
    else:
        nginx = TunedNginx(up_port)
        try:
            for name, case in cases:
                report.case(name, lambda case=case: case(nginx.http_port), prefix="NGINX-")
        finally:
            nginx.stop()
        # nginx closes idle connections after client_header_timeout: 45s,
        # as cutover's in the idle case.
        nginx = TunedNginx(up_port, idle_timeout="45s")
        try:
            report.case(
                idle_name, lambda: idle_connections(nginx.http_port, nginx.proc.pid, idle), prefix="NGINX-"
            )
        finally:
            nginx.stop()
    upstream.shutdown()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
