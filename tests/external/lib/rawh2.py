"""A raw HTTP/2 client for probes: it writes exactly the frames it is told
to (hyperframe + hpack, from the `h2` package's dependencies), with no
validation of its own, so malformed requests reach the server as sent."""

import socket
import time

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from harness import IO_TIMEOUT, tls_context

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 error codes, for messages.
ERRORS = {
    0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
    0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM", 0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR", 0xB: "ENHANCE_YOUR_CALM",
}


class Closed(Exception):
    """The server closed the connection."""


class RawH2:
    def __init__(self, port, host="localhost"):
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock = tls_context(["h2"]).wrap_socket(raw, server_hostname=host)
        if self.sock.selected_alpn_protocol() != "h2":
            raise RuntimeError(f"ALPN chose {self.sock.selected_alpn_protocol()!r}, not h2")
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, *frames):
        self.sock.sendall(b"".join(f.serialize() for f in frames))

    def block(self, headers):
        """An HPACK block for `headers` (list of (name, value) byte pairs),
        names and values exactly as given."""
        return self.encoder.encode(headers, huffman=False)

    def headers_frame(self, stream_id, headers, end_stream=True, end_headers=True):
        flags = set()
        if end_stream:
            flags.add("END_STREAM")
        if end_headers:
            flags.add("END_HEADERS")
        return HeadersFrame(stream_id, self.block(headers), flags=flags)

    @staticmethod
    def data(stream_id, payload, end_stream=True):
        return DataFrame(stream_id, payload, flags={"END_STREAM"} if end_stream else set())

    @staticmethod
    def rst(stream_id, code=0x8):
        return RstStreamFrame(stream_id, error_code=code)

    @staticmethod
    def ping(n):
        return PingFrame(0, opaque_data=n.to_bytes(8, "big"))

    @staticmethod
    def continuation(stream_id, fragment, end_headers=False):
        return ContinuationFrame(stream_id, fragment, flags={"END_HEADERS"} if end_headers else set())

    def next_frame(self, deadline):
        """The next frame, or None at `deadline`; raises Closed on EOF."""
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9:9 + length]))
                    self.buffer = self.buffer[9 + length:]
                    self._react(frame)
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except (ConnectionResetError, BrokenPipeError, OSError) as err:
                raise Closed() from err
            if not chunk:
                raise Closed()
            self.buffer += chunk

    def _react(self, frame):
        """Keeps the connection polite: ACK settings, decode header blocks
        so the HPACK state stays in step."""
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            try:
                self.sock.sendall(SettingsFrame(0, flags={"ACK"}).serialize())
            except OSError:
                pass  # a flood probe may have left the TLS writer unusable
        if isinstance(frame, HeadersFrame):
            frame.decoded = dict(self.decoder.decode(frame.data, raw=False))

    def outcome(self, stream_id, timeout=IO_TIMEOUT):
        """What became of `stream_id`: ("status", code), ("reset", code),
        ("goaway", code), ("closed", None) or ("timeout", None)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                frame = self.next_frame(deadline)
                if frame is None:
                    return ("timeout", None)
                if isinstance(frame, RstStreamFrame) and frame.stream_id == stream_id:
                    return ("reset", frame.error_code)
                if isinstance(frame, HeadersFrame) and frame.stream_id == stream_id:
                    return ("status", int(frame.decoded.get(":status", "0")))
                if isinstance(frame, GoAwayFrame):
                    return ("goaway", frame.error_code)
        except Closed:
            return ("closed", None)

    def drain(self, timeout):
        """Reads frames until the connection closes or `timeout` passes;
        returns the frames read and whether the server closed."""
        frames = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                frame = self.next_frame(deadline)
                if frame is None:
                    return frames, False
                frames.append(frame)
        except Closed:
            return frames, True


def describe(outcome):
    kind, code = outcome
    if kind in ("reset", "goaway"):
        return f"{kind} {ERRORS.get(code, hex(code))}"
    if kind == "status":
        return f"status {code}"
    return kind


__all__ = [
    "Closed", "DataFrame", "GoAwayFrame", "HeadersFrame", "PingFrame", "RawH2", "RstStreamFrame",
    "WindowUpdateFrame", "describe", "ERRORS",
]
