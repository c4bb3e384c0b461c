"""Prefill worker: a worker process (worker.process) that starts serving prefill; a role intent can switch it."""
