"""NVIDIA Dynamo deployments for the benchmarks: a model directory, a frontend with its mockers, metrics.

    model = ensure_model(venv, cache_dir)               # generated once with the venv's python, then reused
    dyn = Deployment("agg", venv, model, root, model_name="llama-3-8b", speedup=1000).start()
    dyn.wait_ready()                                    # every worker registered, /v1/models lists it, a settle
    dyn.pids, dyn.port, dyn.routes(), dyn.counts(metric, label)
    dyn.close()                                         # stops every process by PID; safe twice

Not a benchmark itself. Stdlib only at import: `python _dynamo.py model DIR`
runs under Dynamo's own venv (which has `tokenizers`) to write the model, and
`python _dynamo.py stored PORT,...` (StoredBlocks) counts the KV blocks the
mockers store, from the KV events they publish with `kv_event_ports=True`.

A deployment is real processes on 127.0.0.1 with file discovery (no etcd,
no NATS): a frontend (`python -m dynamo.frontend`, its default router or
`router_mode`) and mockers, one process each: `decode_workers` aggregated
mockers ("agg"), or `prefill_workers` prefill mockers and `decode_workers`
decode mockers ("disagg"); one of each by default. `frontend_args` and
`mocker_args` are appended to every frontend / mocker command line. Each
deployment has its own discovery directory, HOME, TMPDIR and logs under
`root / name`, and its own free HTTP port. (One process per mocker: with
`--num-workers` the workers of one process register clashing model cards
and the frontend keeps only one of them.)

The model directory holds what the frontend and the mocker read: a
byte-level BPE tokenizer (trained here on a seeded pseudo-word corpus;
prompts are token ids, the tokenizer only detokenizes answers), its
tokenizer_config.json, and a Llama-3-8B-shaped config.json (no weights).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

_DONE = "complete.json"  # written last: a directory without it is regenerated
_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
         "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
         "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


# -- the model directory --------------------------------------------------------------


def _corpus(lines: int, seed: int = 1606) -> list[str]:
    """Seeded text of pseudo-words (syllables) with a long-tailed word frequency, some numbers and punctuation."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
              "br", "ch", "cl", "dr", "gr", "pl", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    lexicon = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.randint(1, 4))) for _ in range(40000)]
    text = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(8, 40)):
            word = lexicon[min(len(lexicon) - 1, int(rng.paretovariate(0.7)) - 1)]
            if rng.random() < 0.05:
                word = str(rng.randint(0, 9999))
            words.append(word.capitalize() if rng.random() < 0.1 else word)
        text.append(" ".join(words) + rng.choice([".", ",", "?", "!", ";", ""]))
    return text


def write_model(out: Path, vocab_size: int = 32000) -> None:
    """Writes the model directory (needs `tokenizers`: run with Dynamo's venv)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(60000), trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos, pad = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
    bos_id, eos_id = tokenizer.token_to_id(bos), tokenizer.token_to_id(eos)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                        "pad_token": pad, "model_max_length": 8192, "clean_up_tokenization_spaces": False,
                        "chat_template": _CHAT}
    # Llama 3 8B's shape (the mocker sizes its simulated KV cache from it); the vocabulary is the tokenizer's.
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tokenizer.get_vocab_size(),
              "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
              "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False,
              "bos_token_id": bos_id, "eos_token_id": eos_id}
    files = {"tokenizer_config.json": tokenizer_config, "config.json": config,
             "generation_config.json": {"bos_token_id": bos_id, "eos_token_id": eos_id}}
    for name, value in files.items():
        (out / name).write_text(json.dumps(value, indent=2) + "\n")
    (out / _DONE).write_text(json.dumps({"vocab_size": tokenizer.get_vocab_size()}) + "\n")


def ensure_model(venv: Path, directory: Path, timeout: float = 600.0) -> Path:
    """`directory`, holding a complete model directory: reused if there is one, else written by the venv's python."""
    if not (directory / _DONE).exists():
        done = subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).resolve()), "model", str(directory)],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0 or not (directory / _DONE).exists():
            raise RuntimeError(f"writing the Dynamo model directory failed ({done.returncode}): {done.stderr[-2000:]}")
    return directory


def dynamo_version(venv: Path) -> str:
    """The ai-dynamo version installed in `venv` (as its python reports it)."""
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "from importlib.metadata import version; print(version('ai-dynamo'))"],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{venv} has no ai-dynamo: {done.stderr[-500:]}")
    return done.stdout.strip()


# -- deployments ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_counts(url: str, metric: str, label: str) -> Counter[str]:
    """Sums of the samples of `metric` (Prometheus text at `url`) by the value of `label`."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        labels, _, value = line[len(metric) + 1:].rpartition("} ")
        for pair in labels.split(","):
            name, _, quoted = pair.partition("=")
            if name == label:
                counts[quoted.strip('"')] += int(float(value))
    return counts


class Deployment:
    """A Dynamo frontend and its mockers (see the module docstring). `close()` is safe twice."""

    def __init__(self, mode: str, venv: Path, model: Path, root: Path, *, model_name: str, speedup: float,
                 prefill_workers: int = 1, decode_workers: int = 1, router_mode: str | None = None,
                 frontend_args: tuple[str, ...] = (), mocker_args: tuple[str, ...] = (),
                 kv_event_ports: bool = False, name: str | None = None) -> None:
        if mode not in ("agg", "disagg"):
            raise ValueError(f"mode must be agg or disagg, got {mode!r}")
        if decode_workers < 1 or (mode == "disagg" and prefill_workers < 1):
            raise ValueError(f"{mode} needs at least one mocker of each kind it uses")
        self.mode, self.model_name = mode, model_name
        self.workers = {"prefill": prefill_workers if mode == "disagg" else 0, "decode": decode_workers}
        self.root = root / (name or f"dynamo-{mode}")
        self._python = str(venv / "bin" / "python")
        self._frontend = ["-m", "dynamo.frontend", *(("--router-mode", router_mode) if router_mode else ()),
                          *frontend_args]
        self._mocker = ["-m", "dynamo.mocker", "--model-path", str(model), "--model-name", model_name,
                        "--speedup-ratio", f"{speedup:g}", *mocker_args]
        self.port = 0
        self._kv_event_ports = kv_event_ports
        # By role: the ZMQ port where that mocker also publishes its KV events in vLLM's format.
        self.kv_event_ports: dict[str, int] = {}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def pids(self) -> dict[str, int]:
        """PIDs by role: front, decode (the aggregated mockers too), and prefill for "disagg".

        Where there are several mockers of a kind, the first keeps the plain name and the others are
        numbered from 1 (decode, decode1, decode2, ...).
        """
        return {role: p.pid for role, p in self._processes.items()}

    def start(self) -> Deployment:
        for sub in ("kv", "home", "tmp", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        host = "127.0.0.1"
        env = {**os.environ, "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(self.root / "kv"),
               "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq", "DYN_LOG": "warn", "HF_HUB_OFFLINE": "1",
               "DYN_TCP_RPC_HOST": host, "DYN_EVENT_PLANE_HOST": host, "DYN_SYSTEM_HOST": host,
               "DYN_TCP_RESPONSE_STREAM_HOST": host, "HOME": str(self.root / "home"),
               "TMPDIR": str(self.root / "tmp")}
        roles = {"front": [*self._frontend, "--http-host", host, "--http-port", str(self.port)]}
        for kind, count in self.workers.items():
            extra = ["--disaggregation-mode", kind] if self.mode == "disagg" else []
            for i in range(count):
                role = kind + (str(i) if i else "")
                roles[role] = [*self._mocker, *extra]
                # Decode mockers of a disaggregated fleet publish no KV events.
                if self._kv_event_ports and (self.mode == "agg" or kind == "prefill"):
                    self.kv_event_ports[role] = free_port()
                    roles[role] += ["--zmq-kv-events-ports", str(self.kv_event_ports[role])]
        for role, args in roles.items():
            with open(self.root / "logs" / f"{role}.log", "wb") as log:
                self._processes[role] = subprocess.Popen([self._python, *args], env=env, stdout=log,
                                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def _registered(self) -> dict[str, int]:
        """Mocker instances in the discovery directory, by kind (prefill mockers serve the `prefill` component)."""
        instances = self.root / "kv" / "v1" / "instances"
        names = [p.name for p in instances.iterdir()] if instances.is_dir() else []
        return {"prefill": sum(n.startswith("dynamo%2Fprefill%2Fgenerate%2F") for n in names),
                "decode": sum(n.startswith("dynamo%2Fbackend%2Fgenerate%2F") for n in names)}

    def wait_ready(self, timeout: float = 120.0, settle: float = 2.0) -> None:
        """Until every mocker has registered and /v1/models lists the model, then `settle` seconds (the frontend
        finishes taking the workers in); raises if a process died or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while True:
            for role, process in self._processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"Dynamo {self.mode} {role} exited ({process.returncode}): "
                                       f"{self.log_tail(role)}")
            registered = self._registered()
            if registered == self.workers:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2) as response:
                        if any(m.get("id") == self.model_name for m in json.load(response).get("data", [])):
                            break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Dynamo {self.mode}: {registered} of {self.workers} mockers registered, "
                                   f"{self.model_name} listed or not: {self.log_tail('front')}")
            time.sleep(0.2)
        time.sleep(settle)

    def routes(self) -> Counter[str]:
        """Requests the frontend routed, by phase: aggregated, or prefill and decode (one of each per request)."""
        return self.counts("dynamo_component_router_input_sequence_tokens_count", "phase")

    def counts(self, metric: str, label: str) -> Counter[str]:
        """The frontend's `metric` (its router's metrics included), summed by `label`."""
        return scrape_counts(f"http://127.0.0.1:{self.port}/metrics", metric, label)

    def log_tail(self, role: str, chars: int = 2000) -> str:
        path = self.root / "logs" / f"{role}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def close(self, grace: float = 10.0) -> list[str]:
        """SIGTERM to every process, SIGKILL to those still alive after `grace`; returns the roles left alive."""
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self._processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        return [role for role, p in self._processes.items() if p.poll() is None]


# -- KV blocks the mockers store ---------------------------------------------------------


class StoredBlocks:
    """Counts the KV blocks the mockers on `ports` store, from the KV events they publish (vLLM's BlockStored).

    A mocker stores a block when it allocates it for tokens it computes, never for a prefix-cache hit,
    so the tokens stored are the tokens computed in whole blocks. The subscriber is a process of its own,
    run with Dynamo's venv (pyzmq, msgspec): `start()` returns once it is subscribed, `stop()` (once)
    returns the counts; `close()` is safe twice.
    """

    def __init__(self, venv: Path, ports: list[int]) -> None:
        self._argv = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "stored",
                      ",".join(map(str, ports))]
        self._process: subprocess.Popen[str] | None = None

    def start(self, settle: float = 0.5) -> StoredBlocks:
        self._process = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._process.stdout is not None and self._process.stderr is not None
        if self._process.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"the KV event subscriber did not start: {self._process.stderr.read()[-1000:]}")
        time.sleep(settle)  # a ZMQ subscription takes effect a moment after connect
        return self

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """The counts since `start()`: blocks and tokens stored, and messages it could not read."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        out, err = self._process.communicate(timeout=timeout)
        if self._process.returncode != 0:
            raise RuntimeError(f"the KV event subscriber failed ({self._process.returncode}): {err[-1000:]}")
        return {key: int(value) for key, value in json.loads(out.strip().splitlines()[-1]).items()}

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(5)


def _count_stored(ports: list[int]) -> None:
    """The subscriber (Dynamo's venv): prints "ready", counts until SIGTERM, prints the counts as JSON.

    "unread" counts the batches it could not decode and those it missed (gaps in a publisher's sequence
    numbers: a slow subscriber's messages are dropped by ZMQ, not queued forever).
    """
    import msgspec
    import zmq

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    context = zmq.Context()
    poller = zmq.Poller()
    last: dict[zmq.Socket[bytes], int] = {}
    for port in ports:
        sock = context.socket(zmq.SUB)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        poller.register(sock, zmq.POLLIN)
        last[sock] = -1
    decoder = msgspec.msgpack.Decoder()
    counts = {"blocks": 0, "tokens": 0, "unread": 0}
    print("ready", flush=True)
    while True:
        ready = dict(poller.poll(100))
        if not ready and stopping:  # nothing arrived for 100 ms after the stop: all sent is in
            break
        for sock in ready:
            # [topic, sequence number (8 bytes, big-endian), batch]
            *_, number, payload = sock.recv_multipart()
            seq = int.from_bytes(number, "big")
            if last[sock] >= 0 and seq != last[sock] + 1:
                counts["unread"] += max(1, seq - last[sock] - 1)
            last[sock] = seq
            try:
                # A batch: [timestamp, events, data parallel rank]; each event a map with its "type".
                for event in decoder.decode(payload)[1]:
                    if event.get("type") == "BlockStored":
                        counts["blocks"] += len(event["block_hashes"])
                        counts["tokens"] += len(event["token_ids"])
            except (msgspec.DecodeError, LookupError, TypeError, AttributeError):
                counts["unread"] += 1
    for sock in last:
        sock.close(linger=0)
    context.term()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["model"] and len(sys.argv) == 3:
        write_model(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["stored"] and len(sys.argv) == 3:
        _count_stored([int(port) for port in sys.argv[2].split(",")])
    else:
        sys.exit(f"usage: {sys.argv[0]} model DIR | stored PORT,...   (with Dynamo's venv python)")
