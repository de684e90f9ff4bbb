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

Memory: the graph (at most `MAX_GRAPH` bytes) is held while it is walked; nodes are kept as
offsets into it (8 bytes each, at most `MAX_NODES`) and parsed when the walk reaches them;
the keys found are at most `MAX_KEYS`.
"""

from __future__ import annotations

from array import array

from modelwatch.describe.protowire import VARINT, Region
from modelwatch.describe.source import Source, malformed, too_large
from modelwatch.describe.tftable import Bundle

_EXCLUDED = {
    "optimizer",  # its iterations, learning rate and slots; the model's own are reached anyway
    "save_counter",
    "_all_variables",  # keras.export.ExportArchive: the same variables as `variables`
}
MAX_GRAPH = 16 << 20  # a graph of 80,000 variables is about 16 MB
MAX_NODES = 1_000_000
MAX_KEYS = 250_000


def parameter_keys(source: Source, prefix: str, bundle: Bundle) -> set[str] | None:
    """The checkpoint keys of the model's parameters; None when the checkpoint has no object
    graph (a TF1 `Saver` checkpoint), so the caller falls back on names."""
    entry = bundle.object_graph
    if entry is None or entry.dtype != "string":
        return None
    data_file = f"{prefix}.data-{entry.shard:05d}-of-{bundle.num_shards:05d}"
    if entry.size > MAX_GRAPH:
        raise too_large(data_file, f"object graph of {entry.size} bytes")
    with source.open(data_file) as blob:
        raw = blob.read(entry.offset, entry.size)
    start, end = _string_tensor(raw, data_file)
    return _reachable_keys(Region(blob, start, end, raw, 0), source)


def _string_tensor(raw: bytes, name: str) -> tuple[int, int]:
    """Where in `raw` the string tensor's one string is."""
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
    return start, start + length


def _reachable_keys(graph: Region, source: Source) -> set[str]:
    starts, ends = _nodes(graph)
    keys: set[str] = set()
    seen = bytearray(len(starts))
    queue = array("I", [0] if starts else [])
    if starts:
        seen[0] = 1
    head = 0
    while head < len(queue):
        node = Region(graph.blob, starts[queue[head]], ends[queue[head]], graph.buf, 0)
        head += 1
        for part in node.fields():
            if part.number == 1:
                child, name = _child(part.message())
                if name in _EXCLUDED or not 0 <= child < len(starts) or seen[child]:
                    continue
                seen[child] = 1
                queue.append(child)
            elif part.number == 2:
                key = _variable_key(part.message())
                if key is not None:
                    keys.add(key)
                    if len(keys) > MAX_KEYS:
                        raise too_large(graph.blob.name, f"more than {MAX_KEYS} variables")
    return keys


def _nodes(graph: Region) -> tuple[array[int], array[int]]:
    """Where each node's message is in the graph's buffer."""
    starts, ends = array("I"), array("I")
    for field in graph.fields():
        if field.number == 1 and field.region is not None:
            if len(starts) >= MAX_NODES:
                raise too_large(graph.blob.name, f"more than {MAX_NODES} objects in the graph")
            starts.append(field.region.start)
            ends.append(field.region.end)
    return starts, ends


def _child(reference: Region) -> tuple[int, str]:
    node_id, name = -1, ""
    for field in reference.fields():
        if field.number == 1 and field.wire == VARINT:
            node_id = field.value
        elif field.number == 2:
            name = field.text(1 << 12)
    return node_id, name


def _variable_key(attribute: Region) -> str | None:
    name, key = "", ""
    for field in attribute.fields():
        if field.number == 1:
            name = field.text(1 << 12)
        elif field.number == 3:
            key = field.text(1 << 12)
    return key if name == "VARIABLE_VALUE" else None
