#!/usr/bin/env python3
"""HTTP/2 over TLS (ALPN h2): malformed requests and flood limits.

Raw frames (hyperframe + hpack from the `h2` package) so nothing is
validated on the client side. A malformed request must be reset (RST_STREAM
or GOAWAY; a 400 answer also counts) and never reach the recording
upstream; a request on a fresh connection must still work afterwards. The
flood cases check that the server ends or bounds the abuse. Runs against
nginx (http2 on its TLS listener) too, when installed. An h2load run is a
quick load sanity check when nghttp2-client is installed.
"""

import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))

from harness import Cutover, Nginx, RecordingUpstream, Report  # noqa: E402
from rawh2 import (  # noqa: E402
    Closed,
    GoAwayFrame,
    RawH2,
    RstStreamFrame,
    describe,
)

AUTHORITY = b"localhost"


def base(method=b"GET", path=b"/"):
    return [(b":method", method), (b":scheme", b"https"), (b":authority", AUTHORITY),
            (b":path", path)]


def without(headers, name):
    return [(n, v) for n, v in headers if n != name]


# (name, header list, body or None). Every one must be reset and not
# forwarded.
MALFORMED = [
    ("connection_header", base() + [(b"connection", b"keep-alive")], None),
    ("keep_alive_header", base() + [(b"keep-alive", b"timeout=5")], None),
    ("proxy_connection_header", base() + [(b"proxy-connection", b"keep-alive")], None),
    ("transfer_encoding_header", base(b"POST") + [(b"transfer-encoding", b"chunked")], b"hello"),
    ("upgrade_header", base() + [(b"upgrade", b"h2c")], None),
    ("te_gzip", base() + [(b"te", b"gzip")], None),
    ("te_trailers_and_gzip", base() + [(b"te", b"trailers, gzip")], None),
    ("uppercase_name", base() + [(b"X-Upper", b"a")], None),
    ("name_with_space", base() + [(b"x a", b"b")], None),
    ("missing_method", without(base(), b":method"), None),
    ("missing_path", without(base(), b":path"), None),
    ("missing_scheme", without(base(), b":scheme"), None),
    ("duplicate_path", base() + [(b":path", b"/other")], None),
    ("duplicate_method", [(b":method", b"GET")] + base(), None),
    ("unknown_pseudo", base() + [(b":foo", b"bar")], None),
    ("response_pseudo_in_request", base() + [(b":status", b"200")], None),
    ("pseudo_after_regular", [(b":method", b"GET"), (b":scheme", b"https"),
                              (b":authority", AUTHORITY), (b"x-a", b"1"), (b":path", b"/")], None),
    ("empty_path", [(n, b"" if n == b":path" else v) for n, v in base()], None),
    ("path_not_absolute", [(n, b"foo" if n == b":path" else v) for n, v in base()], None),
    ("cr_in_value", base() + [(b"x-a", b"a\rb")], None),
    ("lf_in_value", base() + [(b"x-a", b"a\nb")], None),
    ("nul_in_value", base() + [(b"x-a", b"a\x00b")], None),
    ("crlf_injection", base() + [(b"x-a", b"a\r\nx-injected: 1")], None),
    # RFC 9113 §8.2.1: no leading or trailing space or tab in a value.
    ("leading_space_in_value", base() + [(b"x-a", b" a")], None),
    ("trailing_tab_in_value", base() + [(b"x-a", b"a\t")], None),
    ("content_length_duplicate", base(b"POST") + [(b"content-length", b"5"),
                                                  (b"content-length", b"6")], b"hello"),
    # Equal values pass the h2 crate; re-sent as HTTP/1.1 they would be two
    # Content-Length lines. cutover's own check (src/proxy/strict.rs) refuses them.
    ("content_length_duplicate_equal", base(b"POST") + [(b"content-length", b"5"),
                                                        (b"content-length", b"5")], b"hello"),
]

# Bodies that contradict content-length: the head may already be on its way
# upstream (bodies stream), so the check is that no complete request arrives.
CL_MISMATCH = [
    ("content_length_longer_than_body", base(b"POST") + [(b"content-length", b"10")], b"hello"),
    ("content_length_shorter_than_body", base(b"POST") + [(b"content-length", b"3")], b"hello"),
    ("content_length_zero_with_data", base(b"POST") + [(b"content-length", b"0")], b"x"),
]


def send_request(conn, stream_id, headers, body):
    frames = [conn.headers_frame(stream_id, headers, end_stream=body is None)]
    if body is not None:
        frames.append(conn.data(stream_id, body))
    conn.send(*frames)


def followup(port):
    """None when a fresh connection's GET /followup is answered 200."""
    conn = RawH2(port)
    try:
        send_request(conn, 1, base(path=b"/followup"), None)
        outcome = conn.outcome(1)
        return None if outcome == ("status", 200) else f"follow-up got {describe(outcome)}"
    finally:
        conn.close()


def settle(upstream):
    time.sleep(0.1)
    return [r for r in upstream.snapshot() if not r["line"].startswith("GET /followup ")]


def check_malformed(port, upstream, headers, body, complete_only=False):
    upstream.clear()
    conn = RawH2(port)
    try:
        send_request(conn, 1, headers, body)
        outcome = conn.outcome(1)
    finally:
        conn.close()
    problems = []
    if outcome[0] not in ("reset", "goaway", "closed") and outcome != ("status", 400):
        problems.append(f"got {describe(outcome)} (want a reset)")
    problems.append(followup(port))
    forwarded = settle(upstream)
    if complete_only:
        forwarded = [r for r in forwarded if r["body"] is not None]
    if forwarded:
        problems.append(f"upstream received {[(r['line'][:60], r['body']) for r in forwarded]}")
    return "; ".join(p for p in problems if p) or None


def check_excess_in_later_frame(port, upstream):
    """content-length: 5 and five bytes without END_STREAM; once the
    upstream has had time to get them, two more bytes with END_STREAM. The
    stream is malformed only then, so no complete request may have arrived
    (the excess must not be needed to find out)."""
    upstream.clear()
    conn = RawH2(port)
    try:
        headers = base(b"POST", b"/later") + [(b"content-length", b"5")]
        conn.send(conn.headers_frame(1, headers, end_stream=False),
                  conn.data(1, b"hello", end_stream=False))
        time.sleep(0.5)
        conn.send(conn.data(1, b"!!"))
        outcome = conn.outcome(1)
    finally:
        conn.close()
    problems = []
    if outcome[0] not in ("reset", "goaway", "closed") and outcome != ("status", 400):
        problems.append(f"got {describe(outcome)} (want a reset)")
    problems.append(followup(port))
    complete = [r for r in settle(upstream) if r["body"] is not None]
    if complete:
        problems.append(f"upstream received {[(r['line'][:60], r['body']) for r in complete]}")
    return "; ".join(p for p in problems if p) or None


def check_allowed(port, upstream, headers):
    """A well-formed request (a control case) is answered and forwarded."""
    upstream.clear()
    conn = RawH2(port)
    try:
        send_request(conn, 1, headers, None)
        outcome = conn.outcome(1)
    finally:
        conn.close()
    if outcome != ("status", 200):
        return f"got {describe(outcome)} (want 200)"
    return None if len(settle(upstream)) == 1 else "not forwarded exactly once"


def check_concurrent_streams(port, upstream, opened=200, limit=128):
    """More open streams than SETTINGS_MAX_CONCURRENT_STREAMS: the extra
    ones are refused, and no more than the limit reach the upstream."""
    upstream.clear()
    conn = RawH2(port)
    try:
        frames = [conn.headers_frame(1 + 2 * i, base(b"POST", b"/stream"), end_stream=False)
                  for i in range(opened)]
        conn.send(*frames)
        seen, _ = conn.drain(3)
    finally:
        conn.close()
    refused = sum(1 for f in seen if isinstance(f, RstStreamFrame) and f.error_code == 0x7)
    goaway = any(isinstance(f, GoAwayFrame) for f in seen)
    time.sleep(0.2)
    reached = upstream.count()
    problems = []
    if refused < opened - limit and not goaway:
        problems.append(f"only {refused} of {opened} streams refused (limit {limit})")
    if reached > limit:
        problems.append(f"{reached} streams reached the upstream (limit {limit})")
    problems.append(followup(port))
    return "; ".join(p for p in problems if p) or None


def check_header_list_size(port, upstream):
    """A 24 KiB header block (over the 16 KiB default): 431 or reset."""
    upstream.clear()
    conn = RawH2(port)
    try:
        headers = base() + [(f"x-big-{i}".encode(), b"a" * 1000) for i in range(24)]
        block = conn.block(headers)
        first, rest = block[:16000], block[16000:]
        from hyperframe.frame import HeadersFrame
        conn.send(HeadersFrame(1, first, flags={"END_STREAM"}),
                  conn.continuation(1, rest, end_headers=True))
        outcome = conn.outcome(1)
    finally:
        conn.close()
    problems = []
    if outcome[0] not in ("reset", "goaway", "closed") and outcome != ("status", 431):
        problems.append(f"got {describe(outcome)} (want 431 or a reset)")
    problems.append(followup(port))
    if settle(upstream):
        problems.append("forwarded to the upstream")
    return "; ".join(p for p in problems if p) or None


def check_continuation_flood(port, upstream, frames=20000, empty=False):
    """HEADERS without END_HEADERS, then endless CONTINUATION frames (each
    with a 100-byte header, or empty ones that add no bytes to the header
    list): the server must end the connection instead of reading on."""
    upstream.clear()
    conn = RawH2(port)
    # A literal header field, never indexed, new name "x-f", 100-byte value.
    fragment = b"" if empty else b"\x10\x03x-f\x64" + b"a" * 100
    sent = 0
    ended_early = False
    try:
        from hyperframe.frame import HeadersFrame
        conn.send(HeadersFrame(1, conn.block(base()), flags={"END_STREAM"}))
        conn.sock.settimeout(5)
        while sent < frames:
            batch = [conn.continuation(1, fragment) for _ in range(200)]
            try:
                conn.send(*batch)
            except OSError:
                ended_early = True
                break
            sent += len(batch)
        seen, closed = conn.drain(5)
    finally:
        conn.close()
    goaway = [f for f in seen if isinstance(f, GoAwayFrame)]
    problems = []
    if not (ended_early or goaway or closed):
        problems.append(f"server kept the connection after {sent} CONTINUATION frames")
    problems.append(followup(port))
    if settle(upstream):
        problems.append("forwarded to the upstream")
    print(f"# continuation_flood{'_empty' if empty else ''}: {sent} frames written before the server "
          f"{'closed' if ended_early or closed else 'answered'}; "
          f"GOAWAY {[describe(('goaway', g.error_code)) for g in goaway]}", flush=True)
    return "; ".join(p for p in problems if p) or None


def check_rapid_reset(port, upstream, pairs=1000):
    """HEADERS immediately followed by RST_STREAM, many times (CVE-2023-
    44487): the server must GOAWAY instead of doing work for every stream."""
    upstream.clear()
    conn = RawH2(port)
    sent = 0
    ended_early = False
    try:
        conn.sock.settimeout(5)
        while sent < pairs:
            batch = []
            for i in range(sent, min(sent + 50, pairs)):
                stream_id = 1 + 2 * i
                batch += [conn.headers_frame(stream_id, base(path=b"/reset")), conn.rst(stream_id)]
            try:
                conn.send(*batch)
            except OSError:
                ended_early = True
                break
            sent += len(batch) // 2
        seen, closed = conn.drain(3)
    finally:
        conn.close()
    goaway = [f for f in seen if isinstance(f, GoAwayFrame)]
    time.sleep(0.3)
    reached = upstream.count()
    print(f"# rapid_reset: {sent} HEADERS+RST_STREAM pairs written, {reached} reached the "
          f"upstream, GOAWAY {[describe(('goaway', g.error_code)) for g in goaway]}, "
          f"closed={closed or ended_early}", flush=True)
    problems = []
    if not (goaway or closed or ended_early):
        problems.append(f"no GOAWAY after {sent} reset streams")
    if reached > pairs // 10:
        problems.append(f"{reached} of {sent} reset requests reached the upstream")
    problems.append(followup(port))
    return "; ".join(p for p in problems if p) or None


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def check_ping_flood(port, pid, pings=100000):
    """Many PINGs while never reading the ACKs (CVE-2019-9512): memory must
    stay bounded and the server must keep serving others."""
    before = rss_kib(pid) if pid else None
    conn = RawH2(port)
    sent = 0
    try:
        conn.sock.settimeout(3)
        while sent < pings:
            try:
                conn.send(*[conn.ping(sent + i) for i in range(1000)])
            except OSError:
                break
            sent += 1000
        after = rss_kib(pid) if pid else None
        problems = [followup(port)]
    finally:
        conn.close()
    growth = None if before is None or after is None else (after - before) // 1024
    print(f"# ping_flood: {sent} PINGs written without reading; RSS growth "
          f"{growth if growth is not None else '?'} MiB", flush=True)
    if growth is not None and growth > 64:
        problems.append(f"RSS grew by {growth} MiB")
    return "; ".join(p for p in problems if p) or None


def check_h2load(port):
    """h2load (nghttp2-client): 2000 requests on 10 connections x 10
    streams all succeed."""
    if shutil.which("h2load") is None:
        return "h2load not installed (apt-get install nghttp2-client)"
    result = subprocess.run(
        ["h2load", "-n", "2000", "-c", "10", "-m", "10", f"https://127.0.0.1:{port}/load"],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored", result.stdout)
    if not match:
        return f"no summary from h2load: {result.stdout[-200:]} {result.stderr[-200:]}"
    total, done, ok, failed, errored = map(int, match.groups())
    codes = re.search(r"status codes: (\d+) 2xx", result.stdout)
    print(f"# h2load: {match.group(0)}", flush=True)
    if ok != total or not codes or int(codes.group(1)) != total:
        return f"{match.group(0)}"
    return None


def run_all(report, port, upstream, pid, prefix):
    report.case("control_plain_get", lambda: check_allowed(port, upstream, base()), prefix)
    trailers = base() + [(b"te", b"trailers")]
    report.case("control_te_trailers", lambda: check_allowed(port, upstream, trailers), prefix)
    for name, headers, body in MALFORMED:
        report.case(name, lambda: check_malformed(port, upstream, headers, body), prefix)
    for name, headers, body in CL_MISMATCH:
        report.case(name, lambda: check_malformed(port, upstream, headers, body, complete_only=True), prefix)
    report.case("content_length_excess_in_later_frame",
                lambda: check_excess_in_later_frame(port, upstream), prefix)
    report.case("concurrent_streams_limit", lambda: check_concurrent_streams(port, upstream), prefix)
    report.case("header_list_size_limit", lambda: check_header_list_size(port, upstream), prefix)
    report.case("continuation_flood", lambda: check_continuation_flood(port, upstream), prefix)
    report.case("continuation_flood_empty",
                lambda: check_continuation_flood(port, upstream, frames=100000, empty=True), prefix)
    report.case("rapid_reset", lambda: check_rapid_reset(port, upstream), prefix)
    report.case("ping_flood", lambda: check_ping_flood(port, pid), prefix)
    report.case("h2load_sanity", lambda: check_h2load(port), prefix)


CASE_NAMES = (["control_plain_get", "control_te_trailers"] + [m[0] for m in MALFORMED]
              + [m[0] for m in CL_MISMATCH] + ["content_length_excess_in_later_frame"]
              + ["concurrent_streams_limit", "header_list_size_limit", "continuation_flood", "continuation_flood_empty",
                 "rapid_reset", "ping_flood", "h2load_sanity"])


def main():
    report = Report()
    upstream = RecordingUpstream()
    cutover = Cutover(upstream.port, tls=True)
    try:
        run_all(report, cutover.https_port, upstream, cutover.proc.pid, "")
    finally:
        cutover.stop()
    nginx = Nginx.start(upstream.port, tls=True)
    if nginx is None:
        for name in CASE_NAMES:
            report.skip_nginx(name)
    else:
        try:
            run_all(report, nginx.https_port, upstream, None, "NGINX-")
        finally:
            nginx.stop()
    upstream.stop()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
