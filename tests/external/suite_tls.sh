#!/usr/bin/env bash
# TLS policy, checked from outside with sslscan and testssl.sh.
#
# Starts cutover ($CUTOVER_BIN, else target/release/cutover) on free
# 127.0.0.1 ports with the dev certificate and two sites: the catch-all with
# `hsts = "max-age=63072000; includeSubDomains"`, and app.localhost
# without HSTS. Then checks: no SSLv2/SSLv3, TLS 1.0/1.1 refused, TLS
# 1.2/1.3 offered, only ECDHE + AEAD suites, no renegotiation, no
# compression, HSTS on HTTPS when configured and nowhere else.
# The same scans run against nginx (Debian's defaults for ssl_protocols and
# ssl_ciphers, the same certificate) when nginx is installed.
#
# Output (see tests/external/run): `PASS <name>` / `FAIL <name>: <why>`, and
# `NGINX-PASS` / `NGINX-FAIL` / `NGINX-SKIP` for the comparison.
# Needs: sslscan, testssl (Debian packages sslscan, testssl.sh), curl,
# python3. Every tool run is bounded by `timeout`.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
BIN="${CUTOVER_BIN:-$ROOT/target/release/cutover}"
CERT="$ROOT/certs-dev/localhost.pem"
KEY="$ROOT/certs-dev/localhost-key.pem"
CA="$ROOT/certs-dev/ca.pem"
HSTS="max-age=63072000; includeSubDomains"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null
    # Bounded wait: up to 5 s, then SIGKILL.
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT

failed=0
# result PREFIX NAME WHY: WHY empty means pass.
result() {
  local prefix="$1" name="$2" why="$3"
  if [[ -z "$why" ]]; then
    echo "${prefix}PASS $name"
  else
    echo "${prefix}FAIL $name: $why"
    [[ -z "$prefix" ]] && failed=$((failed + 1))
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # PORT PID
  for _ in $(seq 150); do
    kill -0 "$2" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

for tool in sslscan testssl curl python3; do
  if ! command -v "$tool" >/dev/null; then
    result "" "tls-tools-installed" "$tool not found (apt-get install sslscan testssl.sh curl)"
    exit 1
  fi
done
if [[ ! -x "$BIN" ]]; then
  result "" "tls-cutover-binary" "$BIN is not executable (set CUTOVER_BIN or build --release)"
  exit 1
fi

# --- cutover ---------------------------------------------------------------
http_port="$(free_port)"
https_port="$(free_port)"
cat >"$work/proxy.toml" <<EOF
[server]
http = "127.0.0.1:$http_port"
https = "127.0.0.1:$https_port"
shutdown_timeout = "2s"

[[tls]]
cert = "$CERT"
key = "$KEY"

[[site]]
hosts = ["app.localhost"]
[[site.route]]
path = "/"
status = 200

[[site]]
hosts = ["*"]
hsts = "$HSTS"
[[site.route]]
path = "/"
status = 200
EOF
RUST_LOG=warn "$BIN" serve --config "$work/proxy.toml" >"$work/cutover.log" 2>&1 &
pids+=($!)
if ! wait_port "$https_port" "${pids[0]}"; then
  result "" "tls-cutover-starts" "cutover did not listen: $(tail -3 "$work/cutover.log" | tr '\n' ' ')"
  exit 1
fi

# --- nginx (optional) ------------------------------------------------------
nginx_port=""
if command -v nginx >/dev/null; then
  nginx_port="$(free_port)"
  mkdir -p "$work/nginx"
  cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
error_log $work/nginx/error.log warn;
pid $work/nginx/nginx.pid;
daemon off;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:$nginx_port ssl http2;
    ssl_certificate $CERT;
    ssl_certificate_key $KEY;
    location / { return 200 "ok\n"; }
  }
}
EOF
  nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log" >/dev/null 2>&1 &
  pids+=($!)
  if ! wait_port "$nginx_port" "${pids[1]}"; then
    echo "nginx did not start; skipping the comparison" >&2
    nginx_port=""
  fi
fi

# --- scans -----------------------------------------------------------------
scan() { # PORT NAME: writes $work/NAME.xml and $work/NAME.json
  timeout 180 sslscan --no-colour --xml="$work/$2.xml" "127.0.0.1:$1" >"$work/$2.sslscan.txt" 2>&1
  timeout 300 testssl --quiet --color 0 --warnings off --ip one -p -s -f -R -C -h \
    --jsonfile "$work/$2.json" "127.0.0.1:$1" >"$work/$2.testssl.txt" 2>&1
}
scan "$https_port" cutover
[[ -n "$nginx_port" ]] && scan "$nginx_port" nginx

# Every check reads one server's scan results and prints why it failed,
# or nothing. python3 parses the XML/JSON.
check() { # CHECK NAME
  python3 - "$1" "$work/$2.xml" "$work/$2.json" <<'PY'
import json, sys
import xml.etree.ElementTree as ET

check, xml_path, json_path = sys.argv[1:4]

def sslscan():
    try:
        return ET.parse(xml_path).getroot().find("ssltest")
    except (OSError, ET.ParseError) as err:
        print(f"no sslscan result ({err})")
        sys.exit(0)

def testssl():
    try:
        with open(json_path) as f:
            return {e["id"]: e for e in json.load(f)}
    except (OSError, ValueError) as err:
        print(f"no testssl result ({err})")
        sys.exit(0)

def protocol(test, kind, version):
    for p in test.iter("protocol"):
        if p.get("type") == kind and p.get("version") == version:
            return p.get("enabled") == "1"
    return None

why = []
if check == "sslscan-no-sslv2-sslv3":
    test = sslscan()
    for v in ("2", "3"):
        state = protocol(test, "ssl", v)
        if state is not False:
            why.append(f"SSLv{v} {'enabled' if state else 'not reported'}")
elif check == "sslscan-tls10-tls11-refused":
    test = sslscan()
    for v in ("1.0", "1.1"):
        state = protocol(test, "tls", v)
        if state is not False:
            why.append(f"TLSv{v} {'enabled' if state else 'not reported'}")
elif check == "sslscan-tls12-tls13-offered":
    test = sslscan()
    for v in ("1.2", "1.3"):
        if protocol(test, "tls", v) is not True:
            why.append(f"TLSv{v} not enabled")
elif check == "sslscan-only-ecdhe-aead-suites":
    test = sslscan()
    ciphers = [c for c in test.iter("cipher") if c.get("status") in ("accepted", "preferred")]
    if not ciphers:
        why.append("no accepted cipher at all (scan failed?)")
    for c in ciphers:
        name, version = c.get("cipher", ""), c.get("sslversion", "")
        if version == "TLSv1.3":
            ok = name in ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
        else:
            # AEAD: AES-GCM, ChaCha20-Poly1305, AES-CCM(8).
            aead = "-GCM-" in name or name.endswith("CHACHA20-POLY1305") or "-CCM" in name
            ok = name.startswith("ECDHE-") and aead
        if not ok:
            why.append(f"{version} {name}")
    if why and ciphers:
        why.insert(0, "non-ECDHE-AEAD suites accepted:")
elif check == "sslscan-no-renegotiation":
    test = sslscan()
    r = test.find("renegotiation")
    if r is None:
        why.append("renegotiation not reported")
    elif r.get("supported") != "0":
        why.append(f"renegotiation supported (secure={r.get('secure')})")
elif check == "testssl-protocols":
    t = testssl()
    for pid in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        finding = t.get(pid, {}).get("finding", "missing")
        if not finding.startswith("not offered"):
            why.append(f"{pid}: {finding}")
    for pid in ("TLS1_2", "TLS1_3"):
        finding = t.get(pid, {}).get("finding", "missing")
        if not finding.startswith("offered"):
            why.append(f"{pid}: {finding}")
elif check == "testssl-no-weak-cipher-categories":
    t = testssl()
    # AVERAGE is testssl's "obsoleted CBC ciphers" category.
    for pid in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT",
                "cipherlist_LOW", "cipherlist_3DES_IDEA", "cipherlist_AVERAGE"):
        finding = t.get(pid, {}).get("finding", "missing")
        if not finding.startswith("not offered"):
            why.append(f"{pid}: {finding}")
    if not t.get("cipherlist_STRONG", {}).get("finding", "").startswith("offered"):
        why.append("no strong cipher offered (scan failed?)")
elif check == "testssl-forward-secrecy":
    t = testssl()
    entry = t.get("PFS") or t.get("FS") or {}
    if not entry.get("finding", "").startswith("offered"):
        why.append(f"forward secrecy: {entry.get('finding', 'missing')}")
elif check == "testssl-no-client-renegotiation":
    t = testssl()
    entry = t.get("secure_client_renego", {})
    finding = entry.get("finding", "")
    if not (finding.startswith("not vulnerable") or finding.startswith("likely not vulnerable")):
        why.append(f"client-initiated renegotiation: {entry.get('finding', 'missing')}")
elif check == "testssl-no-compression":
    t = testssl()
    entry = t.get("CRIME_TLS", {})
    if not entry.get("finding", "").startswith("not vulnerable"):
        why.append(f"CRIME_TLS: {entry.get('finding', 'missing')}")
elif check == "testssl-hsts":
    t = testssl()
    entry = t.get("HSTS_time", {})
    if "63072000" not in entry.get("finding", ""):
        why.append(f"HSTS_time: {entry.get('finding') or t.get('HSTS', {}).get('finding', 'missing')}")
    if "includes subdomains" not in t.get("HSTS_subdomains", {}).get("finding", ""):
        why.append("includeSubDomains missing")
else:
    why.append(f"unknown check {check}")
print(" ".join(why))
PY
}

# A ClientHello offering TLS 1.2 with only DEFLATE compression (method 1,
# no null method): a server without compression must refuse it.
deflate_only_hello() { # PORT -> prints why it failed, or nothing
  python3 - "$1" <<'PY'
import socket, struct, sys
port = int(sys.argv[1])
ext = bytes.fromhex(
    "000a00060004001d0017"    # supported_groups: x25519, secp256r1
    "000b00020100"            # ec_point_formats
    "000d0008000608040403" "0401"  # signature_algorithms
)
body = b"\x03\x03" + b"\x07" * 32 + b"\x00" + struct.pack(">H", 4) + b"\xc0\x2b\xc0\x2f"
body += b"\x01\x01"  # compression methods: DEFLATE only
body += struct.pack(">H", len(ext)) + ext
hs = b"\x01\x00" + struct.pack(">H", len(body)) + body
record = b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs
try:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(record)
        first = s.recv(1)
except socket.timeout:
    print("no answer within 10s")
    sys.exit(0)
except OSError:
    first = b""
if first == b"\x16":
    print("answered a DEFLATE-only ClientHello with a handshake")
PY
}

# HSTS must be on HTTPS (configured site), and nowhere else.
hsts_header() { # URL [curl args...] -> the header value, or empty
  local url="$1"
  shift
  timeout 20 curl -sS -o /dev/null -D - --max-time 10 --cacert "$CA" "$@" "$url" 2>/dev/null |
    tr -d '\r' | awk -F': ' 'tolower($1) == "strict-transport-security" { print $2 }'
}

for case in sslscan-no-sslv2-sslv3 sslscan-tls10-tls11-refused sslscan-tls12-tls13-offered \
  sslscan-only-ecdhe-aead-suites sslscan-no-renegotiation testssl-protocols \
  testssl-no-weak-cipher-categories testssl-forward-secrecy \
  testssl-no-client-renegotiation testssl-no-compression; do
  result "" "$case" "$(check "$case" cutover)"
  if [[ -n "$nginx_port" ]]; then
    result "NGINX-" "$case" "$(check "$case" nginx)"
  else
    echo "NGINX-SKIP $case"
  fi
done

result "" "deflate-only-hello-refused" "$(deflate_only_hello "$https_port")"
if [[ -n "$nginx_port" ]]; then
  result "NGINX-" "deflate-only-hello-refused" "$(deflate_only_hello "$nginx_port")"
else
  echo "NGINX-SKIP deflate-only-hello-refused"
fi

# HSTS: nginx would need an explicit add_header, so there is nothing to
# compare; these cases are cutover's only.
result "" "testssl-hsts-when-configured" "$(check testssl-hsts cutover)"
echo "NGINX-SKIP testssl-hsts-when-configured"

value="$(hsts_header "https://localhost:$https_port/" --resolve "localhost:$https_port:127.0.0.1")"
why=""
[[ "$value" == "$HSTS" ]] || why="HTTPS answer has Strict-Transport-Security '${value}', want '$HSTS'"
result "" "hsts-on-https" "$why"

value="$(hsts_header "http://127.0.0.1:$http_port/")"
why=""
[[ -z "$value" ]] || why="plain HTTP answer has Strict-Transport-Security '$value'"
result "" "hsts-never-on-plain-http" "$why"

value="$(hsts_header "https://app.localhost:$https_port/" --resolve "app.localhost:$https_port:127.0.0.1")"
code="$(timeout 20 curl -sS -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$CA" \
  --resolve "app.localhost:$https_port:127.0.0.1" "https://app.localhost:$https_port/" 2>&1)"
why=""
[[ "$code" == "200" ]] || why="site without hsts did not answer 200 ($code)"
[[ -z "$value" ]] || why="site without hsts sent Strict-Transport-Security '$value'"
result "" "hsts-only-where-configured" "$why"

[[ $failed -eq 0 ]]
