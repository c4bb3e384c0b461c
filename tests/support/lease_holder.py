"""A minimal registry participant for lease tests: registers one worker record
(and optional GPU claims) under its own LeaseSession, then serves nothing
until SIGTERM (clean close: lease revoked) or SIGKILL (lease left to expire).

    python -m tests.support.lease_holder --etcd HOST:PORT --worker-id W [--gpus U1,U2] --ready-file F
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys
from registry.session import LeaseSession
from registry.store import Registry
from tandem.v1 import common_pb2, registry_pb2


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--gpus", default="")
    parser.add_argument("--ttl", type=int, default=2)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    client = await EtcdClient(EtcdSettings.parse(args.etcd)).connect()
    session = LeaseSession(client, ttl=args.ttl, name=args.worker_id)
    session.start()
    registry = Registry(client, Keys())
    assert await session.wait_alive(10), "no lease"
    record = registry_pb2.WorkerRecord(worker_id=args.worker_id, role=common_pb2.ROLE_DECODE, model="m",
                                       endpoint="127.0.0.1:1", state=registry_pb2.WORKER_STATE_READY)
    await registry.register_worker(session, record)
    if args.gpus:
        await registry.claim_gpus(session, args.worker_id, common_pb2.ROLE_DECODE, "n", args.gpus.split(","))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.ready_file:
        args.ready_file.write_text(json.dumps({"pid": os.getpid(), "lease": session.lease_id}))
    await stop.wait()
    await session.close()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
