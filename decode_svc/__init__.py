"""Decode worker: a worker process (worker.process) that starts serving decode; a role intent can switch it."""
