"""Subscribes to a vLLM engine core's KV events and keeps Tandem's event log of them (engine.vllm.prefix_events).

vLLM's scheduler runs in the engine-core process and publishes each step's
prefix-cache events over ZeroMQ (vllm.distributed.kv_events
ZmqEventPublisher): on a PUB socket, frames (topic, 8-byte big-endian
sequence number, msgpack KVEventBatch), and on a ROUTER "replay" socket it
answers a request (a start sequence number) with every batch still in its
buffer from there on, then an end marker (sequence -1). Both endpoints are
`ipc://` paths in the engine's private directory, bound by the engine core.

One asyncio task on the engine's event loop reads the PUB stream (so the
log, which that loop owns, is only touched there) and hands the batches to
`VllmPrefixEvents`. A gap in the numbering (ZeroMQ drops what a slow or not
yet connected subscriber misses) is filled from the replay socket; what the
replay no longer holds is given up (`skip_to`: every translated block is
forgotten, routers then price this worker as uncached until blocks are
stored again). Each time the subscriber connects to a publisher (the
engine core bound its socket: at start, and again after a restart, as an
`ipc://` connection drops only when its peer closes), the bridge starts
over from that publisher's batch 0, replayed.

Only events a plain token prompt can hit are kept: the device tier (medium
"GPU", what vLLM calls its main cache on every platform), the first KV cache
group, no LoRA and no extra hash keys.

Lifecycle: `start()` before the engine core starts (the subscriber connects
to a path not bound yet; ZeroMQ retries), `close()` after it stopped; close
is safe twice and before start, and leaves no socket or task behind.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from engine.vllm.prefix_events import Cleared, Event, Removed, Stored, VllmPrefixEvents
from runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# The replay socket answers from the publisher thread's poll loop (every 0.1 s at most when idle).
REPLAY_TIMEOUT_S = 5.0
_END_SEQ = -1
_MAIN_MEDIUM = "GPU"


class KvEventsBridge:
    """vLLM's KV events for one engine, translated into `events.log`. See the module docstring."""

    def __init__(self, directory: Path, block_size: int) -> None:
        self.endpoint = f"ipc://{directory}/kv-events"
        self.replay_endpoint = f"ipc://{directory}/kv-events-replay"
        self.events = VllmPrefixEvents(block_size)
        self._context: Any = None
        self._sub: Any = None
        self._monitor: Any = None
        self._replay: Any = None
        self._task: asyncio.Task[None] | None = None

    def vllm_config(self) -> Any:
        """The KVEventsConfig that makes vLLM publish where this bridge listens."""
        from vllm.config import KVEventsConfig

        return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=self.endpoint,
                              replay_endpoint=self.replay_endpoint)

    def start(self) -> None:
        """Connects and starts reading; called once, on the event loop that owns `events.log`."""
        import zmq
        import zmq.asyncio

        if self._context is not None:
            raise RuntimeError("KvEventsBridge.start() is called once")
        self._context = zmq.asyncio.Context()
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._monitor = self._sub.get_monitor_socket(zmq.EVENT_CONNECTED)
        self._sub.connect(self.endpoint)
        self._connect_replay()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vllm-kv-events")

    async def close(self) -> None:
        """Stops reading and closes every socket. Safe twice, and before start()."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._sub is not None:
            self._sub.disable_monitor()
        for socket in (self._monitor, self._sub, self._replay):
            if socket is not None:
                socket.close(linger=0)
        self._monitor = self._sub = self._replay = None
        context, self._context = self._context, None
        if context is not None:
            context.term()

    async def _run(self) -> None:
        import msgspec
        import zmq
        import zmq.asyncio
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        poller = zmq.asyncio.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._sub, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            if self._monitor in ready:
                await self._monitor.recv_multipart()  # connected to a publisher, maybe a new one
                self.events.restarted()
                await self._fill_from_replay(decoder)
                continue
            frames = await self._sub.recv_multipart()
            if len(frames) != 3:
                continue  # not a (topic, seq, batch) message: whatever it carried comes back as a gap
            seq = int.from_bytes(frames[1], "big", signed=True)
            try:
                events = translate(decoder.decode(frames[2]).events)
            except msgspec.DecodeError as exc:
                log.warning("vLLM KV event batch %d is unreadable (%s): dropped, as a gap", seq, exc)
                continue
            if self.events.accept(seq, events):
                continue
            await self._fill_from_replay(decoder)
            if not self.events.accept(seq, events):
                log.warning("vLLM KV event batches %d..%d are lost: routers miss the blocks stored before",
                            self.events.next_seq, seq - 1)
                self.events.skip_to(seq)
                self.events.accept(seq, events)

    async def _fill_from_replay(self, decoder: Any) -> None:
        """Applies what the publisher's replay buffer holds from `events.next_seq` on."""
        import msgspec

        await self._replay.send_multipart((b"", self.events.next_seq.to_bytes(8, "big")))
        try:
            while True:
                frames = await asyncio.wait_for(self._replay.recv_multipart(), REPLAY_TIMEOUT_S)
                # (empty delimiter, topic, seq, batch); the end marker's seq is -1.
                seq = int.from_bytes(frames[2], "big", signed=True) if len(frames) == 4 else _END_SEQ
                if seq == _END_SEQ:
                    return
                try:
                    events = translate(decoder.decode(frames[-1]).events)
                except msgspec.DecodeError:
                    continue  # the next batch finds the gap, and gives it up
                if not self.events.accept(seq, events, replayed=True):
                    self.events.skip_to(seq)
                    self.events.accept(seq, events, replayed=True)
        except TimeoutError:
            # A late answer must not be read as the next replay's: start that one on a fresh socket.
            log.warning("vLLM's KV event replay did not answer within %gs", REPLAY_TIMEOUT_S)
            self._replay.close(linger=0)
            self._connect_replay()

    def _connect_replay(self) -> None:
        import zmq

        self._replay = self._context.socket(zmq.DEALER)
        self._replay.connect(self.replay_endpoint)


def translate(events: list[Any]) -> list[Event]:
    """vLLM's event structs as prefix_events values; events of other tiers or cache groups are left out."""
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    out: list[Event] = []
    for event in events:
        if isinstance(event, AllBlocksCleared):
            out.append(Cleared())
        elif not _main_cache(event):
            continue
        elif isinstance(event, BlockStored):
            extra = (event.lora_id is not None or event.lora_name is not None
                     or any(key for key in event.extra_keys or ()))
            out.append(Stored(event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size,
                              extra_keys=extra))
        elif isinstance(event, BlockRemoved):
            out.append(Removed(event.block_hashes))
    return out


def _main_cache(event: Any) -> bool:
    medium = getattr(event, "medium", None)
    group = getattr(event, "group_idx", None)
    return medium in (None, _MAIN_MEDIUM) and group in (None, 0)
