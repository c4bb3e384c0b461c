"""Ready-to-paste examples of the HTTP API for a running fleet (what `tandemctl up` prints). Pure."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping


def base_url(listen: str, port: int, *, tls: bool = False) -> str:
    """The OpenAI base URL (…/v1) of a router whose HTTP front listens on `listen` and bound `port`."""
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/v1"


def curl_example(base: str, model: str, *, chat: bool, tls: Mapping[str, str] | None = None) -> str:
    """One curl command line: a chat when the model has a chat template, else a completion.

    `tls` (keys ca_file, cert_file, key_file, as `tandemctl up --secure` lists them) adds the
    flags that verify the router and present a client certificate.
    """
    if chat:
        path = "/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 32}
    else:
        path = "/completions"
        body = {"model": model, "prompt": "The capital of France is", "max_tokens": 16}
    flags = "".join(f"{flag} {shlex.quote(tls[key])} " for flag, key in (
        ("--cacert", "ca_file"), ("--cert", "cert_file"), ("--key", "key_file"))) if tls else ""
    return (f"curl {flags}{base}{path} -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}")


def sdk_example(base: str, model: str, *, chat: bool) -> str:
    """One shell line running the official openai SDK against `base`."""
    # JSON strings are Python string literals too, in double quotes: the line needs no escaped quotes.
    name, url = json.dumps(model), json.dumps(base)
    if chat:
        call = (f'c.chat.completions.create(model={name}, max_tokens=32, messages=[{{"role": "user", '
                f'"content": "What is the capital of France?"}}]).choices[0].message.content')
    else:
        call = (f'c.completions.create(model={name}, prompt="The capital of France is", '
                f'max_tokens=16).choices[0].text')
    code = f'from openai import OpenAI; c = OpenAI(base_url={url}, api_key="unused"); print({call})'
    return f"python -c {shlex.quote(code)}"
