"""A TCP proxy on 127.0.0.1 in front of another loopback server, which can drop every
connection for a while (an S3 outage as a client sees it: resets, then refusals)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FlakyProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.down_until = 0.0
        self.dropped = 0
        self._triggers: list[tuple[bytes, float]] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def outage(self, seconds: float) -> None:
        """From now on for `seconds`: open connections are reset, new ones closed at once."""
        self.down_until = time.monotonic() + seconds
        with self._lock:
            for s in list(self._open):
                self._reset(s)

    def outage_on(self, pattern: bytes, seconds: float) -> None:
        """Start an outage of `seconds` when a client first sends bytes with `pattern`
        (e.g. a file's name in a PUT request line); that request is dropped too. Each
        trigger fires once; several may be armed."""
        with self._lock:
            self._triggers.append((pattern, seconds))

    @property
    def armed(self) -> list[bytes]:
        """Patterns whose outage has not started yet."""
        return [pattern for pattern, _ in self._triggers]

    def _fired(self, data: bytes) -> float | None:
        with self._lock:
            for i, (pattern, seconds) in enumerate(self._triggers):
                if pattern in data:
                    del self._triggers[i]
                    return seconds
        return None

    def close(self) -> None:
        self._stop = True
        self.server.close()

    def _reset(self, s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        self._open.discard(s)
        self.dropped += 1

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                with self._lock:
                    self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if (seconds := self._fired(data)) is not None:
                    self.outage(seconds)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                for s in (src, dst):
                    if s in self._open:
                        self._open.discard(s)
                        with contextlib.suppress(OSError):
                            s.close()
