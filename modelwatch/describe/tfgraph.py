"""Which variables of a TF2 checkpoint are the model's parameters: its object graph says.

A TF2 checkpoint names each variable by the first path that reaches it from the root object,
so a Keras 3 `tf.train.Checkpoint(model=..., optimizer=...)` stores the model's trainable
variables under `optimizer/_trainable_variables/N` (the optimizer reached them first), and
`model.export()` stores every variable twice (`variables/N` and `_all_variables/N`, two
distinct objects with the same values). Key prefixes cannot tell; the object graph can.

`_CHECKPOINTABLE_OBJECT_GRAPH` is a string tensor in the data file (one varint64 length, a
4-byte CRC, the bytes) holding a `TrackableObjectGraph` {nodes = 1 [{children = 1
[{node_id = 1, local_name = 2}], attributes = 2 [{name = 1, checkpoint_key = 3}],
slot_variables = 3}]}, node 0 being the root. The parameters are the `VARIABLE_VALUE`
attributes of the nodes reachable from the root without passing an edge in `_EXCLUDED`.
"""

from __future__ import annotations

from collections import deque

from modelwatch.describe.protowire import VARINT, Region
from modelwatch.describe.source import Source, malformed, too_large
from modelwatch.describe.tftable import Bundle

OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
_EXCLUDED = {
    "optimizer",  # its iterations, learning rate and slots; the model's own are reached anyway
    "save_counter",
    "_all_variables",  # keras.export.ExportArchive: the same variables as `variables`
}
MAX_GRAPH = 64 << 20


def parameter_keys(source: Source, prefix: str, bundle: Bundle) -> set[str] | None:
    """The checkpoint keys of the model's parameters; None when the checkpoint has no object
    graph (a TF1 `Saver` checkpoint), so the caller falls back on names."""
    entry = next((v for v in bundle.variables if v.name == OBJECT_GRAPH), None)
    if entry is None or entry.dtype != "string":
        return None
    data_file = f"{prefix}.data-{entry.shard:05d}-of-{bundle.num_shards:05d}"
    if entry.size > min(MAX_GRAPH, source.limits.header_bytes * 4):
        raise too_large(data_file, f"object graph of {entry.size} bytes")
    with source.open(data_file) as blob:
        raw = blob.read(entry.offset, entry.size)
    graph = _string_tensor(raw, data_file)
    nodes = _nodes(Region(blob, 0, len(graph), graph, 0))
    return _reachable_keys(nodes, source)


def _string_tensor(raw: bytes, name: str) -> bytes:
    length = shift = pos = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise malformed(name, "bad object graph length")
        byte = raw[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    start = pos + 4  # the CRC of the lengths
    if start + length > len(raw):
        raise malformed(name, "object graph passes the end of its entry")
    return raw[start : start + length]


Node = tuple[list[tuple[int, str]], list[str]]  # (children (id, local name), variable keys)


def _nodes(graph: Region) -> list[Node]:
    nodes: list[Node] = []
    for field in graph.fields():
        if field.number != 1:
            continue
        children: list[tuple[int, str]] = []
        keys: list[str] = []
        for part in field.message().fields():
            if part.number == 1:
                children.append(_child(part.message()))
            elif part.number == 2:
                key = _variable_key(part.message())
                if key is not None:
                    keys.append(key)
        nodes.append((children, keys))
    return nodes


def _child(reference: Region) -> tuple[int, str]:
    node_id, name = -1, ""
    for field in reference.fields():
        if field.number == 1 and field.wire == VARINT:
            node_id = field.value
        elif field.number == 2:
            name = field.text()
    return node_id, name


def _variable_key(attribute: Region) -> str | None:
    name, key = "", ""
    for field in attribute.fields():
        if field.number == 1:
            name = field.text()
        elif field.number == 3:
            key = field.text()
    return key if name == "VARIABLE_VALUE" else None


def _reachable_keys(nodes: list[Node], source: Source) -> set[str]:
    keys: set[str] = set()
    seen = {0}
    queue = deque([0]) if nodes else deque()
    while queue:
        children, node_keys = nodes[queue.popleft()]
        keys.update(node_keys)
        for child, name in children:
            source.tick()
            if name in _EXCLUDED or not 0 <= child < len(nodes) or child in seen:
                continue
            seen.add(child)
            queue.append(child)
    return keys
