#!/usr/bin/env python3
"""HTTP/1.1 request parsing and smuggling, with raw sockets.

Every malformed request must get its status (400, or 414/431 for sizes),
the connection must be closed afterwards, the recording upstream must
receive nothing, and a follow-up request on a fresh connection must get its
own answer. A few ambiguities that RFC 9112 lets a server resolve instead
of refusing (`Normalize`) pass either way, provided the upstream receives
one unambiguous request. The same cases run against nginx (plain proxy_pass) when it is
installed, for the comparison table in docs/hardening.md.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))

from harness import (  # noqa: E402
    Cutover,
    Nginx,
    RecordingUpstream,
    Report,
    raw_exchange,
    statuses,
)


def req(*lines, body=b""):
    """A request from CRLF-joined head lines plus an optional body."""
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


H = b"Host: app.test"
SMUGGLE = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n"


class Refuse:
    """The request must be refused with one of `codes`, the connection
    closed, and nothing forwarded."""

    def __init__(self, *codes):
        self.codes = codes


class Normalize:
    """Either refused like `Refuse(400)`, or answered once with the
    connection closed and exactly one request forwarded that passes
    `forwarded_ok` (a description of what the upstream must see). This is
    for ambiguities RFC 9112 lets a server resolve instead of refusing:
    what matters for smuggling is what reaches the upstream."""

    def __init__(self, want, forwarded_ok, close=True):
        self.want = want
        self.forwarded_ok = forwarded_ok
        self.close = close


def chunked_only(record):
    names = [n for n, _ in record["headers"]]
    return "content-length" not in names and record["body"] == b""


def one_content_length(record):
    lengths = [v for n, v in record["headers"] if n == "content-length"]
    return lengths == ["5"] and record["body"] == b"hello"


def crlf_framed(record):
    return record["crlf"] and record["line"].startswith("GET / ")


POST = b"POST / HTTP/1.1"
GET = b"GET / HTTP/1.1"
TE = b"Transfer-Encoding: chunked"

CASES = [
    ("cl_and_te", req(POST, H, b"Content-Length: 6", TE, body=SMUGGLE),
     Normalize("one chunked-only request, connection closed", chunked_only)),
    ("te_and_cl", req(POST, H, TE, b"Content-Length: 6", body=SMUGGLE),
     Normalize("one chunked-only request, connection closed", chunked_only)),
    ("cl_duplicate_equal", req(POST, H, b"Content-Length: 5", b"Content-Length: 5",
                               b"Connection: close", body=b"hello"),
     Normalize("one Content-Length: 5", one_content_length)),
    ("cl_duplicate_different", req(POST, H, b"Content-Length: 5",
                                   b"Content-Length: 6", body=b"hello!"), Refuse(400)),
    ("cl_list", req(POST, H, b"Content-Length: 5, 5", body=b"hello"), Refuse(400)),
    ("cl_not_a_number", req(POST, H, b"Content-Length: abc", body=b"hello"), Refuse(400)),
    ("cl_plus_sign", req(POST, H, b"Content-Length: +5", body=b"hello"), Refuse(400)),
    ("cl_negative", req(POST, H, b"Content-Length: -1", body=b"hello"), Refuse(400)),
    ("cl_overflow", req(POST, H, b"Content-Length: 99999999999999999999999",
                        body=b"hello"), Refuse(400)),
    ("chunk_size_not_hex", req(POST, H, TE, body=b"zz\r\nhello\r\n0\r\n\r\n"), Refuse(400)),
    ("chunk_size_overflow", req(POST, H, TE,
                                body=b"fffffffffffffffff1\r\nhello\r\n0\r\n\r\n"), Refuse(400)),
    ("chunk_size_negative", req(POST, H, TE, body=b"-5\r\nhello\r\n0\r\n\r\n"), Refuse(400)),
    # RFC 9112 §6.1: an unknown transfer coding deserves 501; 400 is fine too.
    ("te_not_chunked", req(POST, H, b"Transfer-Encoding: gzip", body=b"hello"),
     Refuse(400, 501)),
    ("te_chunked_not_last", req(POST, H, b"Transfer-Encoding: chunked, gzip",
                                body=b"5\r\nhello\r\n0\r\n\r\n"), Refuse(400, 501)),
    ("te_obfuscated", req(POST, H, b"Transfer-Encoding: xchunked",
                          body=b"5\r\nhello\r\n0\r\n\r\n"), Refuse(400, 501)),
    ("te_in_http10", req(b"POST / HTTP/1.0", H, TE, body=b"5\r\nhello\r\n0\r\n\r\n"),
     Refuse(400)),
    ("obs_fold", req(GET, H, b"X-A: a", b" folded"), Refuse(400)),
    ("obs_fold_hiding_te", req(POST, H, b"X-A: a", b" Transfer-Encoding: chunked",
                               b"Content-Length: 5", body=b"hello"), Refuse(400)),
    # RFC 9112 §2.2 lets a recipient accept bare LF; then the upstream must
    # get a CRLF-framed request.
    ("bare_lf_everywhere", b"GET / HTTP/1.1\n" + H + b"\nConnection: close\n\n",
     Normalize("a CRLF-framed request", crlf_framed, close=False)),
    ("bare_lf_in_header", b"GET / HTTP/1.1\r\n" + H + b"\r\nX-A: a\nConnection: close\r\n\r\n",
     Normalize("a CRLF-framed request", crlf_framed, close=False)),
    ("bare_cr_in_header", b"GET / HTTP/1.1\r\n" + H + b"\r\nX-A: a\rb\r\n\r\n", Refuse(400)),
    ("space_before_colon", req(GET, H, b"X-A : a"), Refuse(400)),
    ("space_before_colon_te", req(POST, H, b"Transfer-Encoding : chunked",
                                  b"Content-Length: 5", body=b"hello"), Refuse(400)),
    ("space_before_first_header", req(GET, b" " + H), Refuse(400)),
    ("nul_in_header_value", req(GET, H, b"X-A: a\x00b"), Refuse(400)),
    ("ctl_in_header_value", req(GET, H, b"X-A: a\x01b"), Refuse(400)),
    ("del_in_header_value", req(GET, H, b"X-A: a\x7fb"), Refuse(400)),
    ("ctl_in_header_name", req(GET, H, b"X\x01A: a"), Refuse(400)),
    ("missing_host", req(GET, b"X-A: a"), Refuse(400)),
    ("duplicate_host", req(GET, H, b"Host: other.test"), Refuse(400)),
    ("empty_host", req(GET, b"Host:"), Refuse(400)),
    ("request_line_double_space", req(b"GET  / HTTP/1.1", H), Refuse(400)),
    ("request_line_extra_token", req(b"GET / HTTP/1.1 x", H), Refuse(400)),
    ("request_line_no_version", req(b"GET /", H), Refuse(400)),
    ("request_line_bad_method", req(b"G(T / HTTP/1.1", H), Refuse(400)),
    ("request_line_lowercase_version", req(b"GET / http/1.1", H), Refuse(400)),
    # RFC 9110 §2.5: an unknown minor version may be handled as HTTP/1.1.
    ("request_line_unknown_version", req(b"GET / HTTP/1.2", H, b"Connection: close"),
     Normalize("one request forwarded as HTTP/1.1", lambda r: r["line"].endswith(" HTTP/1.1"),
               close=False)),
    ("request_line_space_in_target", req(b"GET /a b HTTP/1.1", H), Refuse(400)),
    ("request_line_ctl_in_target", req(b"GET /a\x01b HTTP/1.1", H), Refuse(400)),
    ("uri_too_long", req(b"GET /" + b"a" * 9000 + b" HTTP/1.1", H), Refuse(414)),
    ("headers_too_large", req(GET, H, b"X-Big: " + b"a" * 40000), Refuse(431)),
]


def check_case(port, upstream, data, expect):
    """None when the server handled the case right, else why not."""
    upstream.clear()
    response, closed = raw_exchange(port, data)
    codes = statuses(response)
    # A follow-up on a fresh connection gets its own answer; once it has,
    # anything the bad request smuggled through has been recorded too.
    follow, _ = raw_exchange(port, req(b"GET /followup HTTP/1.1", H, b"Connection: close"))
    time.sleep(0.05)
    records = upstream.snapshot()
    forwarded = [r for r in records if not r["line"].startswith("GET /followup ")]
    problems = []
    if b"saw GET /followup" not in follow:
        problems.append(f"follow-up not answered: {follow[:80]!r}")
    refused = bool(codes) and codes[0] >= 400
    if isinstance(expect, Refuse) or refused:
        want = expect.codes if isinstance(expect, Refuse) else (400,)
        if not codes or codes[0] not in want:
            problems.append(f"status {codes[0] if codes else 'none'} (want {'/'.join(map(str, want))})")
        if forwarded:
            problems.append(f"upstream received {[r['line'][:60] for r in forwarded]}")
        if not closed:
            problems.append("connection left open")
    else:
        if codes != [200]:
            problems.append(f"statuses {codes} (want one 200 or a refusal)")
        if len(forwarded) != 1 or not expect.forwarded_ok(forwarded[0]):
            seen = [(r["line"][:60], r["headers"], r["body"]) for r in forwarded]
            problems.append(f"upstream should see {expect.want}, saw {seen}")
        if expect.close and not closed:
            problems.append("connection left open")
    if len(codes) > 1:
        problems.append(f"{len(codes)} responses {codes}")
    return "; ".join(problems) or None


def check_pipelined(port, upstream):
    """Three pipelined GETs in one write come back in order."""
    upstream.clear()
    data = (
        req(b"GET /one HTTP/1.1", H)
        + req(b"GET /two HTTP/1.1", H)
        + req(b"GET /three HTTP/1.1", H, b"Connection: close")
    )
    response, _ = raw_exchange(port, data)
    order = [response.find(f"saw GET /{n}".encode()) for n in ("one", "two", "three")]
    if statuses(response) != [200, 200, 200]:
        return f"statuses {statuses(response)}"
    if -1 in order or order != sorted(order):
        return f"answers out of order or missing: {response!r}"
    seen = [r["line"].split(" ")[1] for r in upstream.snapshot()]
    if seen != ["/one", "/two", "/three"]:
        return f"upstream saw {seen}"
    return None


def run_all(report, port, upstream, prefix):
    for name, data, expect in CASES:
        report.case(name, lambda: check_case(port, upstream, data, expect), prefix)
    report.case("pipelined_in_order", lambda: check_pipelined(port, upstream), prefix)


def main():
    report = Report()
    upstream = RecordingUpstream()
    cutover = Cutover(upstream.port)
    try:
        run_all(report, cutover.http_port, upstream, "")
    finally:
        cutover.stop()
    nginx = Nginx.start(upstream.port)
    if nginx is None:
        for name, _, _ in CASES:
            report.skip_nginx(name)
        report.skip_nginx("pipelined_in_order")
    else:
        try:
            run_all(report, nginx.http_port, upstream, "NGINX-")
        finally:
            nginx.stop()
    upstream.stop()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
