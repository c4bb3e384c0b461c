"""The ready-to-paste HTTP API examples `tandemctl up` prints (router_svc.http_api.examples)."""

from __future__ import annotations

import json
import shlex

import pytest

from router_svc.http_api.examples import base_url, curl_example, sdk_example


@pytest.mark.parametrize(("listen", "port", "tls", "url"), [
    ("127.0.0.1:8000", 8000, False, "http://127.0.0.1:8000/v1"),
    ("0.0.0.0:0", 41234, False, "http://127.0.0.1:41234/v1"),
    ("[::1]:8000", 8000, True, "https://[::1]:8000/v1"),
    ("router.example:443", 443, True, "https://router.example:443/v1"),
])
def test_the_base_url_is_dialable(listen: str, port: int, tls: bool, url: str) -> None:
    assert base_url(listen, port, tls=tls) == url


@pytest.mark.parametrize("chat", [True, False])
def test_the_curl_example_is_one_shell_command_with_a_json_body(chat: bool) -> None:
    argv = shlex.split(curl_example("http://127.0.0.1:8000/v1", "it's-a-model", chat=chat))
    assert argv[0] == "curl"
    assert argv[1].endswith("/v1/chat/completions" if chat else "/v1/completions")
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["model"] == "it's-a-model" and ("messages" in body) is chat


@pytest.mark.parametrize("chat", [True, False])
def test_the_sdk_example_is_python_that_compiles(chat: bool) -> None:
    line = sdk_example("http://127.0.0.1:8000/v1", "m", chat=chat)
    assert "'\"'\"'" not in line, "the line should need no escaped quotes"
    argv = shlex.split(line)
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<example>", "exec")
    assert 'base_url="http://127.0.0.1:8000/v1"' in argv[2]


def test_the_secure_curl_example_verifies_the_router_and_presents_the_operators_certificate() -> None:
    tls = {"ca_file": "/s/pki/ca.pem", "cert_file": "/s/pki/operator.pem", "key_file": "/s/pki/op key.pem"}
    argv = shlex.split(curl_example("https://127.0.0.1:8000/v1", "m", chat=False, tls=tls))
    assert argv[1:7] == ["--cacert", "/s/pki/ca.pem", "--cert", "/s/pki/operator.pem", "--key", "/s/pki/op key.pem"]
    assert argv[7] == "https://127.0.0.1:8000/v1/completions"
