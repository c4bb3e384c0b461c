"""Hypothesis strategies over tandem.v1 messages, and raw payloads for generic gRPC calls.

`messages(cls)` draws a message of any type from its descriptor: every field
may be set or not; floats include NaN, infinities and huge magnitudes;
integers their type's extremes; strings are empty, very long, arbitrary
Unicode, or a realistic value (a model or worker name) so that a request
gets past the first check and reaches deeper code; repeated token ids are
random 32-bit values. `raw_payloads(cls)` draws bytes for the wire: pure
noise, a string field holding invalid UTF-8, or a valid message with
garbage appended. `decodes(cls, payload)` says whether the server can parse
a payload, which decides the status it may answer with. `mutations(base)`
draws a valid message with a few fields fuzzed.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from hypothesis import strategies as st

FD = pb_descriptor.FieldDescriptor

# Values that get a fuzzed request past "unknown model" into the checks behind it.
REALISTIC_STRINGS = ["llama-3-8b", "tiny", "d0", "p0", "node-d0", "grpc", "shm", "127.0.0.1:1", "GPU-0",
                     "prefill", "decode", "a" * 129, "bad/name", " "]

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({low, high, 0 if low <= 0 else low, -1 if low < 0 else low, 1, 2, 255, 256, 8192, 8193})
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high),
                     st.integers(max(low, 0), min(high, 300)))


# Fields whose right value unlocks the rest of a request: drawn often, so most examples go deep.
LIKELY = {"model": "llama-3-8b"}


def _strings(name: str) -> st.SearchStrategy[str]:
    anything = st.one_of(st.just(""), st.sampled_from(REALISTIC_STRINGS), st.text(max_size=40),
                         st.integers(1_000, 100_000).map(lambda n: "x" * n))
    if name in LIKELY:
        return st.one_of(st.just(LIKELY[name]), anything)
    return anything


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    if kind == FD.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e308, -1e308, 0.5, 2.0]))
    if kind == FD.TYPE_FLOAT:
        return st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, -1.0, 3.4e38, 0.5]))
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return _strings(field.name)
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FD.TYPE_ENUM:
        # Proto3 enums are open: unknown numbers must be handled too.
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


def messages(cls: type[pb_message.Message], depth: int = 0) -> st.SearchStrategy[pb_message.Message]:
    """Any message of `cls`, fields set or not, values from their whole range and beyond reason."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    descriptor: Any = cls.DESCRIPTOR
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            if value.message_type is None:
                optional[field.name] = st.dictionaries(_scalar(key), _scalar(value), max_size=4)
            continue
        if field.message_type is not None:
            if depth >= 3:
                continue
            item: st.SearchStrategy[Any] = messages(message_factory.GetMessageClass(field.message_type), depth + 1)
        else:
            item = _scalar(field)
        if field.is_repeated:
            size = 3 if field.message_type is not None else 40
            strategy = st.lists(item, max_size=size)
            if field.type == FD.TYPE_UINT32:
                # Token ids: in the vocabulary (so the request goes on), anywhere, or far past any context limit.
                strategy = st.one_of(st.lists(st.integers(0, 255), max_size=size), strategy,
                                     st.integers(8_000, 20_000).map(lambda n: [65] * n))
            optional[field.name] = strategy
        else:
            optional[field.name] = item
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


def _build(cls: type[pb_message.Message], values: dict[str, Any]) -> pb_message.Message:
    msg = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name) if field.is_repeated or field.message_type is not None else None
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target.update(value)  # type: ignore[union-attr]
        elif field.is_repeated:
            target.extend(value)  # type: ignore[union-attr]
        elif field.message_type is not None:
            target.CopyFrom(value)  # type: ignore[union-attr]
        else:
            setattr(msg, name, value)
    return msg


def mutations(base: pb_message.Message, max_fields: int = 3) -> st.SearchStrategy[pb_message.Message]:
    """`base` with 1..max_fields of its fields (every one may be picked) replaced by fuzzed values (or cleared).

    A valid message with one bad field gets past every check but the one for
    that field: how a forged KV handle reaches the deep checks.
    """
    cls = type(base)
    names = [f.name for f in cls.DESCRIPTOR.fields]

    def apply(drawn: tuple[pb_message.Message, list[str]]) -> pb_message.Message:
        fuzzed, chosen = drawn
        out = cls()
        out.CopyFrom(base)
        for name in chosen:
            out.ClearField(name)
            field = cls.DESCRIPTOR.fields_by_name[name]
            if field.is_repeated or field.message_type is not None:
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    getattr(out, name).update(getattr(fuzzed, name))
                elif field.is_repeated:
                    getattr(out, name).extend(getattr(fuzzed, name))
                else:
                    getattr(out, name).CopyFrom(getattr(fuzzed, name))
            elif fuzzed.HasField(name) if field.has_presence else True:
                setattr(out, name, getattr(fuzzed, name))
        return out

    return st.tuples(messages(cls), st.lists(st.sampled_from(names), min_size=1, max_size=max_fields,
                                             unique=True)).map(apply)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bad_utf8_field(cls: type[pb_message.Message]) -> st.SearchStrategy[bytes]:
    numbers = [f.number for f in cls.DESCRIPTOR.fields if f.type == FD.TYPE_STRING and not f.is_repeated]
    if not numbers:
        return st.binary(min_size=1, max_size=64)
    invalid = st.binary(max_size=32).map(lambda b: b"\xff\xfe" + b)
    return st.tuples(st.sampled_from(numbers), invalid).map(
        lambda t: _varint((t[0] << 3) | 2) + _varint(len(t[1])) + t[1])


def raw_payloads(cls: type[pb_message.Message]) -> st.SearchStrategy[bytes]:
    """Bytes a broken or hostile client might send as a `cls` request."""
    return st.one_of(
        st.binary(max_size=256),
        _bad_utf8_field(cls),
        st.tuples(messages(cls), st.binary(min_size=1, max_size=16)).map(lambda t: t[0].SerializeToString() + t[1]),
    )


def decodes(cls: type[pb_message.Message], payload: bytes) -> bool:
    """True when `payload` parses as `cls` (what the server's deserializer will do)."""
    try:
        cls.FromString(payload)
    except pb_message.DecodeError:
        return False
    return True
