"""What the exporters refuse, named in one line."""

from __future__ import annotations

import pytest
import torch
from export_util import ranking_config, run_cli
from model_util import seeded_model

from grinfer.export.support import UnsupportedFeature, check_exportable


def test_dynamic_int8_quantisation_is_named():
    model = torch.ao.quantization.quantize_dynamic(seeded_model(ranking_config()), {torch.nn.Linear}, torch.qint8)
    with pytest.raises(UnsupportedFeature, match=r"module genre_proj \(torch\.ao\.nn\.quantized\.dynamic"):
        check_exportable(model)


def test_a_renormalising_embedding_is_named():
    model = seeded_model(ranking_config())
    model.item_emb.max_norm = 1.0
    with pytest.raises(UnsupportedFeature, match=r"module item_emb: Embedding\(max_norm=1.0\)"):
        check_exportable(model)


def test_integer_weights_are_named():
    model = seeded_model(ranking_config())
    model.register_buffer("lookup", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(UnsupportedFeature, match=r"tensor lookup has dtype torch\.int64"):
        check_exportable(model)


def test_the_shipped_models_are_exportable():
    check_exportable(seeded_model(ranking_config()))


def test_cli_errors_are_one_line_with_exit_2(tmp_path, model_dir):
    for args, words in [(["onnx", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "m.onnx")],
                         "no checkpoint"),
                        (["onnx", "--model", str(model_dir), "--out", str(tmp_path / "m.pt2")], "is a .onnx file"),
                        (["aoti", "--model", str(model_dir), "--out", str(tmp_path / "m.onnx")], "is a .pt2 file")]:
        code, output = run_cli("export", *args)
        assert code == 2 and words in output and output.strip().count("\n") == 0, output
