"""uvicorn's h11 protocol with a deadline on request heads (the part of a slow client no ASGI app sees).

uvicorn calls the app only once a request's head (request line + headers) is complete, and does not
time that out: a client that connects and sends nothing, or sends half a header line, holds its
connection forever. :func:`head_timeout_protocol` returns a subclass of uvicorn's ``H11Protocol`` whose
rule is: whenever the connection waits for a request head (h11's client state is IDLE: a fresh
connection, or after a finished request), a timer of ``timeout`` seconds runs from that moment (bytes
that arrive do not restart it); if it fires while still waiting, the connection gets a 408 with an
OpenAI-style JSON body when part of a head had arrived, and is closed. The timer is cancelled as soon
as a head is complete (the body then has the app's own deadline, ``create_app(body_timeout=)``).

It also answers what h11 cannot parse (a bad request line, a malformed chunk, conflicting lengths) with
the same OpenAI-style JSON body instead of uvicorn's plain text, then closes the connection.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


def _timeout_response(timeout: float) -> bytes:
    body = error_body(f"the request head did not arrive within {timeout:g} s (bin/serve --body-timeout)",
                      "request_timeout")
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


def head_timeout_protocol(timeout: float) -> type[H11Protocol]:
    """The H11Protocol subclass that enforces a ``timeout``-second deadline on every request head."""

    class HeadTimeoutProtocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None
        head_bytes = 0  # bytes received while waiting for the current head

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.head_timer is not None:
                self.head_bytes += len(data)
            super().data_received(data)
            self._watch_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_head()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request h11 cannot parse, as JSON (then the connection is closed)."""
            body = error_body(f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})", "invalid_http_request")
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _watch_head(self) -> None:
            """Arm the timer on entering 'waiting for a head'; cancel it once a head is complete."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.head_timer is None:
                self.head_bytes = 0
                self.head_timer = self.loop.call_later(timeout, self._expire)
            elif not waiting:
                self._stop_timer()

        def _stop_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _expire(self) -> None:
            self.head_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self.head_bytes:
                self.transport.write(_timeout_response(timeout))
            self.transport.close()

    return HeadTimeoutProtocol
