"""A synchronous in-process Flower Grid: the fedkin protocol without any Flower runtime
(shared by ``test_flower.py`` and ``test_privacy_release.py``; import after
``pytest.importorskip("flwr")``)."""

from __future__ import annotations

import uuid

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid


class FakeGrid(Grid):
    """Delivers each pushed message to the ClientApp at once, one Context per node (as a
    SuperNode keeps it). ``duplicate`` re-delivers every train message (at-least-once)."""

    def __init__(self, client_app, node_configs: list[dict], duplicate: bool = False) -> None:
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(
                run_id=1, node_id=1000 + i, node_config=cfg, state=RecordDict(), run_config={}
            )
            for i, cfg in enumerate(node_configs)
        }
        self.replies: dict[str, Message] = {}
        self.duplicate = duplicate
        self.errors: list[str] = []
        self.train_replies: list[Message] = []  # train replies that left the nodes
        self.sent: list[tuple[str, int, Message]] = []  # (type, partition-id, reply): all of them

    def set_run(self, run) -> None: ...

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message:
        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(message, context)
        except Exception as err:  # as a SuperNode does: an error reply
            from flwr.app import Error

            self.errors.append(str(err))
            reply = Message(Error(code=0, reason=str(err)), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        partition = int(context.node_config.get("partition-id", -1))
        self.sent.append((message.metadata.message_type, partition, reply))
        if message.metadata.message_type == "train" and not reply.has_error():
            self.train_replies.append(reply)
        return reply

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = self._deliver(message)
            if self.duplicate and message.metadata.message_type == "train":
                self._deliver(message)  # the duplicate's reply is lost, its effect must not be
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a Flower runtime sets in the ServerApp's process before messages are created."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
