"""Decode worker: imports KV caches (or prefills locally) and streams generated tokens."""
