"""A grid that delivers each message to a ClientApp in this process, at once.

The server side (``server.federation``, ``server.secure_aggregation``) talks to it exactly as
to Flower's grids: push, pull, node ids. Each node has its own Context, kept across messages
(as a SuperNode keeps a run's), and its own ClientApp, so a test can give one node a
misbehaving app. A node listed in ``silent`` gets its messages and never answers (a node
that dropped out): the server's bounded wait decides.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp


class InProcessGrid:
    def __init__(self, apps: dict[int, ClientApp], node_configs: dict[int, dict], run_config: dict) -> None:
        self.apps = apps
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=node_configs[n], state=RecordDict(),
                                    run_config=dict(run_config)) for n in apps}
        self.replies: dict[str, Message] = {}
        self.silent: set[int] = set()
        # Called with (node id, message) before delivery: a test's hook to drop a node mid-protocol.
        self.before_delivery: Callable[[int, Message], None] | None = None
        # Every exchange, in order: (node, the message as the server sent it, the reply it got).
        self.exchanges: list[tuple[int, Message, Message]] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            node = message.metadata.dst_node_id
            ids.append(mid)
            if self.before_delivery is not None:
                self.before_delivery(node, message)
            if node in self.silent:
                continue
            # A copy, as the wire makes one: the server may send one content to many nodes, and
            # a node's mods may change what they receive.
            received = copy.deepcopy(message)
            try:
                reply = self.apps[node](received, self.contexts[node])
            except Exception as exc:  # what a SuperNode turns into an error reply
                from flwr.app import Error

                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            self.replies[mid] = copy.deepcopy(reply)
            self.exchanges.append((node, message, self.replies[mid]))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]
