"""The key-holder service's HTTP protocol: uvicorn's h11 protocol plus a header timeout.

uvicorn times out only idle keep-alive connections, and any byte received cancels that timer, so a
client that opens a connection and sends half a request line (or a header a byte a minute) holds a
connection open for ever. Here a request's line and headers must be complete within
`header_timeout` seconds of the connection opening or of the previous response; else the server
closes the connection.
"""

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds
MAX_HEADER_BYTES = 8 * 1024  # request line and headers (h11's limit on an incomplete event)


def header_timeout_protocol(header_timeout: float = HEADER_TIMEOUT) -> type[asyncio.Protocol]:
    """An H11Protocol class that closes a connection whose headers take longer than `header_timeout`."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_header_timer()

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a whole request line and headers arrived
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._start_header_timer()

        def _start_header_timer(self) -> None:
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
