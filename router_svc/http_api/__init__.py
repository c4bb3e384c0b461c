"""The router's OpenAI-compatible HTTP API: wire (JSON translation, pure), keys (API keys), server (aiohttp)."""
