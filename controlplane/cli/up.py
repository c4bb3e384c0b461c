"""tandemctl up / generate: a local factory in one command, and a prompt streamed from it."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import grpc
import typer
from rich.console import Console

from controlplane.cli import render
from controlplane.cli.client import (
    EXIT_UNREACHABLE,
    AdminClient,
    CliError,
    Connection,
    looks_like_tls,
    tls_advice,
    tls_files,
)
from controlplane.cli.common import CliState
from controlplane.localfactory import FactoryOptions, LocalFactory
from controlplane.supervisor import ProcessStartError, StartAborted
from tandem.v1 import admin_pb2

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def register(app: typer.Typer) -> None:
    app.command(name="up")(up)
    app.command(name="generate")(generate)


def up(
    engine: Annotated[str, typer.Option(help="worker engine: torch (a real model on CPU), sim, or vllm")] = "torch",
    model: Annotated[str, typer.Option(help=(
        "model (default: smollm2-135m for torch, tiny-vllm for vllm, llama-3-8b for sim): smollm2-135m or a "
        "checkpoint dir (torch, vllm), tiny (torch), tiny-vllm (vllm), a profile (sim)"))] = "",
    fleet: Annotated[str, typer.Option(help=(
        "simulated GPUs for --engine sim, e.g. H100-SXM:2,A100-80GB:4 (default: one H100-SXM per worker)"))] = "",
    prefill: Annotated[int, typer.Option(min=0, help="prefill workers (without --fleet)")] = 1,
    decode: Annotated[int, typer.Option(min=1, help="decode workers (without --fleet)")] = 1,
    etcd: Annotated[str, typer.Option(help="use this etcd (host:port[,...]) instead of an embedded one")] = "",
    router_listen: Annotated[str, typer.Option(help="router (Inference API) address")] = "127.0.0.1:50051",
    http_listen: Annotated[str, typer.Option(help=(
        "router's OpenAI-compatible HTTP API address ('' turns it off)"))] = "127.0.0.1:8000",
    admin_listen: Annotated[str, typer.Option(help="control plane (Admin API) address")] = "127.0.0.1:7070",
    state_dir: Annotated[Path | None, typer.Option(help="logs, etcd data and up.json (default: a temp dir)")] = None,
    speedup: Annotated[float, typer.Option(min=0.001, help="sim engine: run simulated time this much faster")] = 1.0,
    lease_ttl: Annotated[int, typer.Option(min=2, help="registry lease TTL, seconds")] = 5,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help=(
        "every process serves Prometheus /metrics on a free 127.0.0.1 port (listed in up.json)"))] = True,
    secure: Annotated[bool, typer.Option("--secure", help=(
        "certificates in STATE_DIR/pki, etcd with TLS and a user per process, mutual TLS on every hop, "
        "worker identities checked (docs/security.md)"))] = False,
    planner: Annotated[str, typer.Option(help=(
        "the control plane's role planner: off, recommend (plans only: tandemctl plan) or enact "
        "(switches worker roles live as traffic changes; docs/planner.md)"))] = "recommend",
) -> None:
    """Start a whole factory here: etcd, agent, control plane, workers, router. Ctrl-C stops it all."""
    console = Console(stderr=True, highlight=False)
    options = FactoryOptions(engine=engine, model=model, fleet=fleet, prefill=prefill, decode=decode, etcd=etcd,
                             router_listen=router_listen, http_listen=http_listen, admin_listen=admin_listen,
                             state_dir=state_dir,
                             lease_ttl=lease_ttl, speedup=speedup, metrics=metrics, secure=secure, planner=planner)
    try:
        # Checks every option; starts nothing.
        factory = LocalFactory(options, progress=lambda line: console.print(f"[dim]•[/dim] {line}"))
    except ValueError as exc:
        raise CliError(f"tandemctl up: {exc}", 2) from None
    stop = threading.Event()
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only events here: the main thread notices within one poll, whatever it is waiting for.
        # The first Ctrl-C (or SIGTERM) aborts start-up or stops in order; the next skips the grace.
        nonlocal signals
        signals += 1
        if signals == 1:
            factory.abort.set()
            stop.set()
        else:
            factory.hurry.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        state = factory.start()
        console.print(f"\nTandem is up ({len(factory.plans)} workers, model [bold]{state.model}[/bold]).")
        console.print(f"  router (Inference API): {state.router}")
        if state.openai:
            console.print(f"  OpenAI API (HTTP):      {state.openai}")
        console.print(f"  control plane (Admin):  {state.admin}")
        console.print(f"  etcd:                   {state.etcd}")
        console.print(f"  logs:                   {state.logs}")
        if state.metrics:
            console.print("  metrics (/metrics):")
            for name, address in state.metrics.items():
                console.print(f"    {name:<22}{address}", soft_wrap=True)
        tls_flags = (f"--ca-file {state.tls['ca_file']} --cert-file {state.tls['cert_file']} "
                     f"--key-file {state.tls['key_file']} ") if state.tls else ""
        if state.tls:
            console.print("  secure: mutual TLS everywhere, etcd auth; certificates in "
                          f"{Path(state.tls['ca_file']).parent}")
        console.print(f"  try: tandemctl {tls_flags}generate --router {state.router} "
                      "\"What is the capital of France?\"", soft_wrap=True)
        console.print(f"       tandemctl {tls_flags}--endpoint {state.admin} status", soft_wrap=True)
        if state.openai:
            from router_svc.http_api.examples import curl_example, sdk_example

            chat = engine == "torch"  # the built-in torch models ship a chat template; sim profiles have none
            console.print(f"       {curl_example(state.openai, state.model, chat=chat, tls=state.tls)}",
                          soft_wrap=True)
            if not state.tls:  # the SDK line would need an httpx client with the certificates
                console.print(f"       {sdk_example(state.openai, state.model, chat=chat)}", soft_wrap=True)
        console.print()
        admin = AdminClient(_admin_connection(state.admin, state.tls))
        try:
            status = admin.call("FleetStatus", admin_pb2.FleetStatusRequest())
        finally:
            admin.close()
        Console(highlight=False).print(render.fleet_status(status, int(time.time() * 1000)))
        console.print("\nCtrl-C stops everything.")
        stop.wait()
    except StartAborted:
        console.print("\nstart-up interrupted; stopping what started (Ctrl-C again to skip the grace)")
        raise CliError("tandemctl up: interrupted during start-up", EXIT_INTERRUPTED) from None
    except ProcessStartError as exc:
        console.print(f"[red]tandemctl up: a process failed to start[/red]\n{exc}")
        raise CliError("tandemctl up: start failed; see the log above", 1) from None
    finally:
        factory.stop()
        console.print("stopped.")


def _admin_connection(endpoint: str, tls: dict[str, str]) -> Connection:
    """The Admin API of a factory; with up.json's TLS entry (--secure) over mutual TLS."""
    if not tls:
        return Connection(endpoint=endpoint)
    return Connection(endpoint=endpoint, ca_file=Path(tls["ca_file"]), cert_file=Path(tls["cert_file"]),
                      key_file=Path(tls["key_file"]))


def router_error(router: str, code: grpc.StatusCode, message: str, *, tls: bool) -> CliError:
    """The one line for a failed router call. Pure."""
    if code is grpc.StatusCode.UNAVAILABLE and looks_like_tls(message):
        return CliError(f"tandemctl: cannot reach the router at {router} (UNAVAILABLE: {message}). "
                        + tls_advice(tls), EXIT_UNREACHABLE)
    if code is grpc.StatusCode.UNAVAILABLE:
        return CliError(f"tandemctl: cannot reach the router at {router} (UNAVAILABLE: {message}). "
                        "Is tandem-router running there? Set --router or TANDEM_ROUTER.", EXIT_UNREACHABLE)
    return CliError(f"tandemctl: the router at {router} answered {code.name}: {message}", 1)


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    router: Annotated[str, typer.Option(envvar="TANDEM_ROUTER", help="router host:port")] = "127.0.0.1:50051",
    model: Annotated[str, typer.Option(help="model (default: the first the router lists)")] = "",
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate at most")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="seed for reproducible sampling")] = None,
    raw: Annotated[bool, typer.Option("--raw", help=(
        "send the text as a raw prompt; by default it is a user message, rendered with the model's chat "
        "template when the model has one"))] = False,
    system: Annotated[str, typer.Option(help="a system message before the prompt (chat only)")] = "",
    show_usage: Annotated[bool, typer.Option("--usage/--no-usage", help="print usage and timings")] = True,
    ca_file: Annotated[Path | None, typer.Option(envvar="TANDEM_ROUTER_CA_FILE", help=(
        "CA bundle to verify the router (enables TLS; default: the global --ca-file)"))] = None,
    cert_file: Annotated[Path | None, typer.Option(envvar="TANDEM_ROUTER_CERT_FILE", help=(
        "client certificate (mutual TLS; default: the global --cert-file)"))] = None,
    key_file: Annotated[Path | None, typer.Option(envvar="TANDEM_ROUTER_KEY_FILE", help=(
        "client certificate key (mutual TLS; default: the global --key-file)"))] = None,
) -> None:
    """Stream an answer from a router."""
    from router_svc.client import TandemClient, TandemError
    from router_svc.client_types import SamplingArgs

    # The global TLS options (given before the command) apply here too, unless the command's own are given.
    cli_state = ctx.find_object(CliState)
    conn = cli_state.connection if cli_state is not None else Connection()
    ca_file, cert_file, key_file = ((ca_file, cert_file, key_file) if any((ca_file, cert_file, key_file))
                                    else (conn.ca_file, conn.cert_file, conn.key_file))
    root, chain, key = tls_files(ca_file, cert_file, key_file)
    tls = any((root, chain, key))
    try:
        with TandemClient(router, tls=tls or None, root_certificates=root, certificate_chain=chain,
                          private_key=key) as client:
            models = client.list_models()
            if not models:
                raise CliError(f"tandemctl: the router at {router} serves no model yet", 1)
            info = next((m for m in models if m.name == model), None) if model else models[0]
            chosen = model or models[0].name
            sampling: SamplingArgs = {"max_tokens": max_tokens, "temperature": temperature}
            if seed is not None:
                sampling["seed"] = seed
            chat = not raw and info is not None and info.chat
            if system and not chat:
                raise CliError(f"tandemctl: --system needs a chat model; {chosen} takes raw prompts here", 2)
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
            last = None
            stream = client.generate(messages=messages, model=chosen, **sampling) if chat \
                else client.generate(prompt, model=chosen, **sampling)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
            sys.stdout.write("\n")
    except TandemError as exc:
        raise router_error(router, exc.code, exc.message, tls=tls) from None
    if show_usage and last is not None and last.usage is not None and last.timings is not None:
        print(f"[{chosen}: {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} completion tokens, "
              f"TTFT {last.timings.ttft_ms:.1f} ms, {last.finish_reason}]", file=sys.stderr)
