"""Tandem engines: the Engine interface, its backends (torch, sim), tokenizers
and KV transports (engine/kv). Imports no registry, worker or service code."""
