"""Write model files the way ML frameworks write them, for tests.

Each writer produces byte-accurate files in the order the framework writes them, with the same
temporary names and renames, so a test sees on disk what a real training job would leave there
at every moment. TensorFlow writes tensor bundles through `<name>.tempstate<u64>` and small
protos through `<name>.tmp<32 hex>`; safetensors, Hugging Face, ONNX, torch.save, Keras and
MLflow write in place; torch DCP renames `.metadata.tmp` to `.metadata` last.

Everything is deterministic: no randomness (temp suffixes are derived from the path), fixed zip
timestamps. `chunk` is the size of each write and `pause` the seconds slept after each one,
so a test can watch a file grow. Dependency-free: standard library only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence

CHUNK = 64 * 1024
_PATTERN = bytes(range(256))
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_TORCH_ALIGNMENT = 64  # torch.save aligns every record's data to 64 bytes


def write_chunked(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    filler: int = 0,
    limit: int | None = None,
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> None:
    """Write `data` then `filler` deterministic bytes to `path` in place, one chunk per write.

    Each chunk is flushed before the optional `pause`; `limit` stops after that many bytes
    (a writer killed mid-file).
    """
    written = 0
    with open(path, "wb") as out:
        for piece in _pieces(data, filler, chunk):
            if limit is not None:
                piece = piece[: max(0, limit - written)]
            if not piece:
                break
            out.write(piece)
            out.flush()
            written += len(piece)
            if pause:
                time.sleep(pause)


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, int],
    *,
    metadata: Mapping[str, str] | None = None,
    truncate_to: int | None = None,
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> int:
    """Write a safetensors file of U8 tensors (name -> byte length) in place, as the Rust
    `safetensors` crate does; return the size of the complete file.

    `truncate_to` stops writing after that many bytes.
    """
    header = safetensors_header(tensors, metadata)
    data_bytes = sum(tensors.values())
    write_chunked(path, header, filler=data_bytes, limit=truncate_to, chunk=chunk, pause=pause)
    return len(header) + data_bytes


def safetensors_header(tensors: Mapping[str, int], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file of U8 tensors.

    Like the Rust crate: tensors sorted by name (all share one dtype), `__metadata__` first,
    compact JSON padded with spaces to a multiple of 8 bytes.
    """
    entries: dict[str, object] = {}
    if metadata is not None:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(tensors):
        size = tensors[name]
        entries[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def write_saved_model(
    directory: str | os.PathLike[str],
    *,
    shards: int = 2,
    shard_bytes: int = 4096,
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> None:
    """Write a TF2 SavedModel in `tf.saved_model.save` order.

    `variables/variables.data-0000i-of-0000M` shards and then `variables/variables.index`, each
    through a `.tempstate<u64>` name renamed into place; an empty `assets/`; `saved_model.pb`
    and then `fingerprint.pb`, each through `<name>.tmp<32 hex>` (TF's atomic_write_string_to_file).
    """
    variables = os.path.join(directory, "variables")
    os.makedirs(variables, exist_ok=True)
    _write_bundle(os.path.join(variables, "variables"), shards, shard_bytes, chunk, pause)
    os.makedirs(os.path.join(directory, "assets"), exist_ok=True)
    # SavedModel{saved_model_schema_version: 1, meta_graphs: {}}
    _write_atomically(os.path.join(directory, "saved_model.pb"), b"\x08\x01\x12\x00", chunk, pause)
    # FingerprintDef with its first five uint64 hashes set
    fingerprint = b"\x08\x01\x10\x02\x18\x03\x20\x04\x28\x05"
    _write_atomically(os.path.join(directory, "fingerprint.pb"), fingerprint, chunk, pause)


def write_tf_checkpoint(
    directory: str | os.PathLike[str],
    prefix: str = "ckpt-1",
    shards: int = 1,
    *,
    shard_bytes: int = 4096,
    listed_prefix: str | None = None,
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> None:
    """Write a TF2 checkpoint as `CheckpointManager.save` does.

    `<prefix>.data-*` shards and `<prefix>.index` through `.tempstate<u64>` renames, then the
    `checkpoint` state file (text proto, `checkpoint.tmp<32 hex>` renamed). The state file
    names `listed_prefix` (default `prefix`; may be absolute, as TF records when saving to an
    absolute path).
    """
    os.makedirs(directory, exist_ok=True)
    _write_bundle(os.path.join(directory, prefix), shards, shard_bytes, chunk, pause)
    listed = _text_proto_string(prefix if listed_prefix is None else listed_prefix)
    state = (
        f"model_checkpoint_path: {listed}\n"
        f"all_model_checkpoint_paths: {listed}\n"
        "all_model_checkpoint_timestamps: 1700000000.0\n"
        "last_preserved_timestamp: 1699999999.0\n"
    )
    _write_atomically(os.path.join(directory, "checkpoint"), state.encode(), chunk, pause)


def write_hf_sharded(
    directory: str | os.PathLike[str],
    *,
    shards: int = 3,
    shard_bytes: int = 4096,
    skip_shard: int | None = None,
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> None:
    """Write a sharded Hugging Face checkpoint as `save_pretrained` does, all in place.

    `config.json`, then `model-0000i-of-0000N.safetensors` (i from 1, one tensor of
    `shard_bytes` each), then `model.safetensors.index.json` with its `weight_map`.
    `skip_shard` (1-based, as in the file name) leaves that shard out while the index still
    names it.
    """
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["TestModel"], "model_type": "test", "torch_dtype": "uint8"}
    _write_json(os.path.join(directory, "config.json"), config, chunk, pause)
    weight_map: dict[str, str] = {}
    for number in range(1, shards + 1):
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        weight_map[f"layers.{number}.weight"] = name
        if number != skip_shard:
            path = os.path.join(directory, name)
            tensors = {f"layers.{number}.weight": shard_bytes}
            write_safetensors(path, tensors, metadata={"format": "pt"}, chunk=chunk, pause=pause)
    index = {"metadata": {"total_size": shards * shard_bytes}, "weight_map": weight_map}
    _write_json(os.path.join(directory, "model.safetensors.index.json"), index, chunk, pause)


def write_onnx(
    path: str | os.PathLike[str], nbytes: int = 1024, *, chunk: int = CHUNK, pause: float = 0.0
) -> None:
    """Write an ONNX ModelProto of exactly `nbytes` in place, as `onnx.save_model` does.

    `ir_version: 8` padded with a `doc_string`; 0 gives an empty file, 1 to 3 a cut-off proto.
    """
    write_chunked(path, _onnx_bytes(nbytes), chunk=chunk, pause=pause)


def write_torch_zip(
    path: str | os.PathLike[str],
    *,
    tensor_bytes: int = 4096,
    truncated: bool = False,
    archive_name: str | None = None,
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> None:
    """Write a `torch.save` zip in place: `data.pkl`, `byteorder`, `data/0`, `version`,
    `.data/serialization_id`, stored and 64-byte aligned like PyTorchStreamWriter.

    Records live under `archive_name/` (torch uses the file's stem, "archive" for file objects).
    `truncated` stops before the central directory, like a process killed mid-save.
    """
    archive = archive_name or os.path.splitext(os.path.basename(path))[0]
    records = [
        ("data.pkl", pickle.dumps({"weight": "data/0"}, protocol=2)),
        ("byteorder", b"little"),
        ("data/0", _filler(tensor_bytes)),
        ("version", b"3\n"),
        (".data/serialization_id", b"0" * 20),
    ]
    content, directory_at = _zip_bytes([(f"{archive}/{n}", d) for n, d in records], align=True)
    write_chunked(path, content[:directory_at] if truncated else content, chunk=chunk, pause=pause)


def write_keras(
    path: str | os.PathLike[str],
    *,
    weights_bytes: int = 4096,
    truncated: bool = False,
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> None:
    """Write a Keras 3 `.keras` zip in place: `metadata.json`, `config.json`,
    `model.weights.h5`; `truncated` stops before the central directory."""
    metadata = {"keras_version": "3.3.3", "date_saved": "2024-01-01@00:00:00"}
    config = {"class_name": "Sequential", "config": {"name": "sequential", "layers": []}}
    records = [
        ("metadata.json", json.dumps(metadata).encode()),
        ("config.json", json.dumps(config).encode()),
        ("model.weights.h5", b"\x89HDF\r\n\x1a\n" + _filler(weights_bytes)),
    ]
    content, directory_at = _zip_bytes(records, align=False)
    write_chunked(path, content[:directory_at] if truncated else content, chunk=chunk, pause=pause)


def write_torch_dcp(
    directory: str | os.PathLike[str],
    ranks: int = 2,
    with_metadata: bool = True,
    *,
    shard_bytes: int = 4096,
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> None:
    """Write a torch.distributed.checkpoint directory as FileSystemWriter does.

    `__<rank>_0.distcp` for every rank in place, then (unless `with_metadata` is false, a job
    killed before the coordinator finished) `.metadata` through `.metadata.tmp` renamed.
    """
    os.makedirs(directory, exist_ok=True)
    for rank in range(ranks):
        path = os.path.join(directory, f"__{rank}_0.distcp")
        write_chunked(path, b"", filler=shard_bytes, chunk=chunk, pause=pause)
    if with_metadata:
        final = os.path.join(directory, ".metadata")
        metadata = {"state_dict_metadata": {f"rank{r}": shard_bytes for r in range(ranks)}}
        write_chunked(final + ".tmp", pickle.dumps(metadata, protocol=2), chunk=chunk, pause=pause)
        os.replace(final + ".tmp", final)


def write_mlflow(
    directory: str | os.PathLike[str], *, chunk: int = CHUNK, pause: float = 0.0
) -> None:
    """Write an MLflow model in place as `mlflow.sklearn.save_model` does: `model.pkl`,
    then `MLmodel`."""
    os.makedirs(directory, exist_ok=True)
    model = pickle.dumps({"coef": [0.5, 1.5], "intercept": 0.25}, protocol=4)
    write_chunked(os.path.join(directory, "model.pkl"), model, chunk=chunk, pause=pause)
    write_chunked(os.path.join(directory, "MLmodel"), _MLMODEL.encode(), chunk=chunk, pause=pause)


def copy_tree_chunked(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    chunk: int = CHUNK,
    pause: float = 0.0,
) -> None:
    """Copy a tree file by file in sorted order, each file in chunks (like `cp -r` or an
    upload); symlinks are copied as symlinks, never followed."""
    for here, dirs, files in os.walk(src_dir):
        dirs.sort()
        target = os.path.join(dst_dir, os.path.relpath(here, src_dir))
        os.makedirs(target, exist_ok=True)
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            source = os.path.join(here, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), os.path.join(target, name))
            else:
                _copy_file(source, os.path.join(target, name), chunk, pause)


# --- helpers -------------------------------------------------------------------------------

_MLMODEL = """\
artifact_path: model
flavors:
  python_function:
    loader_module: mlflow.sklearn
    model_path: model.pkl
    predict_fn: predict
    python_version: 3.11.7
  sklearn:
    code: null
    pickled_model: model.pkl
    serialization_format: cloudpickle
    sklearn_version: 1.4.2
mlflow_version: 2.12.1
model_uuid: 0123456789abcdef0123456789abcdef
utc_time_created: '2024-01-01 00:00:00.000000'
"""


def _filler(nbytes: int) -> bytes:
    return (_PATTERN * (nbytes // len(_PATTERN) + 1))[:nbytes]


def _pieces(data: bytes, filler: int, chunk: int) -> Iterator[bytes]:
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]
    block = _filler(chunk)
    for start in range(0, filler, chunk):
        yield block[: min(chunk, filler - start)]


def _path_digest(path: str | os.PathLike[str]) -> bytes:
    return hashlib.sha256(os.fsencode(path)).digest()


def _write_renamed(
    final: str, temp: str, data: bytes, filler: int, chunk: int, pause: float
) -> None:
    write_chunked(temp, data, filler=filler, chunk=chunk, pause=pause)
    os.replace(temp, final)


def _write_tempstate(final: str, data: bytes, filler: int, chunk: int, pause: float) -> None:
    """TF's BundleWriter: write `<final>.tempstate<random u64>`, then rename."""
    digits = int.from_bytes(_path_digest(final)[:8], "little")
    _write_renamed(final, f"{final}.tempstate{digits}", data, filler, chunk, pause)


def _write_atomically(final: str, data: bytes, chunk: int, pause: float) -> None:
    """TF's file_io.atomic_write_string_to_file: write `<final>.tmp<uuid4 hex>`, then rename."""
    _write_renamed(final, f"{final}.tmp{_path_digest(final).hex()[:32]}", data, 0, chunk, pause)


def _write_bundle(prefix: str, shards: int, shard_bytes: int, chunk: int, pause: float) -> None:
    """A TF tensor bundle: data shards, then the index (a leveldb table: its footer magic)."""
    for shard in range(shards):
        name = f"{prefix}.data-{shard:05d}-of-{shards:05d}"
        _write_tempstate(name, b"", shard_bytes, chunk, pause)
    table_footer = b"\x00" * 40 + struct.pack("<Q", 0xDB4775248B80FB57)
    _write_tempstate(f"{prefix}.index", b"\x00" * 16 + table_footer, 0, chunk, pause)


def _write_json(path: str, document: object, chunk: int, pause: float) -> None:
    """Hugging Face's JSON files: indent 2, sorted keys, trailing newline."""
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    write_chunked(path, text.encode(), chunk=chunk, pause=pause)


def _text_proto_string(value: str) -> str:
    """A protobuf text-format string literal, escaped as Python's text_format does."""
    out = []
    for byte in os.fsencode(value):
        char = chr(byte)
        if char in "\"'\\":
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _onnx_bytes(nbytes: int) -> bytes:
    head = b"\x08\x08"  # field 1 (ir_version), varint 8
    room = nbytes - len(head)
    for length_size in range(1, 6):  # field 6 (doc_string): tag, varint length, text
        text_len = room - 1 - length_size
        if text_len >= 0 and len(_varint(text_len)) == length_size:
            return head + b"\x32" + _varint(text_len) + b"d" * text_len
    return (head + b"\x32\x00")[:nbytes]


def _zip_bytes(records: Sequence[tuple[str, bytes]], *, align: bool) -> tuple[bytes, int]:
    """A stored zip of `records` and the offset of its central directory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            if align:
                info.extra = _torch_padding(buffer.tell(), name)
            archive.writestr(info, data)
        directory_at = buffer.tell()
    return buffer.getvalue(), directory_at


def _torch_padding(cursor: int, name: str) -> bytes:
    """PyTorchStreamWriter's "FB" extra field that puts a record's data on a 64-byte boundary."""
    start = cursor + 30 + len(name.encode()) + 4
    padding = -start % _TORCH_ALIGNMENT
    return b"FB" + struct.pack("<H", padding) + b"Z" * padding


def _copy_file(source: str, target: str, chunk: int, pause: float) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        while piece := src.read(chunk):
            dst.write(piece)
            dst.flush()
            if pause:
                time.sleep(pause)
