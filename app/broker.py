"""The brokers as the service uses them: an embedded one that loses nothing, and a look into the
queues of either, so the reaper can tell a message that waits from one that is gone.

The embedded broker is Kombu's filesystem transport with its two races closed. Kombu writes a
message by creating its final `<time>_<uuid>.<queue>.msg` file and then writing it, and a consumer
lists the folder and reads whatever it finds: one that comes between the two reads an empty
file, and the message is lost (250 of 7,478 in a 20 s burst), or the worker dies on the decode
error. Here a message is written under a name no consumer matches and renamed into place (a
rename is atomic), and a consumer claims a file by renaming it into its `claimed/` folder before
reading it, so two consumers never read one message and none reads half of one.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from time import monotonic

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)
EMBEDDED_SCHEME = "sdmerge-filesystem"
CLAIMED = "claimed"


class Channel(filesystem.Channel):
    @property
    def claimed_folder(self) -> str:
        folder = os.path.join(self.data_folder_in, CLAIMED)
        os.makedirs(folder, exist_ok=True)
        return folder

    def _put(self, queue: str, payload: dict, **kwargs) -> None:
        name = f"{int(round(monotonic() * 1000)):015d}_{uuid.uuid4()}.{queue}.msg"
        staging = os.path.join(self.data_folder_out, f".{name}.writing")  # matches no queue
        with open(staging, "wb") as f:
            f.write(dumps(payload).encode())
        os.rename(staging, os.path.join(self.data_folder_out, name))

    def _get(self, queue: str) -> dict:
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(self.claimed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:  # another consumer claimed it first
                continue
            try:
                with open(claimed, "rb") as f:
                    text = f.read()
            finally:
                os.remove(claimed)
            try:
                return loads(text)
            except ValueError:  # not written by us: dropped, not fatal (the reaper re-sends lost work)
                log.error("broker: dropped an unreadable message file %s", name)
        raise filesystem.Empty()


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES[EMBEDDED_SCHEME] = f"{__name__}:Transport"


# -- what is waiting in a queue -------------------------------------------------------------------

def waiting(connection, queue: str, taken_within: float = float("inf")) -> set[tuple[str, int]]:
    """(task name, row id) of every message of `queue` that a worker may still run: waiting in the
    queue, or taken by a worker less than `taken_within` seconds ago and not acknowledged yet. (A
    worker killed mid-task leaves its message unacknowledged in Redis, which hands it out again
    only after the visibility timeout, hours later: that message counts as lost once it is old.)"""
    found = set()
    for payload in _payloads(connection, queue, taken_within):
        task = (payload.get("headers") or {}).get("task")
        args = _args(payload)
        if task and args and isinstance(args[0], int):
            found.add((task, args[0]))
    return found


def _payloads(connection, queue: str, taken_within: float) -> Iterator[dict]:
    channel = connection.default_channel
    if isinstance(channel, Channel):
        wanted = f"{queue}.msg"
        for folder in (channel.data_folder_in, channel.claimed_folder):
            for name in os.listdir(folder):
                if name.partition(".")[2] == wanted:
                    try:
                        with open(os.path.join(folder, name), "rb") as f:
                            yield loads(f.read())
                    except (OSError, ValueError):  # taken meanwhile
                        continue
        return
    client = channel.client  # redis: the queue is a list; taken messages wait in the `unacked` hash
    for raw in client.lrange(queue, 0, -1):
        yield _json(raw)
    recent = {tag.decode() if isinstance(tag, bytes) else tag
              for tag in client.zrangebyscore(channel.unacked_index_key, time.time() - taken_within, "+inf")}
    for tag, raw in client.hgetall(channel.unacked_key).items():
        item = _json(raw)
        if (tag.decode() if isinstance(tag, bytes) else tag) in recent and isinstance(item, list) and item \
                and isinstance(item[0], dict) \
                and item[0].get("properties", {}).get("delivery_info", {}).get("routing_key") == queue:
            yield item[0]


def _json(raw: bytes | str) -> dict | list:
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def _args(payload: dict) -> list:
    """A Celery message's positional arguments (its body is JSON, base64-encoded by kombu)."""
    body = payload.get("body")
    try:
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
    except (TypeError, ValueError):
        return []
    return list(decoded[0]) if isinstance(decoded, list) and decoded and isinstance(decoded[0], list) else []
