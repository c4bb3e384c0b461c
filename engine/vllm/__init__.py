"""Tandem's vLLM engine (engine.vllm.engine.VllmEngine), its KV connector and its tiny test model.

Imported only when a worker runs `--engine vllm` (engine.base registers it
lazily), so hosts without vLLM never import it.
"""
