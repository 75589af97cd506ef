"""Bad input a hostile but realistic user gives (issue 9): each case ends in exactly one line
``kdforge: error: ...`` (exit status 2) naming the problem and the fix, and is refused before
anything is written or trained (the run folder does not even exist afterwards)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdforge.cli import main
from kdforge.config import load_config
from kdforge.errors import KDForgeError


def write_config(tmp_path: Path, tree: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def run_cli(capsys, tmp_path, tree, *sets: str, command: str = "distill") -> tuple[int, str]:
    """``kdforge COMMAND job.yaml --set ...`` in-process: the exit code and the one error line. Any
    exception other than a KDForgeError propagates (a traceback fails the test)."""
    args = [command, str(write_config(tmp_path, tree))]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdforge: error:")]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return code, lines[0]


def copy_tree(tree: dict) -> dict:
    return json.loads(json.dumps(tree))


def assert_refused(capsys, tmp_path, tree, *sets, words, command="distill"):
    code, line = run_cli(capsys, tmp_path, tree, *sets, command=command)
    assert code == 2
    for word in [words] if isinstance(words, str) else words:
        assert word in line, line
    return line


def nothing_written(tree: dict) -> bool:
    return not Path(tree["output_dir"]).exists()


# ---------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("override, words", [
    ("train.lr=inf", "`train.lr` is inf"),
    ("train.lr=.nan", "`train.lr` is nan"),
    ("train.warmup_ratio=-.inf", "`train.warmup_ratio` is -inf"),
    ("objectives.1.temperature=inf", "`objectives.1.temperature` is inf"),
    ("objectives.1.temperature=1e999", "`objectives.1.temperature` is inf"),  # overflows to inf
    ("objectives.0.weight=nan", "`objectives.0.weight` is nan"),
    ("objectives.0.weight={schedule: linear, start: 1.0, end: -.inf}", "`objectives.0.weight.end` is -inf"),
    ("objectives.1.temperature={schedule: step, values: [4, .nan], milestones: [0.5]}",
     "`objectives.1.temperature.values.1` is nan"),
    ("teacher.finetune.lr=inf", "`teacher.finetune.lr` is inf"),
])
def test_non_finite_numbers_are_refused_naming_the_key(capsys, tmp_path, job_tree, override, words):
    line = assert_refused(capsys, tmp_path, job_tree, override, words=[words, "finite"])
    assert "--set" in line  # says how to fix it
    assert nothing_written(job_tree)


def test_non_finite_numbers_spelled_as_strings_in_the_file(tmp_path, job_tree):
    """YAML 1.1 reads ``inf`` and ``-Infinity`` as strings; pydantic and the objectives would turn
    them into floats, so they are refused too. Text that merely looks like one stays text."""
    tree = copy_tree(job_tree)
    tree["train"]["lr"] = "inf"
    with pytest.raises(KDForgeError, match="`train.lr`.*finite"):
        load_config(write_config(tmp_path, tree))
    tree = copy_tree(job_tree)
    tree["objectives"][1]["temperature"] = "-Infinity"
    with pytest.raises(KDForgeError, match="`objectives.1.temperature` is -Infinity"):
        load_config(write_config(tmp_path, tree))
    tree = copy_tree(job_tree)
    tree["stages"] = [{"name": "one", "objectives": [{"name": "ce", "weight": float("nan")}]}]
    with pytest.raises(KDForgeError, match="`stages.0.objectives.0.weight` is nan"):
        load_config(write_config(tmp_path, tree))
    tree = copy_tree(job_tree)
    tree["task"]["label_names"] = ["inf", "nan"]  # labels are text: allowed
    assert load_config(write_config(tmp_path, tree)).task.label_names == ["inf", "nan"]


def test_non_finite_objective_parameters_from_the_api():
    from kdforge.api import build_loss

    with pytest.raises(KDForgeError, match="`objectives.0.temperature` is inf"):
        build_loss([{"name": "hinton_kd", "temperature": float("inf")}])
    with pytest.raises(KDForgeError, match="objectives.0: `weight.float`: Input should be a finite number"):
        build_loss([{"name": "ce", "weight": float("nan")}])


# ---------------------------------------------------------------------------- negative weights


@pytest.mark.parametrize("weight, shown", [
    (-0.5, "-0.5"),
    ({"schedule": "linear", "start": 1.0, "end": -1.0}, "-1"),
    ({"schedule": "step", "values": [1.0, -2.0], "milestones": [0.5]}, "-2"),
    ({"schedule": "constant", "value": -3}, "-3"),
])
def test_negative_weights_are_refused(weight, shown):
    from kdforge.config import ObjectiveConfig
    from kdforge.objectives.composite import WeightedLoss

    with pytest.raises(KDForgeError) as err:
        WeightedLoss.from_config([ObjectiveConfig(name="ce"), ObjectiveConfig(name="ce", weight=weight)])
    assert f"`objectives.1.weight` is {shown}" in str(err.value)
    assert "'ce' does not allow a negative weight" in str(err.value)


def test_a_term_that_documents_negative_weights_accepts_them(monkeypatch):
    from kdforge.config import ObjectiveConfig
    from kdforge.objectives.base import OBJECTIVES, Objective, Progress
    from kdforge.objectives.composite import WeightedLoss

    assert Objective.allows_negative_weight is False
    monkeypatch.setattr(OBJECTIVES.get("ce"), "allows_negative_weight", True)
    loss = WeightedLoss.from_config([ObjectiveConfig(name="ce", weight=-0.5)])
    assert loss.weights[0](Progress()) == -0.5


def test_negative_weight_is_refused_by_the_cli_before_anything_is_written(capsys, tmp_path, job_tree):
    assert_refused(capsys, tmp_path, job_tree, "objectives.1.weight=-0.5",
                   words="`objectives.1.weight` is -0.5: objective 'hinton_kd' does not allow a negative weight")
    assert nothing_written(job_tree)


# ---------------------------------------------------------------------------- malformed input


def test_malformed_set_value(capsys, tmp_path, job_tree):
    line = assert_refused(capsys, tmp_path, job_tree, "train.lr=[1,", words=["--set train.lr=[1,", "not valid YAML"])
    assert "quote" in line


def test_yaml_tag_in_a_set_value_is_refused_and_never_run(capsys, tmp_path, job_tree):
    marker = tmp_path / "pwned"
    assert_refused(capsys, tmp_path, job_tree, f"train.lr=!!python/object/apply:os.system ['touch {marker}']",
                   words="YAML tags (!!...) are not allowed")
    assert_refused(capsys, tmp_path, job_tree, "train.lr=!!python/object:os.system ls", words="YAML tags")
    assert not marker.exists()


def test_non_utf8_config_file(capsys, tmp_path, job_tree):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(job_tree).encode() + "# caf\u00e9 au lait\n".encode("latin-1"))
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not UTF-8 text (byte 0xe9" in err and "save the config as UTF-8" in err


def test_empty_latency_batch_sizes_is_a_config_error(capsys, tmp_path, job_tree):
    assert_refused(capsys, tmp_path, job_tree, "eval.latency_batch_sizes=[]",
                   words="`eval.latency_batch_sizes`: List should have at least 1 item")
    assert nothing_written(job_tree)


# ---------------------------------------------------------------------------- student.config


@pytest.mark.parametrize("override, words", [
    ("student.config.num_hidden_layers=abc", "`student.config.num_hidden_layers` is 'abc' but BertConfig."
     "num_hidden_layers takes int values"),
    ("student.config.hidden_size=16.5", "`student.config.hidden_size` is 16.5"),
    ("student.config.num_hidden_layers=true", "`student.config.num_hidden_layers` is True"),
    ("student.config.hidden_size=33", "student.config is not a valid model"),  # 33 is not a multiple of 2 heads
])
def test_student_config_values_of_the_wrong_kind(capsys, tmp_path, job_tree, override, words):
    tree = dict(copy_tree(job_tree), student={"config": {"num_hidden_layers": 1, "hidden_size": 16}})
    assert_refused(capsys, tmp_path, tree, override, words=words)
    assert nothing_written(tree)  # refused before the teacher's fine-tuning


def test_student_from_config_checks_kinds(tokenizer_dir):
    from transformers import AutoTokenizer

    from kdforge.models.student import student_from_config
    from tests.helpers import tiny_bert

    teacher = tiny_bert(len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    with pytest.raises(KDForgeError, match="`student.config.num_hidden_layers` is 'abc'"):
        student_from_config(teacher, {"num_hidden_layers": "abc"})
    with pytest.raises(KDForgeError, match="`student.config.hidden_dropout_prob` is 'x'"):
        student_from_config(teacher, {"hidden_dropout_prob": "x"})
    student = student_from_config(teacher, {"num_hidden_layers": 1, "hidden_dropout_prob": 0})  # int for float: ok
    assert student.config.num_hidden_layers == 1 and student.config.hidden_dropout_prob == 0


# ---------------------------------------------------------------------------- max_length


def test_max_length_above_the_position_embeddings(capsys, tmp_path, job_tree):
    """The tiny teacher embeds 128 positions (tests/helpers.py)."""
    assert_refused(capsys, tmp_path, job_tree, "task.max_length=129",
                   words=["`task.max_length` is 129 but teacher.model", "position embeddings for 128 tokens",
                          "set task.max_length to 128 or less"])
    assert_refused(capsys, tmp_path, job_tree, "eval.latency_seq_len=512", words="`eval.latency_seq_len` is 512")
    tree = dict(copy_tree(job_tree), student={"config": {"num_hidden_layers": 1, "max_position_embeddings": 8}})
    assert_refused(capsys, tmp_path, tree, words=["`task.max_length` is 16 but the student", "for 8 tokens"])
    assert nothing_written(job_tree)
    assert main(["distill", str(write_config(tmp_path, job_tree)), "--set", "task.max_length=128",
                 "--set", "train.max_steps=1", "--set", "train.epochs=1", "--set", "teacher.finetune.epochs=1",
                 "--set", "eval.latency_seq_len=128"]) == 0  # the limit itself is fine


def test_load_model_refuses_a_max_length_the_model_cannot_embed(tiny_teacher_dir, sentiment_dir):
    from kdforge.config import TaskConfig
    from kdforge.models.loading import load_model
    from kdforge.tasks.base import build_task

    task = build_task(TaskConfig(name="csv", train_file=str(sentiment_dir / "train.csv"),
                                 dev_file=str(sentiment_dir / "dev.csv"), max_length=200))
    with pytest.raises(KDForgeError, match="`task.max_length` is 200 but teacher.model .* for 128 tokens"):
        load_model(str(tiny_teacher_dir), task)


def test_position_limits_by_hand():
    """BERT: the table's rows; RoBERTa: rows - (padding_idx + 1) = 514 - 2; GPT-2: wpe rows;
    rotary Llama: no table, no limit."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, RobertaConfig, RobertaModel

    from kdforge.models.positions import position_limit
    from tests.helpers import tiny_llama

    small = dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    assert position_limit(BertModel(BertConfig(**small, max_position_embeddings=40))) == 40
    assert position_limit(RobertaModel(RobertaConfig(**small, max_position_embeddings=514, pad_token_id=1))) == 512
    assert position_limit(GPT2Model(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=64,
                                               bos_token_id=0, eos_token_id=0))) == 64
    assert position_limit(tiny_llama(50, 8)) is None


# ---------------------------------------------------------------------------- truncated weights


def truncated_copy(source: Path, target: Path, keep: float | int) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if isinstance(keep, int) else data[: int(len(data) * keep)])
    return weights


@pytest.mark.parametrize("keep", [0.5, 100, 4])  # cut in the data, in the header, before the header size
def test_truncated_teacher_weights(capsys, tmp_path, job_tree, tiny_teacher_dir, keep):
    weights = truncated_copy(tiny_teacher_dir, tmp_path / "teacher", keep)
    tree = dict(copy_tree(job_tree), teacher={"model": str(tmp_path / "teacher")})
    assert_refused(capsys, tmp_path, tree, words=[f"weights file {weights} is truncated", "download the model again"])
    assert nothing_written(tree)


def test_truncated_student_weights(capsys, tmp_path, job_tree, tiny_teacher_dir, sentiment_dir):
    weights = truncated_copy(tiny_teacher_dir, tmp_path / "student", 0.9)
    tree = dict(copy_tree(job_tree), student={"model": str(tmp_path / "student")})
    assert_refused(capsys, tmp_path, tree, words=f"weights file {weights} is truncated")
    assert nothing_written(tree)  # refused before the teacher's fine-tuning
    from kdforge.config import TaskConfig
    from kdforge.models.loading import load_model
    from kdforge.tasks.base import build_task

    task = build_task(TaskConfig(name="csv", train_file=str(sentiment_dir / "train.csv"),
                                 dev_file=str(sentiment_dir / "dev.csv"), max_length=16))
    with pytest.raises(KDForgeError, match="is truncated"):  # `kdforge eval` loads an exported student this way
        load_model(str(tmp_path / "student"), task, "student")


def test_safetensors_check_by_hand(tmp_path):
    from safetensors.torch import save_file

    from kdforge.models.integrity import safetensors_problem

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5)}, str(path))
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert len(data) == 8 + header + (12 + 5) * 4  # float32 tensors of 12 and 5 values
    assert safetensors_problem(path) is None
    path.write_bytes(data[:-1])
    assert safetensors_problem(path) == f"is truncated ({len(data) - 1} of {len(data)} bytes)"
    path.write_bytes(data[:8 + header // 2])
    assert "its header alone needs" in safetensors_problem(path)
    path.write_bytes(data[:8] + b"x" * header + data[8 + header:])
    assert "corrupt header" in safetensors_problem(path)


# ---------------------------------------------------------------------------- folders


def test_output_dir_that_is_a_file_or_unwritable(capsys, tmp_path, job_tree):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert_refused(capsys, tmp_path, job_tree, f"output_dir={afile}",
                   words=[f"{afile} (output_dir) is a file, not a folder", "point output_dir at a folder"])
    assert_refused(capsys, tmp_path, job_tree, f"output_dir={afile}/run",
                   words=f"lies inside {afile}, which is a file")
    assert afile.read_text() == "not a folder"
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (a folder even root cannot create files in)")
    assert_refused(capsys, tmp_path, job_tree, "output_dir=/proc/kdforge-run",
                   words=["cannot write in /proc for output_dir /proc/kdforge-run", "choose a folder"])


def test_kdforge_cache_pointing_at_a_file(capsys, tmp_path, job_tree, monkeypatch):
    from kdforge.paths import cache_dir

    afile = tmp_path / "cache-file"
    afile.write_text("")
    monkeypatch.setenv("KDFORGE_CACHE", str(afile))
    with pytest.raises(KDForgeError, match="KDFORGE_CACHE"):
        cache_dir()
    assert_refused(capsys, tmp_path, job_tree, words=f"{afile} (KDFORGE_CACHE) is a file, not a folder")
    assert nothing_written(job_tree)
    assert_refused(capsys, tmp_path, job_tree, f"teacher_cache.folder={afile}",
                   words="(teacher_cache.folder) is a file")
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "fine"))
    assert cache_dir() == tmp_path / "fine"


# ---------------------------------------------------------------------------- device and hub


def test_cuda_without_a_gpu_is_refused(capsys, tmp_path, job_tree, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_refused(capsys, tmp_path, job_tree, "train.device=cuda",
                   words=["`train.device` is cuda but no CUDA GPU is available", "auto or cpu"])
    assert_refused(capsys, tmp_path, job_tree, "train.device=cuda", command="finetune", words="`train.device`")
    tree = dict(copy_tree(job_tree), stages=[{"name": "one", "objectives": [{"name": "ce"}],
                                              "train": {"device": "cuda"}}])
    assert_refused(capsys, tmp_path, tree, words="`stages.0.train.device` is cuda")
    assert nothing_written(job_tree)


def test_unknown_hub_id_fails_fast_when_offline(capsys, tmp_path, job_tree, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tree = dict(copy_tree(job_tree), teacher={"model": "kdforge-tests/no-such-model"})
    start = time.monotonic()
    assert_refused(capsys, tmp_path, tree, words=["`teacher.model`: 'kdforge-tests/no-such-model' is not a local "
                                                 "folder", "the hub is offline (HF_HUB_OFFLINE is set)"])
    assert time.monotonic() - start < 5
    assert nothing_written(tree)


def test_unreachable_hub_is_one_line(capsys, tmp_path, job_tree, monkeypatch):
    from kdforge.models import hub

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=5.0: False)  # never touch the network in tests
    tree = dict(copy_tree(job_tree), student={"model": "kdforge-tests/no-such-student"})
    assert_refused(capsys, tmp_path, tree, words=["`student.model`: 'kdforge-tests/no-such-student'",
                                                 "cannot be reached"])


def test_cached_hub_model_loads_offline(tmp_path, tiny_teacher_dir, monkeypatch, sentiment_dir):
    """An id in the local HF cache (models--ORG--NAME/refs/main -> snapshots/REV/) loads offline."""
    from huggingface_hub import constants

    from kdforge.config import TaskConfig
    from kdforge.models.loading import load_model, resolve_model_source
    from kdforge.tasks.base import build_task

    repo = tmp_path / "hub" / "models--kdforge-tests--tiny"
    shutil.copytree(tiny_teacher_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_source("kdforge-tests/tiny") == str(repo / "snapshots" / "abc123")
    task = build_task(TaskConfig(name="csv", train_file=str(sentiment_dir / "train.csv"),
                                 dev_file=str(sentiment_dir / "dev.csv"), max_length=16))
    loaded = load_model("kdforge-tests/tiny", task, trained_head=True)
    assert loaded.model.config.num_hidden_layers == 4 and loaded.source == "kdforge-tests/tiny"


def test_a_package_named_by_the_config_is_located_not_imported(tmp_path, monkeypatch):
    """`package:NAME` must not run the package's code: a package whose import would leave a marker
    file is refused (it ships no weights folder) and the marker never appears."""
    import importlib

    from kdforge.models.loading import package_model_dir

    package = tmp_path / "site" / "booby_trap"
    package.mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\\n"
                                         "def get_model_path():\\n    return '/'\\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    with pytest.raises(KDForgeError, match="ships no model folder"):
        package_model_dir("booby-trap")
    assert not marker.exists()
    (package / "weights").mkdir()
    (package / "weights" / "config.json").write_text("{}")
    assert package_model_dir("booby-trap") == package / "weights"
    assert not marker.exists()
