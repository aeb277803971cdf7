"""onnxruntime sessions: provider fallback to CPU with a log line saying what ran."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edge.onnx_session import OrtOptions, make_session

onnx = pytest.importorskip("onnx")


def _tiny_model(path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_missing_provider_falls_back_to_cpu(tmp_path, caplog):
    p = _tiny_model(tmp_path / "m.onnx")
    with caplog.at_level(logging.INFO, logger="edge.onnx"):
        sess = make_session(p, OrtOptions(providers=("TensorrtExecutionProvider", "CUDAExecutionProvider")))
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert any("using ['CPUExecutionProvider']" in r.getMessage() for r in caplog.records)
    assert any("providers ['CPUExecutionProvider']" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0], [0.0, 2.0])


def test_default_providers_run_on_this_machine(tmp_path):
    sess = make_session(_tiny_model(tmp_path / "m.onnx"))
    assert "CPUExecutionProvider" in sess.get_providers()
