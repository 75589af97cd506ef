"""Helpers shared by the tests: synthetic sentiment rows, tiny random-init BERTs and Llamas, a small BPE tokenizer."""

import csv
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "excellent", "wonderful", "lovely", "superb", "brilliant", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "poor", "horrible", "weak"]
FILLER = ["the", "movie", "was", "really", "quite", "plot", "acting", "story", "film", "and"]


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if label else "neg"))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def tiny_bert(vocab_size: int, num_labels: int = 2, layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                        num_labels=num_labels, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(config)


WORDS = "the a cat dog bird sat ran flew on under over mat tree house quickly slowly red green big small".split()


def bpe_corpus(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)] + ["the cat sat on the mat"] * 5


def train_bpe_tokenizer():
    """A byte-level BPE tokenizer (330 ids: <pad> <s> </s>, bytes, merges) trained on :func:`bpe_corpus`,
    plus an added special token <|end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(bpe_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})  # an added token after the vocab
    return tokenizer


def tiny_llama(vocab_size: int, hidden: int, layers: int = 1, tie: bool = True, eos_token_id: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=eos_token_id,
                                        tie_word_embeddings=tie)).eval()


def offline_step(student, loss, teacher=None, cache=None):
    """An OfflineStep over adapters, as the stage runner builds it: the teacher live, or from ``cache``."""
    from kdforge.recipes.offline import OfflineStep
    from kdforge.recipes.teacher_sources import CachedTeacher, LiveTeacher

    sources = {"teacher": CachedTeacher(cache)} if cache is not None else \
        {"teacher": LiveTeacher(teacher)} if teacher is not None else {}
    return OfflineStep(student, loss, sources)


class Killed(Exception):
    """Stands for a kill of the process: raised at the point under test (e.g. by :func:`kill_at`)."""


def kill_at(step: int, stage: str | None = None):
    """A trainer callback that raises :class:`Killed` when training reaches optimizer step ``step`` (in the
    stage named ``stage``, when given)."""
    def kill(trainer) -> None:
        if trainer.state.step == step and (stage is None or trainer.desc == stage):
            raise Killed

    return kill
