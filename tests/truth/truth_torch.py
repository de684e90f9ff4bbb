"""torch.save files, DCP checkpoints, ONNX, safetensors and Hugging Face models, written by
the real libraries, with what those libraries report about them."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 10, bias=False)
        self.norm = torch.nn.LayerNorm(3)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_facts(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {name: [_dtype(t.dtype), list(t.shape)] for name, t in state.items()}


def pytorch(unit: str) -> dict[str, Any]:
    torch.manual_seed(0)
    net = Net()
    net.head.weight = torch.nn.Parameter(torch.randn(10, 3))
    state = net.state_dict()
    state["half"] = torch.ones(2, 5, dtype=torch.float16)
    state["bf16"] = torch.ones(7, dtype=torch.bfloat16)
    state["u16"] = torch.ones(3, dtype=torch.uint16)  # rebuilt with _rebuild_tensor_v3
    state["view"] = state["fc.weight"][1:]  # a view: its storage is already counted
    torch.save(state, os.path.join(unit, "model.pt"))
    unique = sum(t.numel() for k, t in state.items() if k != "view")
    return {
        "tensors": state_facts(state),
        "parameter_count": unique,
        "module_parameters": sum(p.numel() for p in net.parameters()),
    }


def training_checkpoint(unit: str) -> dict[str, Any]:
    """A Lightning-like checkpoint: model state next to optimizer state of the same shapes."""
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters())
    loss = net.head(net.norm(net.fc(net.embed(torch.tensor([1, 2]))))).sum()
    loss.backward()
    optimizer.step()
    checkpoint = {
        "epoch": 3,
        "state_dict": net.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
    }
    torch.save(checkpoint, os.path.join(unit, "last.ckpt"))
    return {"parameter_count": sum(p.numel() for p in net.parameters())}


def dcp(unit: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dist_cp

    torch.manual_seed(0)
    state = Net().state_dict()
    dist_cp.save(state, checkpoint_id=unit, no_dist=True)
    return {
        "tensors": state_facts(state),
        "parameter_count": sum(t.numel() for t in state.values()),
    }


def onnx_model(unit: str, *, external: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(np.zeros(3, np.float16), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["xw"]),
            helper.make_node("Cast", ["bias"], ["bias32"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Add", ["xw", "bias32"], ["y"]),
        ],
        "affine",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
        [weight, bias],
    )
    model = helper.make_model(
        graph,
        producer_name="truth",
        producer_version="1.0",
        opset_imports=[helper.make_opsetid("", 17)],
    )
    helper.set_model_props(model, {"author": "tests", "license": "none"})
    onnx.checker.check_model(model)
    path = os.path.join(unit, "model.onnx")
    onnx.save_model(
        model,
        path,
        save_as_external_data=external,
        size_threshold=0,
        all_tensors_to_one_file=True,
        location="weights.bin",
    )
    loaded = onnx.load(path, load_external_data=False)
    initializers = {i.name for i in loaded.graph.initializer}
    return {
        "ir_version": loaded.ir_version,
        "producer_name": loaded.producer_name,
        "producer_version": loaded.producer_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in loaded.opset_import},
        "metadata_props": {p.key: p.value for p in loaded.metadata_props},
        "inputs": [_value_info(v) for v in loaded.graph.input if v.name not in initializers],
        "outputs": [_value_info(v) for v in loaded.graph.output],
        "parameter_count": int(sum(np.prod(i.dims) for i in loaded.graph.initializer)),
    }


def _value_info(value: Any) -> list[Any]:
    tensor = value.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
    return [value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, dims]


def torch_onnx(unit: str) -> dict[str, Any]:
    """torch's own ONNX exporter (the TorchScript one; it needs no onnxscript)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    path = os.path.join(unit, "model.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(1, 5),),
        path,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
        dynamo=False,
    )
    loaded = onnx.load(path)
    return {
        "producer_name": loaded.producer_name,
        "parameter_count": int(sum(np.prod(i.dims) for i in loaded.graph.initializer)),
        "module_parameters": sum(p.numel() for p in model.parameters()),
    }


def safetensors_file(unit: str) -> dict[str, Any]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in Net().state_dict().items()}
    state["mask"] = torch.ones(2, 2, dtype=torch.bool)
    save_file(
        state, os.path.join(unit, "model.safetensors"), metadata={"format": "pt", "step": "42"}
    )
    return {
        "tensors": state_facts(state),
        "parameter_count": sum(t.numel() for t in state.values()),
    }


def huggingface(unit: str) -> dict[str, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(unit, max_shard_size="40KB")
    saved = model.config.to_dict()
    return {
        "num_parameters": model.num_parameters(),
        "architectures": saved.get("architectures"),
        "model_type": saved.get("model_type"),
        "dtype": str(saved.get("dtype") or saved.get("torch_dtype")),
        "shards": len([n for n in os.listdir(unit) if n.endswith(".safetensors")]),
    }


def hostile_pickle(unit: str) -> dict[str, Any]:
    """A torch.save-layout zip whose pickle calls os.system (it must never run)."""
    import pickle

    marker = os.path.join(unit, "..", "hostile-ran")

    class Exploit:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    payload = {"fc.weight": torch.ones(2, 3), "boom": Exploit()}
    torch.save(payload, os.path.join(unit, "model.pt"), pickle_module=pickle)
    return {"marker": os.path.abspath(marker), "global": f"{os.system.__module__}.system"}


def write_all(out: str, unit: Callable[[str], str]) -> dict[str, Any]:
    return {
        "pytorch": pytorch(unit("pytorch")),
        "pytorch_training": training_checkpoint(unit("pytorch_training")),
        "torch_dcp": dcp(unit("torch_dcp")),
        "onnx": onnx_model(unit("onnx"), external=False),
        "onnx_external": onnx_model(unit("onnx_external"), external=True),
        "onnx_torch": torch_onnx(unit("onnx_torch")),
        "safetensors": safetensors_file(unit("safetensors")),
        "huggingface": huggingface(unit("huggingface")),
        "pytorch_hostile": hostile_pickle(unit("pytorch_hostile")),
    }
