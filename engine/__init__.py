"""Tandem engines: the Engine interface, its backends, KV transports and the GPU catalog."""
