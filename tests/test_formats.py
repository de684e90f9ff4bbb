"""Format detection and completeness checks on real files written like the frameworks do."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelwatch.formats import FORMATS, check_complete, detect_format, model_type_for
from modelwatch.progress import Heartbeat, OverBudget
from modelwatch.testing import FakeClock
from tests.conftest import examples
from tests.writers import (
    copy_tree_chunked,
    write_hf_sharded,
    write_keras,
    write_mlflow,
    write_onnx,
    write_safetensors,
    write_saved_model,
    write_tf_checkpoint,
    write_torch_dcp,
    write_torch_zip,
)


def listing(unit: Path) -> dict[str, int]:
    """Relative path -> size of the regular files under `unit`, as the scanner lists them."""
    sizes: dict[str, int] = {}
    for here, _dirs, files in os.walk(unit):
        for name in files:
            path = os.path.join(here, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                sizes[Path(path).relative_to(unit).as_posix()] = info.st_size
    return sizes


def complete(unit_dir: str, fmt: str, sizes: dict[str, int], **how: Any) -> str | None:
    """`check_complete`'s reason as its message; None when complete."""
    reason = check_complete(unit_dir, fmt, sizes, **how)
    return None if reason is None else reason.message


def check(unit: Path, fmt: str | None = None) -> str | None:
    """`check_complete` on the unit's current listing, with the detected format by default."""
    sizes = listing(unit)
    return complete(str(unit), fmt or detect_format(sizes), sizes)


WRITERS: dict[str, Callable[[Path], object]] = {
    "saved_model": lambda d: write_saved_model(d),
    "tf_checkpoint": lambda d: write_tf_checkpoint(d, shards=2),
    "keras": lambda d: write_keras(d / "model.keras"),
    "onnx": lambda d: write_onnx(d / "model.onnx"),
    "pytorch": lambda d: write_torch_zip(d / "model.pt"),
    "safetensors": lambda d: write_safetensors(d / "model.safetensors", {"w": 100, "b": 3}),
    "huggingface": lambda d: write_hf_sharded(d),
    "torch_dcp": lambda d: write_torch_dcp(d),
    "mlflow": lambda d: write_mlflow(d),
}


# --- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_framework_layout_is_detected_and_complete(tmp_path: Path, fmt: str) -> None:
    """A model written the way its framework writes it is recognised and complete."""
    WRITERS[fmt](tmp_path)
    assert detect_format(listing(tmp_path)) == fmt
    assert check(tmp_path) is None


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["1/saved_model.pb", "1/variables/variables.index"], "saved_model"),
        (["saved_model.pbtxt"], "saved_model"),
        (["checkpoint", "ckpt-3.data-00000-of-00001"], "tf_checkpoint"),
        (["weights.pth"], "pytorch"),
        (["lightning/last.ckpt"], "pytorch"),
        (["weights.bin"], "pytorch"),
        (["config.json", "pytorch_model.bin"], "huggingface"),
        (["config.json", "pytorch_model.bin.index.json"], "huggingface"),
        (["unet/config.json", "unet/diffusion_pytorch_model.safetensors"], "huggingface"),
        (["README.md", "weights.npy"], "unknown"),
        ([], "unknown"),
        (["checkpoint"], "unknown"),
        (["model.safetensors.index.json"], "unknown"),
    ],
)
def test_detection_by_name_anywhere_in_the_unit(paths: list[str], expected: str) -> None:
    """Formats are recognised by file names, also in subdirectories."""
    assert detect_format(paths) == expected


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["MLmodel", "data/model/saved_model.pb"], "mlflow"),
        (["saved_model.pb", "checkpoint", "variables/variables.index", "x.index"], "saved_model"),
        (["checkpoint", "ckpt-1.index", "__0_0.distcp"], "tf_checkpoint"),
        (["__0_0.distcp", "config.json", "model.safetensors"], "torch_dcp"),
        (["config.json", "model.safetensors", "model.keras"], "huggingface"),
        (["model.keras", "model.onnx"], "keras"),
        (["model.onnx", "model.safetensors"], "onnx"),
        (["model.safetensors", "optimizer.pt"], "safetensors"),
        (["optimizer.pt", "notes.txt"], "pytorch"),
    ],
)
def test_most_specific_format_wins(paths: list[str], expected: str) -> None:
    """When several formats match, the documented priority picks one."""
    assert detect_format(paths) == expected


def test_paired_rules_need_both_files_in_one_directory() -> None:
    """`config.json` or `checkpoint` elsewhere in the unit does not pair with weights."""
    assert detect_format(["config.json", "weights/model.safetensors"]) == "safetensors"
    assert detect_format(["checkpoint", "old/ckpt-1.index"]) == "unknown"


@pytest.mark.parametrize(
    ("fmt", "model_type"),
    [("saved_model", "Tensorflow"), ("tf_checkpoint", "Tensorflow"), ("keras", "Tensorflow")]
    + [("onnx", "ONNX")]
    + [(f, "Custom") for f in ("pytorch", "safetensors", "huggingface", "torch_dcp", "mlflow")]
    + [("unknown", "Custom")],
)
def test_model_type_follows_format(fmt: str, model_type: str) -> None:
    """Every format maps to Gradient's model type vocabulary."""
    assert fmt in FORMATS
    assert model_type_for(fmt) == model_type


# --- SavedModel and TF checkpoints -------------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "reason"),
    [
        (
            "variables/variables.data-00001-of-00002",
            "variables/variables.data-00001-of-00002 missing",
        ),
        ("variables/variables.index", "variables/variables.index missing"),
    ],
)
def test_saved_model_waits_for_every_variables_file(
    tmp_path: Path, missing: str, reason: str
) -> None:
    """A SavedModel missing its variables index or a data shard is incomplete."""
    write_saved_model(tmp_path)
    (tmp_path / missing).unlink()
    assert check(tmp_path) == reason


def test_saved_model_in_a_version_subdirectory_names_the_full_path(tmp_path: Path) -> None:
    """TF Serving layouts (`1/saved_model.pb`) are checked where they are."""
    write_saved_model(tmp_path / "1", shards=3)
    (tmp_path / "1/variables/variables.data-00002-of-00003").unlink()
    assert check(tmp_path) == "1/variables/variables.data-00002-of-00003 missing"


def test_saved_model_without_variables_is_complete(tmp_path: Path) -> None:
    """A SavedModel with no variables files needs only saved_model.pb."""
    (tmp_path / "saved_model.pb").write_bytes(b"\x08\x01")
    assert check(tmp_path) is None


def test_saved_model_index_without_any_data_shard_is_incomplete(tmp_path: Path) -> None:
    """A tensor bundle always has a data shard; an index alone is not the whole bundle."""
    write_saved_model(tmp_path, shards=1)
    (tmp_path / "variables/variables.data-00000-of-00001").unlink()
    assert check(tmp_path) == "variables/variables.data-00000-of-* missing"


def test_tf_checkpoint_prefix_missing_a_shard(tmp_path: Path) -> None:
    """The prefix `checkpoint` names must have every data shard."""
    write_tf_checkpoint(tmp_path, "ckpt-7", shards=3)
    (tmp_path / "ckpt-7.data-00001-of-00003").unlink()
    assert check(tmp_path) == "ckpt-7.data-00001-of-00003 missing (named in checkpoint)"


def test_tf_checkpoint_prefix_missing_its_index(tmp_path: Path) -> None:
    """Data shards beside `checkpoint` without the index are still a checkpoint, incomplete."""
    write_tf_checkpoint(tmp_path, "ckpt-2")
    (tmp_path / "ckpt-2.index").unlink()
    assert detect_format(listing(tmp_path)) == "tf_checkpoint"
    assert check(tmp_path) == "ckpt-2.index missing (named in checkpoint)"


def test_tf_checkpoint_checks_the_prefix_named_not_older_ones(tmp_path: Path) -> None:
    """Only the prefix `checkpoint` names counts: older ones may be pruned, newer awaited."""
    write_tf_checkpoint(tmp_path, "ckpt-1", listed_prefix="ckpt-2")
    assert check(tmp_path) == "ckpt-2.index missing (named in checkpoint)"
    write_tf_checkpoint(tmp_path, "ckpt-2")
    (tmp_path / "ckpt-1.data-00000-of-00001").unlink()
    assert check(tmp_path) is None


@pytest.mark.parametrize(
    "listed", ["/mnt/train/run 1/ckpt-5", "./ckpt-5", "sub/../ckpt-5", "ckpt-5"]
)
def test_tf_checkpoint_paths_absolute_or_relative(tmp_path: Path, listed: str) -> None:
    """Absolute prefixes are taken by basename, relative ones from the checkpoint's directory."""
    write_tf_checkpoint(tmp_path / "train", "ckpt-5", listed_prefix=listed)
    assert check(tmp_path) is None


def test_tf_checkpoint_non_ascii_prefix_is_unescaped(tmp_path: Path) -> None:
    """TF escapes non-ASCII bytes of the prefix as octal; the real file name is found."""
    write_tf_checkpoint(tmp_path, "modèle-1")
    assert b"\\303\\250" in (tmp_path / "checkpoint").read_bytes()
    assert check(tmp_path) is None


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'model_checkpoint_path: "ckpt-1', "not one quoted string"),
        (b'all_model_checkpoint_paths: "ckpt-1"\n', "no model_checkpoint_path"),
        (b"\x00\xff garbage", "not a text-format line"),
        (b'model_checkpoint_path: "a\\qb"\n', "bad escape"),
    ],
)
def test_tf_checkpoint_unparseable_state_file(tmp_path: Path, content: bytes, why: str) -> None:
    """A `checkpoint` file that cannot be read as TF's text proto is a reason."""
    write_tf_checkpoint(tmp_path)
    (tmp_path / "checkpoint").write_bytes(content)
    reason = check(tmp_path)
    assert reason is not None
    assert reason.startswith("checkpoint: unparseable")
    assert why in reason


def test_tf_checkpoint_prefix_leaving_the_unit(tmp_path: Path) -> None:
    """A relative prefix climbing out of the unit is refused, not looked up."""
    write_tf_checkpoint(tmp_path, listed_prefix="../../etc/ckpt")
    assert check(tmp_path) == "checkpoint: model_checkpoint_path leaves the unit"


# --- safetensors and Hugging Face --------------------------------------------------------


def test_truncated_safetensors_names_both_sizes(tmp_path: Path) -> None:
    """A safetensors file cut short says how long the header says it should be."""
    full = write_safetensors(tmp_path / "m.safetensors", {"w": 4096}, truncate_to=1000)
    assert check(tmp_path) == f"m.safetensors: truncated (header says {full} bytes, file has 1000)"


def test_safetensors_cut_inside_its_header(tmp_path: Path) -> None:
    """A file shorter than its header length, or than the length field itself, is truncated."""
    write_safetensors(tmp_path / "a.safetensors", {"w": 10}, truncate_to=20)
    write_safetensors(tmp_path / "b.safetensors", {"w": 10}, truncate_to=5)
    sizes = listing(tmp_path)
    reason = complete(str(tmp_path), "safetensors", sizes)
    assert reason is not None
    assert reason.startswith("a.safetensors: truncated (header ends at")
    del sizes["a.safetensors"]
    assert complete(str(tmp_path), "safetensors", sizes) == (
        "b.safetensors: truncated (5 bytes, no header length)"
    )


def test_safetensors_with_trailing_bytes_is_a_mismatch(tmp_path: Path) -> None:
    """Bytes beyond the data the header describes are not a valid file either."""
    full = write_safetensors(tmp_path / "m.safetensors", {"w": 16})
    with open(tmp_path / "m.safetensors", "ab") as out:
        out.write(b"xx")
    assert check(tmp_path) == (
        f"m.safetensors: size mismatch (header says {full} bytes, file has {full + 2})"
    )


@pytest.mark.parametrize(
    "header",
    [
        b"not json at all!",
        b"[1, 2, 3]",
        b'{"w": {"dtype": "U8", "shape": [4]}}',
        b'{"w": {"data_offsets": [8, 4]}}',
        b'{"w": {"data_offsets": [0, true]}}',
        b'{"w": {"data_offsets": [0, -1]}}',
        b"\xff\xfe{}",
        b"[" * 100_000,
    ],
)
def test_safetensors_header_garbage(tmp_path: Path, header: bytes) -> None:
    """A header that is not a JSON object of tensors with data_offsets is a reason."""
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    reason = check(tmp_path)
    assert reason is not None
    assert reason.startswith("m.safetensors: header malformed")


def test_safetensors_metadata_is_not_a_tensor(tmp_path: Path) -> None:
    """`__metadata__` does not count towards the data size."""
    write_safetensors(tmp_path / "m.safetensors", {"w": 8}, metadata={"format": "pt"})
    assert check(tmp_path) is None


def test_safetensors_huge_header_length_is_refused_unread(tmp_path: Path) -> None:
    """A header length above 25 MB (huggingface_hub's limit) is a reason, not a 200 MiB
    read."""
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", 200 * 1024 * 1024))
        out.truncate(300 * 1024 * 1024)  # sparse: costs no disk
    assert check(tmp_path) == f"m.safetensors: header too large ({200 * 1024 * 1024} bytes)"


def test_hf_index_naming_a_missing_shard(tmp_path: Path) -> None:
    """A shard named in weight_map but not on disk keeps the checkpoint incomplete."""
    write_hf_sharded(tmp_path, skip_shard=2)
    assert check(tmp_path) == (
        "model-00002-of-00003.safetensors missing (named in model.safetensors.index.json)"
    )


@pytest.mark.parametrize(
    ("write", "files"),
    [
        (
            lambda d: write_hf_sharded(d, skip_shard=2),
            ("model-00002-of-00003.safetensors", "model.safetensors.index.json"),
        ),
        (
            lambda d: (
                write_tf_checkpoint(d, "ckpt-3"),
                (d / "ckpt-3.data-00000-of-00001").unlink(),
            ),
            ("ckpt-3.data-00000-of-*", "ckpt-3.index"),
        ),
        (
            lambda d: write_safetensors(d / "m.safetensors", {"w": 64}, truncate_to=40),
            ("m.safetensors",),
        ),
    ],
    ids=["hf-shard", "tf-data-shard", "truncated"],
)
def test_the_reason_names_its_files_as_data(
    tmp_path: Path, write: Callable[[Path], object], files: tuple[str, ...]
) -> None:
    """An incomplete unit's reason says which file is missing or incomplete (then the file
    that listed it), as data for `explain`, not only inside the message."""
    write(tmp_path)
    sizes = listing(tmp_path)
    reason = check_complete(str(tmp_path), detect_format(sizes), sizes)
    assert reason is not None
    assert (reason.code, reason.files) == ("incomplete", files)


def test_hf_truncated_shard(tmp_path: Path) -> None:
    """A truncated shard of a Hugging Face checkpoint is named."""
    write_hf_sharded(tmp_path, shard_bytes=1000)
    shard = tmp_path / "model-00003-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size - 1)
    reason = check(tmp_path)
    assert reason is not None
    assert reason.startswith("model-00003-of-00003.safetensors: truncated")


def test_hf_unparseable_index(tmp_path: Path) -> None:
    """An index.json cut mid-write is not valid JSON: incomplete."""
    write_hf_sharded(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    os.truncate(index, index.stat().st_size // 2)
    assert check(tmp_path) == "model.safetensors.index.json: not valid JSON"


def test_hf_pytorch_bin_shards(tmp_path: Path) -> None:
    """`pytorch_model.bin.index.json` shards must exist and be readable zips."""
    (tmp_path / "config.json").write_text("{}")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    write_torch_zip(tmp_path / "pytorch_model-00001-of-00002.bin")
    assert check(tmp_path) == (
        "pytorch_model-00002-of-00002.bin missing (named in pytorch_model.bin.index.json)"
    )
    write_torch_zip(tmp_path / "pytorch_model-00002-of-00002.bin", truncated=True)
    assert check(tmp_path) == (
        "pytorch_model-00002-of-00002.bin: zip central directory unreadable (no end record)"
    )


@pytest.mark.parametrize(
    ("index", "reason"),
    [
        ({"weight_map": ["model.safetensors"]}, "weight_map is not an object of file names"),
        ({"weight_map": {"w": "../../etc/passwd"}}, "weight_map names ../../etc/passwd outside"),
        ({"weight_map": {"w": "/etc/passwd"}}, "weight_map names /etc/passwd outside"),
        ({"weight_map": {"w": ""}}, "weight_map names '' outside"),
    ],
)
def test_hf_index_with_bad_weight_map(tmp_path: Path, index: object, reason: str) -> None:
    """A weight_map that is malformed or points outside the unit is a reason, never followed."""
    write_hf_sharded(tmp_path, shards=1)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    result = check(tmp_path)
    assert result is not None
    assert result.startswith(f"model.safetensors.index.json: {reason}")


def test_json_without_weight_map_is_not_a_shard_index(tmp_path: Path) -> None:
    """Other `*.index.json` files (valid JSON, no weight_map) do not block the unit."""
    write_hf_sharded(tmp_path, shards=1)
    (tmp_path / "search.index.json").write_text('{"pages": []}')
    assert check(tmp_path) is None


# --- zips, ONNX, DCP, settle-only formats ------------------------------------------------


def test_truncated_torch_zip(tmp_path: Path) -> None:
    """A torch.save zip without its central directory is incomplete."""
    write_torch_zip(tmp_path / "model.pt", truncated=True)
    assert check(tmp_path) == "model.pt: zip central directory unreadable (no end record)"


@pytest.mark.parametrize(
    ("main", "half_written"),
    [
        (lambda d: write_onnx(d / "model.onnx"), "model.pt"),
        (lambda d: write_safetensors(d / "model.safetensors", {"w": 10}), "optimizer.pt"),
    ],
)
def test_a_half_written_file_of_another_format_keeps_the_unit_incomplete(
    tmp_path: Path, main: Callable[[Path], Any], half_written: str
) -> None:
    """The unit's format is its most specific one, but a half-written file of any format it
    holds keeps it from settling (only the first format's checks ran)."""
    main(tmp_path)
    write_torch_zip(tmp_path / half_written, truncated=True)
    assert check(tmp_path) == f"{half_written}: zip central directory unreadable (no end record)"
    write_torch_zip(tmp_path / half_written)
    assert check(tmp_path) is None


def test_a_torch_zip_cut_inside_a_stored_zip_is_incomplete(tmp_path: Path) -> None:
    """A tensor whose bytes are a zip (a stored tokenizer archive) leaves an end record in
    the data: a torch.save cut off just after it must not pass for complete."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("tokenizer.json", "{}")
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", inner.getvalue() + b"\0" * 4000)
        z.writestr("archive/data/1", os.urandom(200_000))
    whole = outer.getvalue()
    cut = whole.index(inner.getvalue()) + len(inner.getvalue()) + 4100
    (tmp_path / "model.pt").write_bytes(whole[:cut])
    reason = check_complete(str(tmp_path), "pytorch", {"model.pt": cut})
    assert reason is not None
    assert "no end record" in reason.message
    (tmp_path / "model.pt").write_bytes(whole)
    assert check_complete(str(tmp_path), "pytorch", {"model.pt": len(whole)}) is None


def test_torch_zip_is_aligned_like_torch_save(tmp_path: Path) -> None:
    """The writer's records are 64-byte aligned under the file's stem, as torch.save does."""
    write_torch_zip(tmp_path / "model.pt")
    with zipfile.ZipFile(tmp_path / "model.pt") as archive:
        names = archive.namelist()
        data = archive.getinfo("model/data/0")
    assert names[0] == "model/data.pkl"
    assert "model/version" in names
    data_start = data.header_offset + 30 + len(data.filename) + len(data.extra)
    assert data_start % 64 == 0


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "w.pt: empty"),
        (b"PK", "w.pt: truncated zip (2 bytes)"),
        (b"\x80\x02\x8a\x0alegacy", None),
    ],
)
def test_pytorch_legacy_and_tiny_files(tmp_path: Path, content: bytes, reason: str | None) -> None:
    """Legacy pickles only need to be non-empty; a cut-off zip magic is truncated."""
    (tmp_path / "w.pt").write_bytes(content)
    assert check(tmp_path, "pytorch") == reason


def test_zip_with_oversized_central_directory_claim(tmp_path: Path) -> None:
    """A zip whose end record claims a huge central directory is refused, not read."""
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 500 * 1024 * 1024, 0, 0)
    path = tmp_path / "w.pt"
    with open(path, "wb") as out:
        out.write(b"PK\x03\x04")
        out.seek(600 * 1024 * 1024)  # sparse
        out.write(end)
    assert check(tmp_path) == "w.pt: zip central directory too large"


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_incomplete_keras(tmp_path: Path, how: str) -> None:
    """A .keras zip cut off or empty is incomplete."""
    write_keras(tmp_path / "m.keras", truncated=True)
    if how == "empty":
        (tmp_path / "m.keras").write_bytes(b"")
    reason = "empty" if how == "empty" else "zip central directory unreadable (no end record)"
    assert check(tmp_path) == f"m.keras: {reason}"


def test_empty_onnx(tmp_path: Path) -> None:
    """A zero-byte .onnx file is incomplete."""
    write_onnx(tmp_path / "model.onnx", 0)
    assert check(tmp_path) == "model.onnx: empty"


def test_onnx_writer_sizes_are_exact(tmp_path: Path) -> None:
    """write_onnx produces exactly the requested number of bytes."""
    for nbytes in (1, 2, 3, 4, 5, 130, 131, 20000):
        write_onnx(tmp_path / "model.onnx", nbytes)
        assert (tmp_path / "model.onnx").stat().st_size == nbytes


def test_dcp_without_metadata(tmp_path: Path) -> None:
    """A torch DCP checkpoint waits for the coordinator's .metadata."""
    write_torch_dcp(tmp_path / "step-100", ranks=4, with_metadata=False)
    assert check(tmp_path) == "step-100/.metadata missing"


@pytest.mark.parametrize("fmt", ["mlflow", "unknown"])
def test_settle_only_formats_are_always_complete(tmp_path: Path, fmt: str) -> None:
    """MLflow and unknown units are never held back by content."""
    write_mlflow(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert check(tmp_path, fmt) is None


def test_unknown_format_name_is_a_bug() -> None:
    """Passing a format outside FORMATS is a programming error."""
    with pytest.raises(ValueError, match="unknown format"):
        complete("/", "tflite", {})


# --- untrusted directories ---------------------------------------------------------------


@pytest.mark.parametrize("target", ["/etc/passwd", "big.safetensors"])
def test_symlinked_file_is_never_followed(tmp_path: Path, target: str) -> None:
    """A symlink listed as a file is a reason; its target is not read."""
    unit = tmp_path / "unit"
    unit.mkdir()
    write_safetensors(tmp_path / "big.safetensors", {"w": 10}, truncate_to=12)
    os.symlink(target if target.startswith("/") else tmp_path / target, unit / "a.safetensors")
    sizes = {"a.safetensors": 12}
    reason = complete(str(unit), "safetensors", sizes)
    assert reason == "a.safetensors: is a symlink, not followed"


def test_symlinked_parent_directory_is_never_followed(tmp_path: Path) -> None:
    """A directory swapped for a symlink out of the unit is not traversed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    write_torch_zip(outside / "m.pt", truncated=True)
    unit = tmp_path / "unit"
    unit.mkdir()
    os.symlink(outside, unit / "sub")
    sizes = {"sub/m.pt": (outside / "m.pt").stat().st_size}
    reason = complete(str(unit), "pytorch", sizes)
    assert reason == "sub/m.pt: a symlink or non-directory on the path, not followed"


def test_fifo_named_like_weights_does_not_block(tmp_path: Path) -> None:
    """A FIFO named x.safetensors is reported at once, never opened for reading."""
    os.mkfifo(tmp_path / "x.safetensors")
    result: list[str | None] = []
    worker = threading.Thread(
        target=lambda: result.append(complete(str(tmp_path), "safetensors", {"x.safetensors": 0})),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # release the blocked reader before failing
        os.close(os.open(tmp_path / "x.safetensors", os.O_WRONLY | os.O_NONBLOCK))
    assert result == ["x.safetensors: is a FIFO, not opened"]


def test_file_deleted_after_listing(tmp_path: Path) -> None:
    """A file that vanished between listing and checking is a reason, not an exception."""
    write_safetensors(tmp_path / "m.safetensors", {"w": 10})
    sizes = listing(tmp_path)
    (tmp_path / "m.safetensors").unlink()
    assert complete(str(tmp_path), "safetensors", sizes) == "m.safetensors missing"


def test_file_grown_or_replaced_after_listing(tmp_path: Path) -> None:
    """A file whose size or type changed since the listing is not complete yet."""
    write_torch_zip(tmp_path / "m.pt")
    sizes = listing(tmp_path)
    with open(tmp_path / "m.pt", "ab") as out:
        out.write(b"more")
    reason = complete(str(tmp_path), "pytorch", sizes)
    assert reason == f"m.pt: changed since listed ({sizes['m.pt']} bytes, now {sizes['m.pt'] + 4})"
    (tmp_path / "m.pt").unlink()
    (tmp_path / "m.pt").mkdir()
    assert complete(str(tmp_path), "pytorch", sizes) == "m.pt: is a directory"


def test_reasons_stay_on_one_line(tmp_path: Path) -> None:
    """File names with newlines are escaped in the reason."""
    (tmp_path / "evil\nname.onnx").write_bytes(b"")
    assert check(tmp_path) == "evil\\nname.onnx: empty"


@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        ("../x.onnx", "../x.onnx"),
        ("/etc/x.onnx", "/etc/x.onnx"),
        ("a\0.onnx", "a\\x00.onnx"),
        ("\ud800.onnx", "\\ud800.onnx"),
    ],
)
def test_paths_no_file_in_the_unit_can_have_are_refused(
    tmp_path: Path, bad: str, shown: str
) -> None:
    """A listing naming `..`, an absolute path or an impossible name is a reason, not opened."""
    assert complete(str(tmp_path), "onnx", {bad: 1}) == f"{shown}: not a path inside the unit"


def test_missing_unit_directory(tmp_path: Path) -> None:
    """A unit that disappeared is a reason, not an exception."""
    reason = check_complete(str(tmp_path / "gone"), "onnx", {"m.onnx": 1})
    assert reason is not None and reason.code == "unit_unavailable"
    assert reason.message == "unit directory cannot be opened (No such file or directory)"


def test_copy_tree_chunked_reproduces_a_model(tmp_path: Path) -> None:
    """Copying a model in small chunks yields the same complete model."""
    write_hf_sharded(tmp_path / "src", shard_bytes=5000)
    started = time.monotonic()
    copy_tree_chunked(tmp_path / "src", tmp_path / "dst", chunk=1024)
    assert time.monotonic() - started < 10
    assert listing(tmp_path / "dst") == listing(tmp_path / "src")
    assert check(tmp_path / "dst") is None


# --- arbitrary bytes never raise ---------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_tensor = st.fixed_dictionaries(
    {"data_offsets": _json | st.lists(st.integers(-5, 2**70), max_size=3)}
)


def _framed(document: object, slack: int, tail: bytes) -> bytes:
    body = json.dumps(document).encode()
    return struct.pack("<Q", max(0, len(body) + slack)) + body + tail


def _small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("archive/data.pkl"), b"\x80\x02}q\x00.")
    return buffer.getvalue()


def _spliced(base: bytes) -> st.SearchStrategy[bytes]:
    cut = st.integers(0, len(base))
    return st.builds(lambda a, junk, b: base[:a] + junk + base[b:], cut, st.binary(max_size=8), cut)


_TEXT_PROTO_PIECES = [
    b"ckpt-1",
    b"/abs/",
    b"../",
    b"\\",
    b"\\303",
    b"\\x4",
    b"\\q",
    b'\\"',
    b'"',
    b".",
]
_CONTENT: dict[str, st.SearchStrategy[bytes]] = {
    "a.safetensors": st.binary(max_size=64)
    | st.builds(
        _framed,
        st.dictionaries(st.text(max_size=6), _tensor | _json, max_size=4) | _json,
        st.integers(-4, 4),
        st.binary(max_size=24),
    ),
    "m.pt": st.binary(max_size=64) | _spliced(_small_zip()),
    "x.keras": st.binary(max_size=64) | _spliced(_small_zip()),
    "model.safetensors.index.json": st.binary(max_size=64)
    | st.builds(
        lambda d: json.dumps(d).encode(), st.fixed_dictionaries({"weight_map": _json}) | _json
    ),
    "checkpoint": st.binary(max_size=64)
    | st.lists(
        st.builds(
            lambda key, value: key + b": " + value + b"\n",
            st.sampled_from([b"model_checkpoint_path", b"all_model_checkpoint_paths", b"x"]),
            st.builds(
                lambda quote, body: quote + body + quote,
                st.sampled_from([b'"', b"'", b""]),
                st.lists(st.sampled_from(_TEXT_PROTO_PIECES), max_size=6).map(b"".join),
            ),
        ),
        max_size=4,
    ).map(b"".join),
}
_COMPANIONS = {"model.safetensors.index.json": "config.json", "checkpoint": "ckpt-1.index"}


@pytest.mark.parametrize("name", sorted(_CONTENT))
@settings(max_examples=examples(200), deadline=None)
@given(data=st.data())
def test_arbitrary_content_never_raises(
    tmp_path_factory: pytest.TempPathFactory, name: str, data: st.DataObject
) -> None:
    """Whatever bytes training code writes, checking gives None or a reason, never an error."""
    unit = tmp_path_factory.mktemp("fuzz")
    if name in _COMPANIONS:
        (unit / _COMPANIONS[name]).write_bytes(b"{}")
    (unit / name).write_bytes(data.draw(_CONTENT[name]))
    sizes = listing(unit)
    fmt = detect_format(sizes)
    assert fmt != "unknown"
    result = complete(str(unit), fmt, sizes)
    assert result is None or (isinstance(result, str) and "\n" not in result)


# --- long checks are progress, bounded by the unit's budget ------------------------------


@pytest.mark.parametrize("name", ["m.safetensors", "w.pt"])
def test_a_long_check_stops_at_the_inspection_budget(tmp_path: Path, name: str) -> None:
    """Scanning a 3 MiB safetensors header or zip directory reports progress as it reads, so a
    check running past its unit's inspection budget ends with OverBudget there."""
    if name.endswith(".safetensors"):
        header = b"{" + b'"__metadata__":{"k":"' + b"v" * (3 << 20) + b'"}}'
        (tmp_path / name).write_bytes(struct.pack("<Q", len(header)) + header)
    else:
        entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, *[0] * 14)
        end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 70_000 * 46, 4, 0)
        (tmp_path / name).write_bytes(b"PK\x03\x04" + entry * 70_000 + end)
    assert check(tmp_path) is None
    heartbeat = Heartbeat("inspect-0", FakeClock())
    with heartbeat.job(budget=-1.0), pytest.raises(OverBudget):
        check(tmp_path)


def test_each_format_is_one_row_that_detects_checks_and_describes() -> None:
    """A format is one `Format` object: its name, model type, detection, completeness checks
    and describer; every format but `unknown` describes its models."""
    from modelwatch.formats import Format

    for name, row in FORMATS.items():
        assert isinstance(row, Format) and row.name == name
        assert row.model_type in ("Tensorflow", "ONNX", "Custom")
        assert (row.describe is None) == (name == "unknown")
    assert list(FORMATS)[-1] == "unknown"
