"""KV transfer throughput: each transport against its baseline, measured in the same run.

    .venv/bin/python bench/kv_transfer.py [--sizes 1,16,256,1024] [--repeat 3]

A producer process serves a KvExporter on a grpc.aio server (127.0.0.1);
this process is the consumer and times `fetch_kv` (pull, verify, release)
per payload size. Baselines: a raw TCP socket stream (sendall / recv_into,
producer in the other process) into a fresh buffer allocated like the
transports' (`raw tcp`; `raw tcp*` reuses one buffer, for reference), and an
in-process memcpy into a preallocated buffer. Prints GB/s per size and, last, each
transport's ratio to its baseline (grpc and tcp vs raw TCP, shm vs memcpy)
over the largest sizes. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing as mp
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "protos"))

MiB = 1 << 20
TRANSPORTS = ("grpc", "tcp", "shm")


def _payload(size: int) -> bytearray:
    return bytearray(b"tandem-kv-bench!" * (size // 16) + b"x" * (size % 16))


def _producer(conn) -> None:
    asyncio.run(_produce(conn))


async def _produce(conn) -> None:
    import grpc

    from engine.base import KvBlob, KvLayoutSpec
    from engine.kv.exporter import KvExporter
    from tandem.v1 import worker_pb2_grpc

    exporter = KvExporter(host="127.0.0.1", bind_host="127.0.0.1", default_ttl_s=120)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * MiB)])
    worker_pb2_grpc.add_KvSourceServicer_to_server(exporter.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await exporter.start()
    raw = socket.create_server(("127.0.0.1", 0))
    conn.send((f"127.0.0.1:{port}", raw.getsockname()[1]))
    loop = asyncio.get_running_loop()
    layout = KvLayoutSpec("bench", 1, 1, 1, "float32")
    payloads: dict[int, bytearray] = {}
    try:
        while True:
            command, size = await loop.run_in_executor(None, conn.recv)
            if command == "stop":
                break
            if command == "prepare":
                payloads.clear()
            if size not in payloads:
                payloads[size] = _payload(size)
            data = payloads[size]
            if command == "prepare":
                conn.send(None)
            elif command == "raw":
                await loop.run_in_executor(None, _send_raw, raw, data)
                conn.send(None)
            else:
                handle = await exporter.offer(KvBlob(layout, 1, data), transports=[command],
                                              consumer_host="127.0.0.1")
                handle.source_endpoint = f"127.0.0.1:{port}"
                conn.send(handle.SerializeToString())
    finally:
        raw.close()
        await exporter.close()
        await server.stop(None)


def _send_raw(listener: socket.socket, data: bytearray) -> None:
    peer, _ = listener.accept()
    with peer:
        peer.sendall(memoryview(data))


def _recv_raw(port: int, size: int, view: memoryview) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        received = 0
        while received < size:
            n = sock.recv_into(view[received:], min(size - received, 8 * MiB))
            if n == 0:
                raise RuntimeError("raw stream ended early")
            received += n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,16,256,1024", help="payload sizes in MiB, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the best is kept")
    args = parser.parse_args()
    sizes = [int(s) * MiB for s in args.sizes.split(",")]

    from engine.base import KvBlob
    from engine.kv.exporter import fetch_kv
    from engine.kv.transport import allocate
    from tandem.v1.common_pb2 import KvHandle

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_producer, args=(child,), daemon=True)
    proc.start()
    endpoint, raw_port = parent.recv()
    rows: dict[str, dict[int, float]] = {name: {} for name in ("raw tcp", "raw tcp*", "memcpy", *TRANSPORTS)}

    loop = asyncio.new_event_loop()
    channel = loop.run_until_complete(_open_channel(endpoint))

    async def fetch(handle: KvHandle) -> KvBlob:
        # A decode worker keeps one channel per producer: reuse it, as it would.
        return await fetch_kv(handle, channel_factory=lambda _: channel)

    try:
        for size in sizes:
            repeat = args.repeat
            parent.send(("prepare", size))
            parent.recv()
            rows["memcpy"][size] = _memcpy(repeat, size)
            buffer = memoryview(bytearray(size))

            def raw(size: int = size, buffer: memoryview | None = None) -> None:
                parent.send(("raw", size))
                _recv_raw(raw_port, size, allocate(size) if buffer is None else buffer)
                parent.recv()

            rows["raw tcp"][size] = _best(repeat, size, raw)
            rows["raw tcp*"][size] = _best(repeat, size, functools.partial(raw, size, buffer))
            del buffer
            for name in TRANSPORTS:
                best = 0.0
                for _ in range(repeat):
                    parent.send((name, size))
                    handle = KvHandle.FromString(parent.recv())
                    started = time.perf_counter()
                    blob = loop.run_until_complete(fetch(handle))
                    elapsed = time.perf_counter() - started
                    assert blob.nbytes == handle.nbytes
                    del blob  # freeing the buffer is the consumer's later business, not the transfer's
                    best = max(best, size / elapsed / 1e9)
                rows[name][size] = best
            print(f"  measured {size // MiB} MiB", file=sys.stderr, flush=True)
    finally:
        parent.send(("stop", 0))
        proc.join(30)
        loop.run_until_complete(channel.close())
        loop.close()

    header = "GB/s".ljust(10) + "".join(f"{s // MiB:>10} MiB" for s in sizes)
    print(header)
    for name, values in rows.items():
        print(name.ljust(10) + "".join(f"{values[s]:>14.2f}" for s in sizes))
    large = [s for s in sizes if s >= 256 * MiB] or sizes[-1:]
    print("(raw tcp: into a fresh buffer, as every transport receives; raw tcp*: into one reused buffer)")
    print()
    for name, base in (("grpc", "raw tcp"), ("tcp", "raw tcp"), ("shm", "memcpy")):
        ratio = sum(rows[name][s] / rows[base][s] for s in large) / len(large)
        print(f"{name} vs {base}: {ratio:.0%} (mean over {', '.join(f'{s // MiB} MiB' for s in large)})")


def _memcpy(repeat: int, size: int) -> float:
    src, dst = _payload(size), bytearray(size)
    return _best(repeat, size, lambda: dst.__setitem__(slice(None), src))


async def _open_channel(endpoint: str):
    from engine.kv.exporter import default_channel

    channel = default_channel(endpoint)
    await channel.channel_ready()
    return channel


def _best(repeat: int, size: int, run) -> float:
    best = 0.0
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = max(best, size / (time.perf_counter() - started) / 1e9)
    return best


if __name__ == "__main__":
    main()
