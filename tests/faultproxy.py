"""A TCP proxy on loopback that cuts a connection once after N client bytes (tusd's e2e tests
inject faults the same way). Used to interrupt a real upload mid-body."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    def __init__(
        self, upstream_port: int, cut_after_bytes: int, *, refuse_after_cut: bool = False
    ) -> None:
        """`refuse_after_cut`: once the cut happened, every new connection is closed at
        once (the network stays down), so the client gives up instead of retrying."""
        self.refuse_after_cut = refuse_after_cut
        self.upstream = ("127.0.0.1", upstream_port)
        self.cut_after = cut_after_bytes
        self.cuts = 0
        self._armed = True
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.refuse_after_cut and self.cuts:
                client.close()
                continue
            up = socket.create_connection(self.upstream, timeout=30)
            for src, dst, count in ((client, up, True), (up, client, False)):
                t = threading.Thread(
                    target=self._pump, args=(src, dst, client, up, count), daemon=True
                )
                t.start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        client: socket.socket,
        up: socket.socket,
        count: bool,
    ) -> None:
        seen = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count:
                    seen += len(data)
                    with self._lock:
                        cut = self._armed and seen > self.cut_after
                        if cut:
                            self._armed = False
                            self.cuts += 1
                    if cut:
                        keep = len(data) - (seen - self.cut_after)
                        dst.sendall(data[:keep])
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.close()
