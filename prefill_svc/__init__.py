"""Prefill worker: computes prompts' KV caches and first tokens, and serves the KV to decode workers."""
