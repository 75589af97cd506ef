"""Student architecture search candidates: sliced transformer students, parametric CIFAR ResNets and
the search space turning optuna samples into job overrides. Tiny random-init BERTs and ResNets only."""

from types import SimpleNamespace

import optuna
import pytest
import torch

from kdforge.config import StudentConfig, apply_overrides, validate_config
from kdforge.deploy.export import export_model
from kdforge.errors import KDForgeError
from kdforge.models.loading import LoadedModel, load_model
from kdforge.models.student import build_student, evenly_spaced_layers, student_sliced
from kdforge.models.vision_nets import build_vision_net
from kdforge.search.space import SearchSpace
from tests.helpers import tiny_bert

VOCAB = 100
TEXT_TASK = SimpleNamespace(config=SimpleNamespace(max_length=16), num_labels=2, modality="text")
IMAGE_TASK = SimpleNamespace(num_labels=10, in_channels=3, modality="image")


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (3, 12), generator=g),
            "attention_mask": torch.ones(3, 12, dtype=torch.long)}


# --------------------------------------------------------------------------- sliced students


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(6, 2) == [0, 5]
    assert evenly_spaced_layers(6, 1) == [5]
    assert evenly_spaced_layers(12, 4) == [0, 4, 7, 11]  # round(11/3)=4, round(22/3)=7
    assert evenly_spaced_layers(6, 3) == [0, 2, 5]  # round(2.5) = 2 (half to even)
    assert evenly_spaced_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(KDForgeError, match="cannot pick 7 student layers from a 6-layer teacher"):
        evenly_spaced_layers(6, 7)


def test_sliced_student_with_the_teachers_widths_is_the_teacher():
    teacher = tiny_bert(VOCAB, layers=4).eval()
    student = student_sliced(teacher, [0, 1, 2, 3], {"hidden_size": 32, "num_attention_heads": 2,
                                                      "intermediate_size": 64}).eval()
    with torch.no_grad():
        assert torch.equal(student(**inputs()).logits, teacher(**inputs()).logits)


def test_sliced_student_takes_the_leading_slice_of_every_teacher_tensor(kdlog):
    teacher = tiny_bert(VOCAB, layers=4).eval()
    student = student_sliced(teacher, [1, 3], {"hidden_size": 16, "num_attention_heads": 1,
                                               "intermediate_size": 24})
    t, s = teacher.bert, student.bert
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 16
    for s_i, t_i in [(0, 1), (1, 3)]:
        s_layer, t_layer = s.encoder.layer[s_i], t.encoder.layer[t_i]
        assert torch.equal(s_layer.attention.self.query.weight, t_layer.attention.self.query.weight[:16, :16])
        assert torch.equal(s_layer.attention.self.query.bias, t_layer.attention.self.query.bias[:16])
        assert torch.equal(s_layer.intermediate.dense.weight, t_layer.intermediate.dense.weight[:24, :16])
        assert torch.equal(s_layer.output.dense.weight, t_layer.output.dense.weight[:16, :24])
        assert torch.equal(s_layer.output.LayerNorm.weight, t_layer.output.LayerNorm.weight[:16])
    assert s.embeddings.word_embeddings.weight.shape == (VOCAB, 16)
    assert torch.equal(s.embeddings.word_embeddings.weight, t.embeddings.word_embeddings.weight[:, :16])
    assert torch.equal(s.embeddings.LayerNorm.bias, t.embeddings.LayerNorm.bias[:16])
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, :16])
    # every tensor of the student, whatever its name, is the teacher's leading slice
    t_state, layer_of = teacher.state_dict(), {"bert.encoder.layer.0.": "bert.encoder.layer.1.",
                                               "bert.encoder.layer.1.": "bert.encoder.layer.3."}
    for key, value in student.state_dict().items():
        prefix = next((p for p in layer_of if key.startswith(p)), None)
        source = layer_of[prefix] + key.removeprefix(prefix) if prefix else key
        assert torch.equal(value, t_state[source][tuple(slice(0, d) for d in value.shape)]), key
    assert not [r for r in kdlog if "fresh init" in r.getMessage()]
    with torch.no_grad():
        assert student.eval()(**inputs()).logits.shape == (3, 2)


def test_sliced_student_wider_than_the_teacher_keeps_fresh_tensors(kdlog):
    teacher = tiny_bert(VOCAB, layers=2)
    student = student_sliced(teacher, [0], {"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 32})
    messages = [r.getMessage() for r in kdlog if "fresh init" in r.getMessage()]
    assert len(messages) == 1 and "bert.embeddings.word_embeddings.weight" in messages[0]
    layer = student.bert.encoder.layer[0]  # FFN width 32 <= 64: sliced; its input width 48 > 32: fresh
    assert torch.equal(layer.intermediate.dense.bias, teacher.bert.encoder.layer[0].intermediate.dense.bias[:32])


@pytest.mark.parametrize(("overrides", "words"), [
    ({"hidden_size": 250, "num_attention_heads": 8}, "student.config"),
    ({"hidden_size": 16, "num_hidden_layers": 3}, "student.config.num_hidden_layers is 3"),
    ({"hidden_sz": 16}, "student.config.hidden_sz"),
])
def test_sliced_student_bad_config_is_one_line(overrides, words):
    with pytest.raises(KDForgeError, match=words) as err:
        student_sliced(tiny_bert(VOCAB, layers=4), [0, 2], overrides)
    assert "\n" not in str(err.value)


def test_student_config_sources():
    assert StudentConfig(layers=[0], config={"hidden_size": 16}).config == {"hidden_size": 16}
    assert StudentConfig(model="x", layers=[0]).layers == [0]  # that model's layers
    for bad in ({"model": "x", "config": {}}, {"model": "x", "layers": [0], "config": {}}, {}):
        with pytest.raises(ValueError, match="exactly one of student.layers"):
            StudentConfig(**bad)


def test_build_student_dispatches_to_the_sliced_student():
    teacher = LoadedModel(tiny_bert(VOCAB, layers=4).eval(), None, "tiny")
    student = build_student(StudentConfig(layers=[3], config={"hidden_size": 16, "num_attention_heads": 1}),
                            teacher, TEXT_TASK).model
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 64
    assert torch.equal(student.bert.encoder.layer[0].attention.output.dense.weight,
                       teacher.model.bert.encoder.layer[3].attention.output.dense.weight[:16, :16])


# --------------------------------------------------------------------------- parametric ResNets


def test_parametric_resnet_names():
    net = build_vision_net("resnet14_w32", 10)
    assert net.stem[0].out_channels == 32 and len(net.layer1) == 2 and net.layer3[0].conv1.out_channels == 128
    assert net.fc.in_features == 128
    same = {k: v.shape for k, v in build_vision_net("resnet20_w16", 10).state_dict().items()}
    assert same == {k: v.shape for k, v in build_vision_net("resnet20", 10).state_dict().items()}
    with pytest.raises(KDForgeError, match=r"'resnet9_w8' \(config key `student.model`\).*6n \+ 2"):
        build_vision_net("resnet9_w8", 10, config_key="student.model")
    with pytest.raises(KDForgeError, match="unknown vision net 'resnet9'.*resnet\\{D\\}_w\\{W\\}"):
        build_vision_net("resnet9", 10)


def test_parametric_resnet_student_exports_and_reloads(tmp_path):
    teacher = LoadedModel(build_vision_net("resnet8", 10), None, "vision:resnet8")
    student = build_student(StudentConfig(model="vision:resnet8_w4"), teacher, IMAGE_TASK)
    with torch.no_grad():  # move the BatchNorm statistics away from their init, so they must round-trip
        student.model.train()(torch.randn(8, 3, 16, 16))
    folder = export_model(student, tmp_path / "export")
    reloaded = load_model(str(folder), IMAGE_TASK)
    assert reloaded.source == "vision:resnet8_w4"
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded.model.eval()(x), student.model.eval()(x))


# --------------------------------------------------------------------------- the search space


def tiny_job(**extra) -> dict:
    return {"task": {"name": "glue/sst2", "max_length": 16}, "teacher": {"model": "tiny"},
            "student": {"layers": [0]}, **extra}


def test_space_defaults_size_and_dimensions():
    space = SearchSpace.from_dict(None, "transformer")
    assert list(space.dimensions()) == ["layers", "hidden_size", "head_dim", "intermediate_size",
                                        "temperature", "kd_weight"]
    assert space.size() == 4 * 5 * 2 * 3 * 4 * 3
    resnet = SearchSpace.from_dict({"width": [4, 8], "temperature": [2.0]}, "resnet")
    assert resnet.dimensions() == {"blocks": [1, 2, 3], "width": [4, 8], "temperature": [2.0],
                                   "kd_weight": [0.25, 0.5, 0.75]}
    assert resnet.size() == 3 * 2 * 1 * 3


@pytest.mark.parametrize(("space", "kind", "words"), [
    ({"hidden_size": [128, 96], "head_dim": [64]}, "transformer", "search.space.head_dim: 64 does not divide"),
    ({"blocks": [1]}, "transformer", "search.space.blocks is not a dimension of a transformer search"),
    ({"layers": [0, 2]}, "transformer", "search.space.layers: 0 is not a valid choice"),
    ({"kd_weight": [1.5]}, "resnet", "search.space.kd_weight: 1.5"),
    ({"width": [8, 8]}, "resnet", "search.space.width .* repeats"),
    ({"width": 8}, "resnet", "search.space.width must be a list"),
    ({"depth": [8]}, "resnet", "search.space.depth is not a dimension"),
    ({"temperature": []}, "resnet", "search.space.temperature: search temperature and kd_weight together"),
    ({}, "mlp", "search.kind"),
])
def test_bad_spaces_are_one_line(space, kind, words):
    with pytest.raises(KDForgeError, match=words):
        SearchSpace.from_dict(space, kind)


def test_random_sampler_stays_inside_the_choices():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.from_dict({"hidden_act": ["gelu", "relu"]}, "transformer")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {name: set() for name in space.dimensions()}
    for _ in range(40):
        trial = study.ask()
        params = space.sample(trial)
        study.tell(trial, 0.0)
        assert trial.params == params and set(params) == set(space.dimensions())
        for name, value in params.items():
            assert value in space.dimensions()[name]
            seen[name].add(value)
    assert all(len(values) > 1 for values in seen.values())  # a real random search, not one fixed candidate


def test_transformer_candidate_builds_a_sliced_student_of_evenly_spaced_layers():
    teacher = tiny_bert(VOCAB, layers=6, hidden=64).eval()  # 2 heads of 32
    space = SearchSpace.from_dict({"layers": [2], "hidden_size": [32], "head_dim": [16], "intermediate_size": [48],
                                   "hidden_act": ["relu"], "temperature": [4.0], "kd_weight": [0.75]},
                                  "transformer")
    params = {"layers": 2, "hidden_size": 32, "head_dim": 16, "intermediate_size": 48, "hidden_act": "relu",
              "temperature": 4.0, "kd_weight": 0.75}
    overrides = space.overrides(params, teacher.config)
    assert overrides["student"] == {"layers": [0, 5], "config": {"hidden_size": 32, "num_attention_heads": 2,
                                                                 "intermediate_size": 48, "hidden_act": "relu"}}
    config = validate_config(apply_overrides(tiny_job(), overrides))
    assert [(o.name, o.weight, o.params) for o in config.objectives] == [
        ("ce", 0.25, {}), ("hinton_kd", 0.75, {"temperature": 4.0})]  # AutoKD: (1 - a) CE + a KD_T
    student = build_student(config.student, LoadedModel(teacher, None, "tiny"), TEXT_TASK).model
    assert (student.config.num_hidden_layers, student.config.hidden_act) == (2, "relu")
    assert torch.equal(student.bert.encoder.layer[1].attention.self.key.weight,
                       teacher.bert.encoder.layer[5].attention.self.key.weight[:32, :32])
    with torch.no_grad():
        assert student.eval()(**inputs()).logits.shape == (3, 2)


def test_transformer_candidate_partial_space_uses_the_teachers_head_size():
    teacher = tiny_bert(VOCAB, layers=4, hidden=64)  # head size 32
    space = SearchSpace(layers=[1, 2], hidden_size=[32, 64])
    assert space.overrides({"layers": 1, "hidden_size": 32}, teacher.config)["student"] == {
        "layers": [3], "config": {"hidden_size": 32, "num_attention_heads": 1}}
    assert "objectives" not in space.overrides({"layers": 1, "hidden_size": 32}, teacher.config)
    with pytest.raises(KDForgeError, match="search.space.layers: 5 layers but the teacher has 4"):
        space.overrides({"layers": 5}, n_teacher_layers=4)
    with pytest.raises(KDForgeError, match="search.space.hidden_size: 48 is not a multiple of the head size 32"):
        space.overrides({"hidden_size": 48}, teacher.config)


def test_resnet_candidate_builds_a_parametric_resnet_student():
    space = SearchSpace.from_dict({"blocks": [2], "width": [4]}, "resnet")
    overrides = space.overrides({"blocks": 2, "width": 4, "temperature": 2.0, "kd_weight": 0.5})
    assert overrides["student"] == {"model": "vision:resnet14_w4"}
    tree = {"task": {"name": "cifar10"}, "teacher": {"model": "vision:resnet8"}, "student": {"model": "vision:x"}}
    config = validate_config(apply_overrides(tree, overrides))
    teacher = LoadedModel(build_vision_net("resnet8", 10), None, "vision:resnet8")
    student = build_student(config.student, teacher, IMAGE_TASK).model
    assert len(student.layer2) == 2 and student.fc.in_features == 16
    assert student(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_llama_candidate_sets_head_dim_and_key_value_heads():
    from tests.helpers import tiny_llama

    teacher = tiny_llama(VOCAB, hidden=32, layers=4)  # 2 heads of 16, 2 key/value heads
    student_spec = SearchSpace(layers=[2], hidden_size=[16], head_dim=[8]).overrides(
        {"layers": 2, "hidden_size": 16, "head_dim": 8}, teacher.config)["student"]
    assert student_spec == {"layers": [0, 3], "config": {"hidden_size": 16, "num_attention_heads": 2,
                                                         "head_dim": 8, "num_key_value_heads": 2}}
    student = student_sliced(teacher, student_spec["layers"], student_spec["config"])
    assert torch.equal(student.model.layers[1].self_attn.v_proj.weight,
                       teacher.model.layers[3].self_attn.v_proj.weight[:16, :16])
    with torch.no_grad():
        assert student(input_ids=inputs()["input_ids"]).logits.shape == (3, 12, VOCAB)
