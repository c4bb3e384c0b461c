"""Reading the JSON files of a Hugging Face checkpoint directory leniently. Pure helpers, no I/O beyond the read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}; "" otherwise."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else ""
