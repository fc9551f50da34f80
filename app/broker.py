"""The brokers as the service uses them: an embedded one that loses nothing, and a look into the
queues of either, so the reaper can tell a message that waits from one that is gone.

The embedded broker is Kombu's filesystem transport with its two races closed. Kombu writes a
message by creating its final `<time>_<uuid>.<queue>.msg` file and then writing it, and a consumer
lists the folder and reads whatever it finds: one that comes between the two reads an empty
file, and the message is lost (250 of 7,478 in a 20 s burst), or the worker dies on the decode
error. Here a message is written under a name no consumer matches and renamed into place (a
rename is atomic), and a consumer claims a file by renaming it into `claimed/` before reading
it, so two consumers never read one message and none reads half of one. Once read, the file
moves on to `taken/`, where it stays a lease, like a Redis message in the `unacked` hash: the
reaper counts a message taken a moment ago as waiting, not lost, while its worker has not yet
claimed the row. Both names start with the claim time; `recover` puts back into the queue what
a consumer killed mid-claim left in `claimed/`, and removes what is old in `taken/`.

There is no fsync: a message lost to a power cut is a row still queued whose message is gone,
which the reaper re-sends like any other lost one (the SQL row is the truth, not the folder).
"""

from __future__ import annotations

import base64
import contextlib
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
CLAIMED, TAKEN = "claimed", "taken"
WRITING = ".writing"  # a message being written: no queue's name ends so


class Channel(filesystem.Channel):
    @property
    def claimed_folder(self) -> str:
        return _subfolder(self.data_folder_in, CLAIMED)

    @property
    def taken_folder(self) -> str:
        return _subfolder(self.data_folder_in, TAKEN)

    def _put(self, queue: str, payload: dict, **kwargs) -> None:
        name = f"{int(round(monotonic() * 1000)):015d}_{uuid.uuid4()}.{queue}.msg"
        staging = os.path.join(self.data_folder_out, f".{name}{WRITING}")
        try:
            with open(staging, "wb") as f:
                f.write(dumps(payload).encode())
            os.rename(staging, os.path.join(self.data_folder_out, name))
        except OSError as exc:  # e.g. a full disk: no half-written file stays behind
            with contextlib.suppress(OSError):
                os.remove(staging)
            raise filesystem.ChannelError(f"cannot add {name!r} to the queue folder: {exc}") from exc

    def _get(self, queue: str) -> dict:
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            stamped = f"{round(time.time() * 1000)}-{name}"
            claimed = os.path.join(self.claimed_folder, stamped)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:  # another consumer claimed it first
                continue
            try:
                with open(claimed, "rb") as f:
                    text = f.read()
            finally:
                with contextlib.suppress(FileNotFoundError):  # put back meanwhile: we were stopped that long
                    os.rename(claimed, os.path.join(self.taken_folder, stamped))
            try:
                return loads(text)
            except ValueError:  # not written by us: dropped, not fatal (the reaper re-sends lost work)
                log.error("broker: dropped an unreadable message file %s", name)
        raise filesystem.Empty()


def _subfolder(parent: str, name: str) -> str:
    folder = os.path.join(parent, name)
    os.makedirs(folder, exist_ok=True)
    return folder


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES[EMBEDDED_SCHEME] = f"{__name__}:Transport"


def _claimed_at(folder: str, entry: str) -> tuple[float, str]:
    """When a file of `claimed/` or `taken/` was claimed (seconds since the epoch), and its name
    in the queue."""
    stamp, _, name = entry.partition("-")
    if stamp.isdigit():
        return int(stamp) / 1000, name
    return os.stat(os.path.join(folder, entry)).st_ctime, entry  # claimed by an older version


def recover(connection, older_than: float) -> dict[str, int]:
    """What is older than `older_than` seconds in the embedded broker's side folders: a claimed
    message (its consumer was killed between claiming and reading it, so no worker has it) is put
    back into its queue; a taken one is removed (its row is claimed, done, or re-sent by the
    reaper), and so is a half-written one (its publisher was killed). A no-op on other brokers."""
    channel = connection.default_channel
    found = {"restored": 0, "removed": 0}
    if not isinstance(channel, Channel):
        return found
    before, queue_folder = time.time() - older_than, channel.data_folder_in
    for folder in (channel.claimed_folder, channel.taken_folder):
        for entry in os.listdir(folder):
            with contextlib.suppress(FileNotFoundError):  # moved on meanwhile
                claimed_at, name = _claimed_at(folder, entry)
                if claimed_at >= before:
                    continue
                if folder == channel.claimed_folder:
                    os.rename(os.path.join(folder, entry), os.path.join(queue_folder, name))
                    found["restored"] += 1
                else:
                    os.remove(os.path.join(folder, entry))
    for entry in os.listdir(channel.data_folder_out):
        path = os.path.join(channel.data_folder_out, entry)
        with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
            if entry.endswith(WRITING) and os.stat(path).st_mtime < before:
                os.remove(path)
                found["removed"] += 1
    if any(found.values()):
        log.warning("broker: leftovers of killed processes: %s", found)
    return found


# -- what is waiting in a queue -------------------------------------------------------------------

def waiting(connection, queue: str, taken_within: float = float("inf")) -> set[tuple[str, int]]:
    """(task name, row id) of every message of `queue` that a worker may still run: waiting in the
    queue, or taken by a worker less than `taken_within` seconds ago (and, in Redis, not yet
    acknowledged). So a message between its worker's take and its row's claim is not lost; one
    taken by a worker killed mid-task, which Redis hands out again only after the visibility
    timeout (hours), counts as lost once it is old."""
    found = set()
    for payload in _payloads(connection, queue, taken_within):
        task = (payload.get("headers") or {}).get("task")
        args = _args(payload)
        if task and args and isinstance(args[0], int):
            found.add((task, args[0]))
    return found


def depth(connection, queue: str) -> int:
    """How many messages of `queue` wait for a worker (not counting those taken): Kombu's own
    count, the queue folder's `*.<queue>.msg` files or the lengths of Redis' lists per priority."""
    return int(connection.default_channel._size(queue))


def _payloads(connection, queue: str, taken_within: float) -> Iterator[dict]:
    channel = connection.default_channel
    if isinstance(channel, Channel):
        wanted, since = f"{queue}.msg", time.time() - taken_within
        for folder in (channel.data_folder_in, channel.claimed_folder, channel.taken_folder):
            for name in os.listdir(folder):
                if name.partition(".")[2] != wanted:
                    continue
                try:
                    if folder != channel.data_folder_in and _claimed_at(folder, name)[0] < since:
                        continue
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
