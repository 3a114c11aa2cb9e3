"""The int8 writer on small hand-made graphs: what it quantizes, how, and what it must leave alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from clipsearch.text_int8 import FLOAT_BLOCKS, write_int8
from clipsearch.text_onnx import WeightsFile


def graph_file(folder: Path, nodes: list, weights: dict[str, np.ndarray]) -> Path:
    """A float32 graph x -> y with its weights outside the protobuf, written as text_onnx writes them."""
    with WeightsFile(folder / "float.data") as out:
        initializers = [out.put(name, array) for name, array in weights.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
                              initializer=initializers)
    path = folder / "float.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def block(i: int) -> str:
    return f"/transformer/resblocks.{i}/mlp/c_fc/MatMul"


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weights_become_symmetric_int8_and_the_twin_computes_the_same(tmp_path):
    rng = np.random.default_rng(0)
    weights = {f"W{i}": rng.standard_normal((16, 16)).astype(np.float32) / 4 for i in range(4)}
    names = [block(i) for i in range(FLOAT_BLOCKS)] + [block(FLOAT_BLOCKS), "/MatMul"]  # last: the projection
    chain = ["x", "a", "b", "c", "y"]
    nodes = [helper.make_node("MatMul", [chain[i], f"W{i}"], [chain[i + 1]], name=names[i]) for i in range(4)]
    source = graph_file(tmp_path, nodes, weights)
    twin = tmp_path / "int8.onnx"
    assert write_int8(source, twin, tmp_path / "int8.data", {"clipsearch.weights": "int8"}) == 1
    proto = onnx.load(str(twin), load_external_data=False)
    assert [n.op_type for n in proto.graph.node] == ["MatMul"] * FLOAT_BLOCKS + ["DynamicQuantizeMatMul", "MatMul"]
    assert {p.key: p.value for p in proto.metadata_props} == {"clipsearch.weights": "int8"}
    onnx.load_external_data_for_model(proto, str(tmp_path))
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    original = weights[f"W{FLOAT_BLOCKS}"]
    q, scale = stored[f"W{FLOAT_BLOCKS}.int8"], stored[f"W{FLOAT_BLOCKS}.scale"]
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and stored[f"W{FLOAT_BLOCKS}.zero"] == 0
    assert np.abs(q * scale - original).max() <= scale / 2 + 1e-7
    assert f"W{FLOAT_BLOCKS}" not in stored and all(np.array_equal(stored[f"W{i}"], weights[f"W{i}"])
                                                    for i in (*range(FLOAT_BLOCKS), 3))
    x = rng.standard_normal((5, 16)).astype(np.float32)
    exact, got = run(source, x), run(twin, x)
    assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()


def test_a_weight_shared_with_a_float_reader_stays_float(tmp_path):
    weights = {"W": np.eye(16, dtype=np.float32), "V": np.eye(16, dtype=np.float32) * 2}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name=block(FLOAT_BLOCKS + 1)),
             helper.make_node("MatMul", ["a", "W"], ["b"], name=block(0)),  # kept float: W must stay
             helper.make_node("MatMul", ["b", "V"], ["y"], name=block(FLOAT_BLOCKS + 2))]
    source = graph_file(tmp_path, nodes, weights)
    twin = tmp_path / "int8.onnx"
    assert write_int8(source, twin, tmp_path / "int8.data", {}) == 1
    assert [n.op_type for n in onnx.load(str(twin), load_external_data=False).graph.node] == \
        ["MatMul", "MatMul", "DynamicQuantizeMatMul"]
    x = np.arange(32, dtype=np.float32).reshape(2, 16) / 10
    assert np.allclose(run(twin, x), 2 * x, atol=0.05)


def test_nothing_to_quantize_writes_nothing(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name=block(0))]
    source = graph_file(tmp_path, nodes, {"W": np.eye(16, dtype=np.float32)})
    assert write_int8(source, tmp_path / "int8.onnx", tmp_path / "int8.data", {}) == 0
    assert not (tmp_path / "int8.onnx").exists() and not (tmp_path / "int8.data").exists()
