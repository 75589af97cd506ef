"""Typed job configuration (YAML -> pydantic), with ``--set key=value`` overrides.

Every section forbids unknown keys, so a typo such as ``train.lrr`` fails with one line naming
the key instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from kdforge.errors import KDForgeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # "inf"/"nan" strings are errors too


class CorpusConfig(Strict):
    """Unlabeled text for general-distillation stages: sentences of GLUE training files and/or
    plain-text files (one passage per line)."""

    glue: list[Literal["sst2", "mrpc", "rte", "cola", "stsb"]] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)
    limit: PositiveInt | None = Field(None, description="a fixed random sample of this many passages")
    sample_seed: int = 0
    max_length: PositiveInt = 128

    @model_validator(mode="after")
    def _some_text(self) -> CorpusConfig:
        if not self.glue and not self.files:
            raise ValueError("give corpus.glue (e.g. [sst2, mrpc]) and/or corpus.files")
        return self


class TaskConfig(Strict):
    """Which data, how it is read and how much of it is used."""

    name: str = Field(description="registry name: glue/sst2, glue/mrpc, glue/rte, glue/cola, glue/stsb, "
                      "csv, jsonl, hf_dataset (a Hugging Face datasets dataset), cifar10, image_folder, digits, lm "
                      "(causal language modelling)")
    data_dir: str | None = Field(None, description="folder (or zip for cifar10); default under ../shared/data "
                                 "or $KDFORGE_DATA")
    train_file: str | None = Field(None, description="csv/jsonl: training file; hf_dataset: a .csv, .tsv, .json, "
                                   ".jsonl, .parquet or .arrow file (read by datasets.load_dataset) or a "
                                   "save_to_disk folder of one Dataset, instead of `train_split` of `dataset`")
    dev_file: str | None = Field(None, description="csv/jsonl: evaluation file (the reported split); hf_dataset: as "
                                 "train_file, instead of `dev_split` of `dataset`")
    dataset: str | None = Field(None, description="hf_dataset: a folder written by datasets' save_to_disk (a "
                                "DatasetDict, or one Dataset: the train split), or a Hub dataset name; relative "
                                "paths inside data_dir when set")
    train_split: str | None = Field(None, description="hf_dataset: the split of `dataset` trained on; default train")
    dev_split: str | None = Field(None, description="hf_dataset: the split of `dataset` reported on; default "
                                  "validation or dev, whichever it has")
    text_columns: list[str] = Field(default_factory=lambda: ["text"], description="csv/jsonl/hf_dataset: 1 or 2 "
                                    "columns")
    label_column: str = Field("label", description="csv/jsonl/hf_dataset: the label column (hf_dataset: a "
                              "ClassLabel column's names are the default label_names)")
    label_names: list[str] | None = Field(None, description="csv/jsonl/hf_dataset classification: the label "
                                          "space; default: sorted distinct training labels")
    problem_type: Literal["classification", "regression"] = "classification"
    max_length: PositiveInt = 128
    train_limit: PositiveInt | None = Field(None, description="use a fixed random sample of this many train rows")
    eval_limit: PositiveInt | None = None
    sample_seed: int = 0
    corpus: CorpusConfig | None = Field(None, description="lm: the text to model; trained on the GLUE training "
                                        "files / corpus.files, evaluated on the GLUE dev files / task.dev_file")
    validation: float | str | None = Field(
        None, description="a validation split, used to select (best epoch, ensemble weights) instead of the "
        "reported split: a fraction in (0, 1) of the training rows, carved AFTER `train_limit` sampling "
        "(train_limit 1000 and validation 0.1 give 900 train + 100 validation rows; ceil(fraction x rows) "
        "validation rows, drawn with `sample_seed`, stratified by label for classification when every class "
        "has 2+ rows), which `train` then excludes; or a file in the training file's format (csv/jsonl: like "
        "task.train_file; hf_dataset: a split of task.dataset, or a file or folder like task.train_file; glue/*: "
        "a TSV laid out like train.tsv; lm: one passage per line; relative paths "
        "inside task.data_dir when set), used whole, training rows unchanged. Image tasks take fractions "
        "only. Default: none (selection on the reported split)")

    @model_validator(mode="after")
    def _validation_fraction(self) -> TaskConfig:
        value = self.validation
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"task.validation: {value} is not a fraction in (0, 1); give e.g. 0.1 "
                             "(a share of the training rows) or the path of a validation file")
        if isinstance(value, str) and not value.strip():
            raise ValueError("task.validation is empty; give a fraction such as 0.1 or a validation file")
        return self


class FinetuneConfig(Strict):
    """How the teacher is fine-tuned on the task before distillation (`kdforge finetune`)."""

    epochs: PositiveInt = 3
    lr: PositiveFloat = 5e-5
    batch_size: PositiveInt = 32
    seed: int | None = Field(None, description="seed of the teacher's fine-tuning; default: train.seed")
    store: bool = Field(True, description="reuse a teacher fine-tuned identically (same model, data, settings "
                        "and seed) by any earlier run, from $KDFORGE_CACHE/teachers, and keep a copy of a newly "
                        "fine-tuned one there")


class BlackBoxConfig(Strict):
    """A teacher seen only through the class probabilities it returns (:mod:`kdforge.blackbox`): an HTTP
    server speaking kdforge's JSON protocol, a JSON-lines file of predictions, or a Python callable.
    Answers are cached in SQLite (paid once, kept across runs) and ``max_queries`` bounds the inputs
    ever sent to this teacher through that cache."""

    url: str | None = Field(None, description="http(s) endpoint answering POST {\"inputs\": [...]} with "
                            "{\"probabilities\": [[...], ...]}")
    file: str | None = Field(None, description="JSON-lines file, one {\"input\": ..., \"probabilities\": [...]} "
                             "per line")
    callable: str | None = Field(None, description="package.module:function, or a name registered with "
                                 "kdforge.distill(config, black_boxes={name: fn}); fn(list of inputs) -> "
                                 "probabilities (N, K)")
    version: str = Field("", description="the teacher's version: part of the cache keys (a new version is a "
                         "new teacher)")
    num_classes: PositiveInt | None = Field(None, description="classes the teacher answers; default: the task's")
    max_queries: NonNegativeInt | None = Field(None, description="the most inputs ever sent to this teacher "
                                               "(over every run sharing cache_dir); default: no limit")
    cache_dir: str | None = Field(None, description="folder of the answer cache; default $KDFORGE_CACHE/black-box")
    timeout_s: PositiveFloat = Field(30.0, description="url: seconds to wait for one answer")
    retries: NonNegativeInt = Field(3, description="url: retries of a failed request (exponential back-off)")
    rate_limit_per_s: PositiveFloat | None = Field(None, description="url: at most this many requests per second")
    batch_size: PositiveInt = Field(64, description="inputs per request")

    @model_validator(mode="after")
    def _one_source(self) -> BlackBoxConfig:
        given = [k for k in ("url", "file", "callable") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of black_box.url, black_box.file, black_box.callable "
                             f"(got {', '.join(given) or 'none'})")
        return self

    def describe(self) -> str:
        """``url``, ``file`` or ``callable`` and its value, e.g. ``url http://127.0.0.1:8000/``."""
        kind = next(k for k in ("url", "file", "callable") if getattr(self, k) is not None)
        return f"{kind} {getattr(self, kind)}"


class TeacherConfig(Strict):
    model: str | None = Field(None, description="package:NAME, a local HF directory, a hub id, or vision:NAME")
    black_box: BlackBoxConfig | None = Field(None, description="a teacher seen only through its answers "
                                             "(class probabilities), instead of `model`")
    finetune: FinetuneConfig | None = Field(None, description="fine-tune the teacher on the task first")
    layers: list[int] | None = Field(None, min_length=1, description="keep only these transformer layers of "
                                     "`model` (0-based, in this order) before fine-tuning: a shallower teacher "
                                     "from the same pre-trained model (e.g. [0, 1, 2]); needs `finetune`")

    @model_validator(mode="after")
    def _model_or_black_box(self) -> TeacherConfig:
        if (self.model is None) == (self.black_box is None):
            raise ValueError("set exactly one of `model` and `black_box` for a teacher")
        if self.black_box is not None and self.finetune is not None:
            raise ValueError("a black-box teacher cannot be fine-tuned; remove `finetune` from it")
        if self.layers is not None and self.finetune is None:
            raise ValueError("`layers` cuts the teacher's model to fewer layers, which must then learn the task: "
                             "add `finetune` (e.g. {epochs: 3}) to this teacher")
        return self


class StudentConfig(Strict):
    """Where the student comes from: ``layers`` alone (copy these teacher layers), ``config`` alone (a
    fresh model: the teacher's config with these overrides), ``layers`` and ``config`` together (those
    teacher layers with every weight sliced to the config's narrower widths, see
    :func:`kdforge.models.student.student_sliced`), ``model`` alone (a model given by the user), or ``model``
    and ``layers`` (those layers of the given model: e.g. a pre-trained encoder's, the same student for
    teachers of every size)."""

    layers: list[int] | None = None
    config: dict[str, Any] | None = None
    model: str | None = None
    sps: Literal["swap", "share", "top_half_swap"] | None = Field(
        None, description="Pea-KD shuffled parameter sharing: re-run the layers (Q/K swapped)")
    vocab_fraction: float | None = Field(None, gt=0, le=1, description="GLMD vocabulary compression: keep this "
                                         "fraction of the teacher's words (the most frequent in the training text)")

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        given = [k for k in ("layers", "config", "model") if getattr(self, k) is not None]  # sps adds to any
        if given not in (["layers"], ["config"], ["model"], ["layers", "config"], ["layers", "model"]):
            raise ValueError("set exactly one of student.layers, student.config, student.model, or student.layers "
                             "with student.config (teacher layers sliced to the config's widths) or with "
                             f"student.model (that model's layers) (got {', '.join(given) or 'none'})")
        return self


class ObjectiveConfig(BaseModel):
    """One loss term: its registered name, its weight (a number or a schedule), and its own
    parameters, which the objective validates itself (unknown ones are errors)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str
    weight: float | dict[str, Any] = 1.0
    teacher: str | None = Field(None, description="the role this term learns from: `teacher`, a key of "
                                "`teachers` or `assistants`; default: the stage's only teacher")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(Strict):
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 5e-5
    lr_by_role: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="learning rates of their own for parts of a stage, by name: the "
        "learner's role, a teacher role trained with it (online KD), `bridge` (sokd) or a loss term's name (its "
        "own parameters, e.g. a projection); the rest train at `lr` (same warm-up and decay)")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw (the transformer papers') or sgd with `momentum` (the CIFAR KD papers': "
        "CRD, DKD train with SGD, momentum 0.9, weight decay 5e-4)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: the momentum of its steps")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps with a linear warm-up of the lr")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="the lr after the warm-up: linear decay to 0, cosine decay to 0, or constant")
    grad_accum: PositiveInt = 1
    shuffle: bool = Field(True, description="draw each epoch's batches in a new order (seeded by train.seed and the "
                          "epoch, so a resumed run draws the same); false: the data's order")
    drop_last: bool = Field(False, description="drop each epoch's last batch when it is smaller than batch_size")
    max_grad_norm: PositiveFloat | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 42
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = end of each epoch")
    keep_checkpoint: bool = Field(False, description="keep checkpoints/ after a successful run")
    log_every: PositiveInt = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    select_best: bool = Field(True, description="keep the weights of the best epoch by the main metric")
    trackers: list[Literal["tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "aim", "clearml", "dvclive",
                           "swanlab", "all"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers (HF Accelerate's log_with names; [] = none): tensorboard writes "
                    "tensorboard/<stage>; mlflow logs to $MLFLOW_TRACKING_URI, else a local file store "
                    "<output_dir>/mlruns; all = every installed one (kdforge.engine.tracking)")


class TeacherCacheConfig(Strict):
    """Compute a frozen teacher's outputs once and reuse them across epochs and runs (kdforge.recipes.teacher_cache)."""

    enabled: bool = True
    dtype: Literal["float32", "float16"] = "float32"
    top_k: PositiveInt | None = Field(None, description="keep only the k largest logits (+ the remaining mass)")
    hidden_states: list[NonNegativeInt] = Field(default_factory=list,
                                                description="hidden states to cache too (0 = embeddings)")
    folder: str | None = Field(None, description="default: $KDFORGE_CACHE/teacher-outputs")


class EvalConfig(Strict):
    batch_size: PositiveInt = 64
    ece_bins: PositiveInt = 15
    latency_batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 32], min_length=1)
    latency_seq_len: PositiveInt | None = Field(
        None, description="tokens per text input when timing latency; default (null): the run's own "
        "task.max_length. Vision tasks time their image size")
    latency_warmup: int = Field(3, ge=0)
    latency_repeats: PositiveInt = Field(20, description="timed rounds per batch size (every model once per round)")
    threads: PositiveInt | None = Field(None, description="torch threads for latency; default: torch's")
    latency_max_spread: PositiveFloat = Field(0.2, description="relative spread of the timings (interquartile "
                                              "range / median) above which the report flags latency as noisy")
    sharpness: bool = Field(False, description="report each model's sharpness: the largest eigenvalue of its "
                            "training-loss Hessian (kdforge.evaluation.sharpness); costs ~3 backward passes per "
                            "iteration and sample")
    sharpness_samples: PositiveInt = Field(256, description="fixed training rows the sharpness is measured on")
    sharpness_iterations: PositiveInt = Field(100, description="the most power-iteration steps of the sharpness "
                                              "estimate (it stops earlier once converged: sharpness_tol)")
    sharpness_tol: PositiveFloat = Field(1e-3, description="the sharpness estimate has converged when it changes "
                                         "by less than this fraction of itself between two iterations")
    ensembles: dict[str, list[str]] = Field(
        default_factory=dict, description="name -> roles: each ensemble (the mean of its members' class "
        "probabilities) is scored beside the models, e.g. born-again's BANE {BANE: [teacher, gen1, student]}")

    def timed_seq_len(self, task: TaskConfig) -> int:
        """The tokens per text input that latency is timed at: ``latency_seq_len``, else ``task.max_length``."""
        return self.latency_seq_len or task.max_length


class ExportConfig(Strict):
    """Deployment formats written beside ``student/`` (and evaluated in the report like the PyTorch model)."""

    onnx: bool = Field(False, description="export teacher and student to ONNX (fp32, dynamic batch and sequence)")
    int8: bool = Field(False, description="also the student as int8 (onnxruntime quantization, "
                       "export.int8_mode); needs export.onnx")
    int8_mode: Literal["dynamic", "static", "best"] = Field(
        "dynamic", description="dynamic: int8 weights, activations quantized at run time (no data needed); static: "
        "activations too, their ranges calibrated on export.calibration_rows training rows (convolutions "
        "quantized: where static pays); best: both written, the faster of those within export.int8_max_drop of "
        "the fp32 score on the validation split kept (needs task.validation); kdforge.deploy.quantize")
    calibration_rows: PositiveInt = Field(256, description="static int8: training rows (a fixed seeded sample) "
                                          "whose activations set the quantization ranges")
    int8_max_drop: float = Field(0.01, ge=0, description="int8_mode best: the largest drop of the main metric from "
                                 "the fp32 ONNX student on the validation split (0.01 = 1 point of accuracy) a "
                                 "candidate may have")
    opset: PositiveInt = Field(18, description="ONNX opset version")
    fuse: bool = Field(True, description="text encoders: ONNX Runtime's transformer fusions (SkipLayerNormalization, "
                       "BiasGelu) on the fp32 file, kept when the logits agree within 1e-4 "
                       "(kdforge.deploy.onnx_fusion); the fused file runs in ONNX Runtime only, false keeps a plain "
                       "ONNX graph")

    @model_validator(mode="after")
    def _int8_needs_onnx(self) -> ExportConfig:
        if self.int8 and not self.onnx:
            raise ValueError("export.int8 quantizes the ONNX student: set export.onnx: true too")
        if self.int8_mode != "dynamic" and not self.int8:
            raise ValueError(f"export.int8_mode {self.int8_mode} chooses how the int8 student is made: set "
                             "export.int8: true and export.onnx: true too")
        return self


class SearchConfig(Strict):
    """Student architecture search (``kdforge search``; :mod:`kdforge.search`): every trial distills a
    candidate on a fixed proxy subset of the training rows and scores it on the validation split."""

    method: Literal["kdnas", "autokd", "random"] = Field(
        "kdnas", description="kdnas: an LSTM controller that predicts each candidate's reward and sends the "
        "predicted best of a pool to the proxy (KD-NAS; `controller`); autokd: "
        "Optuna's TPE (Bayesian optimisation) with successive-halving pruning over proxy epochs (AutoKD); "
        "random: uniform sampling (the baseline)")
    controller: Literal["predictor", "reinforce"] = Field(
        "predictor", description="kdnas: predictor = the paper's reward predictor (an LSTM regressed on the rewards "
        "so far, picking the predicted best of a random pool, 10% exploration, 5 random warm-up episodes); "
        "reinforce = an LSTM policy trained by REINFORCE (Zoph & Le), kdforge's earlier controller")
    trials: PositiveInt = Field(30, description="finished trials (complete or pruned) the study stops at, "
                                "counted over every worker")
    objective: Literal["reward", "pareto"] = Field(
        "reward", description="reward: maximise score x (latency / target)^w; pareto: two objectives (score up, "
        "latency down), the Pareto front kept (autokd and random only)")
    space: dict[str, list[Any]] = Field(default_factory=dict, description="choices per dimension, overriding "
                                        "kdforge.search.space defaults (layers, hidden_size, head_dim, "
                                        "intermediate_size, hidden_act, blocks, width, temperature, kd_weight); "
                                        "[] = not searched")
    proxy_rows: PositiveInt = Field(1000, description="training rows every candidate learns from (a fixed subset)")
    proxy_epochs: PositiveInt = Field(2, description="epochs of each candidate's mini-distillation (the fidelity "
                                      "autokd prunes on: rungs at 1, 2, 4, ... epochs, so autokd needs 4 or more)")
    validation: float = Field(0.1, gt=0, lt=1, description="fraction of the training rows carved off as the "
                              "validation split candidates are scored on, when task.validation is not set")
    candidate_objectives: list[ObjectiveConfig] | None = Field(
        None, description="terms added to the config's objectives for every candidate; default: "
        "tinybert_hidden (each student layer's hidden state, projected, learns from its mapped teacher layer, "
        "as KD-NAS does) for transformer students, none for CNNs")
    target_speedup: PositiveFloat = Field(3.0, description="the target latency = the teacher's latency / this")
    reward_weight: float = Field(-0.07, le=0, description="w of the reward score x (latency / target)^w "
                                 "(MnasNet's soft constraint)")
    latency_form: Literal["pytorch", "onnx_int8"] = Field(
        "pytorch", description="the form each candidate is timed in: pytorch (fp32) or onnx_int8, the form that "
        "ships (exported and quantized in the trial: int8 changes which shapes are fast); the teacher is timed "
        "in PyTorch fp32, the reference of the target speedup")
    latency_batch_size: PositiveInt | None = Field(None, description="batch size of the latency measurement; "
                                                   "default: the largest of eval.latency_batch_sizes")
    latency_repeats: PositiveInt = Field(10, description="interleaved rounds (candidate and teacher) per trial")
    final_top: NonNegativeInt = Field(2, description="the best candidates distilled on the full training set "
                                      "with the job's settings and reported (0 = none)")
    seed: int = 0
    storage: str | None = Field(None, description="Optuna storage URL; default: sqlite:///<output_dir>/study.db "
                                "(one machine); postgresql://... for workers on many machines")
    study_name: str | None = Field(None, description="default: the output folder's name")
    heartbeat_s: PositiveInt = Field(30, description="a worker's heartbeat; a trial silent for 2x this is failed "
                                     "and retried by the next worker")

    @model_validator(mode="after")
    def _three_rungs(self) -> SearchConfig:
        if self.method == "autokd" and self.objective == "reward" and self.proxy_epochs < 4:
            raise ValueError(f"search.proxy_epochs {self.proxy_epochs}: AutoKD's successive halving needs at least 3 "
                             "rungs (candidates scored after 1, 2 and 4 epochs, halving at each); set "
                             "search.proxy_epochs: 4 or more")
        return self


class AugmentConfig(Strict):
    """TinyBERT data augmentation of a task stage's training text (kdforge.augment)."""

    copies: PositiveInt = Field(20, description="augmented variants per example (paper: N = 20)")
    p: float = Field(0.4, gt=0, le=1, description="probability of replacing a word (paper: 0.4)")
    k: PositiveInt = Field(15, description="candidates per word (paper: K = 15)")
    seed: int = 0


class StrategyConfig(BaseModel):
    """Who learns from whom in a stage: a strategy registered by name in ``kdforge.recipes`` (``kdforge
    list`` prints them), with its own parameters, which the strategy validates itself."""

    model_config = ConfigDict(extra="allow")
    name: str = "offline"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StageConfig(Strict):
    """One step of a recipe: its data source, its roles (who learns, who teaches), its strategy and
    loss terms, training overrides and head. The data source's own parameters go under a key named like
    it (``data: corpus`` with ``corpus: {files: [...]}``); the source validates them itself."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    data: str = Field("task", description="the data source, registered by name in kdforge.recipes (`kdforge list` "
                      "prints them); default: the task's labelled data")
    learner: str = Field("student", description="the role trained in this stage: `student` or an assistant")
    teachers: list[str] | None = Field(None, description="the roles it learns from (teachers, assistants "
                                       "trained in earlier stages); default: every teacher of the job")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    teacher_source: Literal["auto", "live", "cache"] = Field(
        "auto", description="where frozen teachers' outputs come from: cache = computed once and stored "
        "(kdforge.recipes.teacher_cache), live = every step, auto = the cache where it is exact")
    objectives: list[ObjectiveConfig]
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the job's train section")
    head: Literal["keep", "reinit"] = Field("keep", description="reinit: a fresh classification head first")
    augment: AugmentConfig | None = Field(None, description="TinyBERT data augmentation of the training text")

    @model_validator(mode="after")
    def _only_the_data_source_params(self) -> StageConfig:
        for key, value in (self.model_extra or {}).items():
            if key != self.data:
                raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                    type=PydanticCustomError("extra_key", "this config key does not exist (beside the stage's keys "
                                             "only its data source's parameters, under the source's name: `{key}:` "
                                             "goes with `data: {key}`)", {"key": key}),
                    loc=(key,), input=value)])
        return self

    @property
    def data_params(self) -> dict[str, Any]:
        """The parameters of the stage's data source (its key named like the source), not validated here."""
        value = (self.model_extra or {}).get(self.data)
        return dict(value) if isinstance(value, dict) else {} if value is None else value


def _default_objectives() -> list[ObjectiveConfig]:
    return [ObjectiveConfig(name="ce", weight=0.5), ObjectiveConfig(name="hinton_kd", weight=0.5, temperature=4.0)]


#: role names a job gives its models besides those of `teachers` and `assistants`
PRIMARY_TEACHER, STUDENT = "teacher", "student"


class JobConfig(Strict):
    task: TaskConfig
    teacher: TeacherConfig | None = Field(None, description="the teacher (role `teacher`); several: `teachers`")
    teachers: dict[str, TeacherConfig] = Field(default_factory=dict, description="named teachers (roles), each "
                                               "with its own model, fine-tuning and cache")
    student: StudentConfig | None = None
    assistants: dict[str, StudentConfig] = Field(default_factory=dict, description="teacher assistants (roles), "
                                                 "built like the student and trained by a stage (`learner:`)")
    objectives: list[ObjectiveConfig] = Field(default_factory=_default_objectives)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    stages: list[StageConfig] | None = Field(None, description="a multi-stage recipe; default: one stage "
                                             "named distill with `objectives` and `train`")
    output_dir: str = "runs/job"

    @model_validator(mode="after")
    def _roles_valid(self) -> JobConfig:
        if self.teacher is None and not self.teachers:
            raise ValueError("give a `teacher` section (or several named ones under `teachers`)")
        names = [*self.teachers, *self.assistants]
        reserved = {PRIMARY_TEACHER, STUDENT}
        clash = sorted(reserved & set(names) | {n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"role names must be unique and not `teacher`/`student` (got {', '.join(clash)} "
                             "in teachers/assistants)")
        roles = set(self.roles())
        for i, stage in enumerate(self.all_stages()):
            twice = sorted({r for r in stage.teachers or [] if (stage.teachers or []).count(r) > 1})
            if twice:
                raise ValueError(f"stages.{i}.teachers lists {twice[0]!r} twice: each role teaches once (two teachers "
                                 "are two roles, e.g. two entries under `teachers:`)")
            if stage.learner not in {STUDENT, *self.assistants}:
                raise ValueError(f"stages.{i}.learner: {stage.learner!r} is not `student` or an assistant "
                                 f"({', '.join(self.assistants) or 'none defined under `assistants`'})")
            for role in [*(stage.teachers or []), *(o.teacher for o in stage.objectives if o.teacher)]:
                if role not in roles or role in (STUDENT, stage.learner):
                    raise ValueError(f"stage {stage.name!r}: {role!r} cannot teach here; roles: "
                                     f"{', '.join(r for r in roles if r not in (STUDENT, stage.learner))}")
        for name, members in self.eval.ensembles.items():
            unknown = ", ".join(m for m in members if m not in roles)
            if len(members) < 2 or unknown:
                raise ValueError(f"eval.ensembles.{name}: give two or more of the job's roles "
                                 f"({', '.join(sorted(roles))})" + (f"; {unknown} is not one" if unknown else ""))
        return self

    def teacher_configs(self) -> dict[str, TeacherConfig]:
        """Every teacher by role; the ``teacher`` section first (the primary teacher)."""
        return {**({PRIMARY_TEACHER: self.teacher} if self.teacher else {}), **self.teachers}

    def roles(self) -> list[str]:
        return [*self.teacher_configs(), *self.assistants, STUDENT]

    def stage_teachers(self, stage: StageConfig) -> list[str]:
        """The roles ``stage`` learns from: its ``teachers`` list, else every teacher of the job."""
        return stage.teachers if stage.teachers is not None else list(self.teacher_configs())

    @model_validator(mode="after")
    def _stages_valid(self) -> JobConfig:
        names = [s.name for s in self.stages or []]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique (got {names})")
        for i, stage in enumerate(self.all_stages()):
            roles = self.stage_teachers(stage)
            first = self.teacher_configs().get(roles[0]) if roles else None
            if stage.augment is not None and first is not None and first.black_box is not None:
                raise ValueError(f"stages.{i}.augment: the TinyBERT augmentation reads the teacher's embeddings, "
                                 "which a black-box teacher does not show; use `data: fsbbt` (it augments with the "
                                 "student's)")
        for i, stage in enumerate(self.stages or []):
            try:
                self.stage_train(stage)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                msg = "this config key does not exist" if first["type"] == "extra_forbidden" else first["msg"]
                raise ValueError(f"stages.{i}.train.{where}: {msg}") from None
        return self

    @model_validator(mode="after")
    def _int8_best_needs_validation(self) -> JobConfig:
        if self.export.int8_mode == "best" and self.task.validation is None:
            raise ValueError("export.int8_mode best chooses on the validation split, never on the reported one: set "
                             "task.validation (e.g. 0.1), or int8_mode dynamic / static")
        return self

    def all_stages(self) -> list[StageConfig]:
        return self.stages or [StageConfig(name="distill", objectives=self.objectives)]

    def stage_train(self, stage: StageConfig) -> TrainConfig:
        """The job's train section with the stage's overrides applied (validated)."""
        return TrainConfig.model_validate({**self.train.model_dump(), **stage.train})


# --------------------------------------------------------------------------- loading


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise KDForgeError(f"--set {dotted}: `{'.'.join(keys[:i + 1])}` is not an index of that list")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, dict | list):
                raise KDForgeError(f"--set {dotted}: `{'.'.join(keys[:i + 1])}` is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise KDForgeError(f"--set {dotted}: `{last}` is not an index of that list")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: list[str] | dict[str, Any] | None) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) or a ``{dotted: value}`` dict."""
    if not overrides:
        return tree
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for text in overrides:
            if "=" not in text:
                raise KDForgeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=3e-5")
            key, raw = text.split("=", 1)
            parsed.append((key.strip(), _parse_value(raw, text)))
        items = parsed
    for key, value in items:
        _fill_default_section(tree, key.split(".")[0])
        _set_path(tree, key, value)
    return tree


def _parse_value(raw: str, text: str = "") -> Any:
    """YAML value; also numbers YAML 1.1 leaves as strings (``3e-5``). ``text`` (the whole
    ``KEY=VALUE``) names the override in errors. Only plain YAML is read: a tag such as
    ``!!python/object`` is refused, never constructed."""
    where = f"--set {text or raw}"
    try:
        value = yaml.safe_load(raw)
    except yaml.constructor.ConstructorError:
        raise KDForgeError(f"{where}: YAML tags (!!...) are not allowed in a value; give a plain number, "
                           "string, list or mapping") from None
    except yaml.YAMLError as err:
        raise KDForgeError(f"{where}: the value is not valid YAML ({str(err).splitlines()[0]}); write a complete "
                           "value, e.g. --set 'student.layers=[0, 5]', and quote strings with special "
                           "characters") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _fill_default_section(tree: dict, section: str) -> None:
    """Materialise a section the file leaves to its default, so ``objectives.1.temperature=2`` works."""
    field = JobConfig.model_fields.get(section)
    if section in tree or field is None or field.is_required():
        return
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):
        tree[section] = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default]
    elif isinstance(default, BaseModel):
        tree[section] = default.model_dump(mode="json")


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _section_model(annotation: Any) -> Any:
    """The pydantic model inside ``X``, ``X | None``, ``list[X]`` or ``dict[str, X]`` (else None)."""
    if _is_model(annotation):
        return annotation
    for arg in get_args(annotation)[::-1]:  # dict[str, X]: the value type is last
        if (found := _section_model(arg)) is not None:
            return found
    return None


def _is_mapping(annotation: Any) -> bool:
    return get_origin(annotation) is dict or any(_is_mapping(a) for a in get_args(annotation))


def section_keys(model: Any, path: tuple) -> list[str] | None:
    """The field names of the config section at ``path`` of ``model`` (list indices and the free keys of
    a ``dict[str, Section]``, e.g. a teacher's role name, stepped over); None when unknown."""
    free_key = False
    for part in path:
        if free_key or isinstance(part, int):
            free_key = False
            continue
        if not _is_model(model) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        free_key, model = _is_mapping(annotation), _section_model(annotation)
    return list(model.model_fields) if _is_model(model) else None


def section_model(path: str) -> Any:
    """The pydantic model of the job config's section at the dotted ``path`` ("" for the top level);
    one line naming the valid sections when there is none."""
    model = JobConfig
    for part in [p for p in path.split(".") if p]:
        field = model.model_fields.get(part) if _is_model(model) else None
        inner = _section_model(field.annotation) if field is not None else None
        if inner is None:
            sections = [k for k, f in model.model_fields.items() if _section_model(f.annotation) is not None]
            raise KDForgeError(f"`{path}` is not a config section; sections here: {', '.join(sections)}")
        model = inner
    return model


def explain(path: str = "") -> str:
    """Every key of the config section ``path``: its type, default and description."""
    model = section_model(path)
    doc = (model.__doc__ or "").strip().splitlines()
    lines = [f"{path or 'the job config'}" + (f": {doc[0]}" if doc and model.__doc__ != BaseModel.__doc__ else "")]
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else \
            f"default {field.get_default(call_default_factory=True)!r}"
        annotation = field.annotation
        kind = annotation.__name__ if isinstance(annotation, type) else \
            str(annotation).replace("typing.", "").replace("kdforge.config.", "")
        lines.append(f"  {name} ({kind}; {default})" + (f": {field.description}" if field.description else ""))
    return "\n".join(lines)


def unknown_key_message(model: Any, loc: tuple) -> str:
    """"this config key does not exist", with the nearest valid key of its section and the valid keys."""
    keys = section_keys(model, loc[:-1]) if loc else None
    if not keys:
        return "this config key does not exist"
    near = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f"did you mean `{near[0]}`? " if near else ""
    return f"this config key does not exist ({hint}valid keys here: {', '.join(keys)})"


def format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = unknown_key_message(globals().get(err.title), tuple(first["loc"]))
    where = f"`{'.'.join(str(p) for p in first['loc'])}`: " if first["loc"] else ""
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}{msg}; fix it in the config file or with --set{more}"


def _opens_free_form(path: tuple) -> bool:
    """Whether the value at ``path`` holds settings that pydantic does not type here (objective and
    strategy parameters, ``student.config``), so a string such as "inf" would pass as a number later."""
    last = path[-1] if path else None
    if len(path) == 3 and path[0] == "stages" and last not in StageConfig.model_fields:
        return True  # a data source's parameters
    return last in ("objectives", "strategy") or (
        last == "config" and len(path) >= 2 and (path[-2] == "student" or path[:-2][-1:] == ("assistants",)))


def check_finite(tree: Any, source: str = "config", path: tuple = (), free_form: bool = False) -> None:
    """Refuse nan/inf anywhere in ``tree`` (as a number, or spelled as a string where the value is
    not typed yet), naming the dotted key: a non-finite learning rate, temperature or weight only
    ends in a NaN loss later."""
    if isinstance(tree, dict | list):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for key, value in items:
            sub = (*path, key)
            check_finite(value, source, sub, free_form or _opens_free_form(sub))
        return
    bad = isinstance(tree, float) and not math.isfinite(tree)
    if isinstance(tree, str) and free_form:
        try:
            bad = not math.isfinite(float(tree))
        except ValueError:
            bad = False
    if bad:
        where = ".".join(str(p) for p in path) or "(top level)"
        raise KDForgeError(f"{source}: `{where}` is {tree}: numbers in the config must be finite (not nan or "
                           "inf); fix it in the config file or with --set")


def validate_config(tree: dict, source: str = "config") -> JobConfig:
    check_finite(tree, source)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise KDForgeError(format_validation_error(err, source)) from None


def read_yaml_mapping(path: str | Path, what: str = "task:, teacher:, student: ... sections") -> dict:
    """A YAML file that must hold a mapping (plain YAML only: tags are never constructed)."""
    path = Path(path)
    if not path.is_file():
        raise KDForgeError(f"config file {path} not found; pass the path of a YAML config (see configs/)")
    try:
        tree = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise KDForgeError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                           "save the config as UTF-8") from None
    except yaml.YAMLError as err:
        raise KDForgeError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise KDForgeError(f"{path} must hold a mapping with {what}")
    return tree


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML job config, apply overrides and validate it."""
    return validate_config(apply_overrides(read_yaml_mapping(path), overrides), str(path))


def dump_config(config: JobConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
