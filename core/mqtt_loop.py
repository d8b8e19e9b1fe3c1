"""A paho client driven by an asyncio event loop instead of a network thread.

Shaped after Home Assistant's MQTT client: the loop watches paho's socket and calls
``loop_read`` when it is readable; the owner drives ``loop_misc`` (keepalive) with a timer.

Writes differ from the textbook ``add_writer`` on every ``on_socket_register_write``: paho asks
for a writer after each packet it queues, and a connected socket is nearly always writable, so
waiting for epoll to say so costs two ``epoll_ctl`` calls and a loop turn per message. Here the
queued packets are written later in the same loop turn (``call_soon``: a publish from inside a
paho callback must not write there); only what the kernel buffer does not take waits for a
real writer. ``TCP_NODELAY`` is set on the socket (paho never does; without it a second small
message waits ~40 ms for an ACK).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho


class LoopSocket:
    """Installs itself as ``client``'s socket callbacks; ``on_open(sock)`` runs once the
    socket is watched."""

    def __init__(self, client: paho.Client, loop: asyncio.AbstractEventLoop, *,
                 on_open: Callable[[Any], None] | None = None) -> None:
        self.client = client
        self.loop = loop
        self.sock: Any = None
        self._on_open_hook = on_open
        self._writer = False  # a real add_writer is registered
        self._flush_pending = False
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def _on_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.loop.add_reader(sock, client.loop_read)
        if self._on_open_hook is not None:
            self._on_open_hook(sock)

    def _on_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_reader(sock)
        if self._writer:
            self.loop.remove_writer(sock)
            self._writer = False
        self.sock = None

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this once until the next unregister, however many packets it queues.
        if not self._writer and not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._writer:
            self._writer = False
            self.loop.remove_writer(sock)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._writer or self.sock is None:
            return
        self.client.loop_write()
        # Left over: the kernel buffer is full. paho does not ask again (its request is still
        # open), so the writer goes on here and its unregister once all is written removes it.
        if self.client.want_write() and self.sock is not None and not self._writer:
            self._writer = True
            self.loop.add_writer(self.sock, self.client.loop_write)
