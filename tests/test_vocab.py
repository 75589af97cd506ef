"""GLMD vocabulary compression: frequencies, kept ids, nearest-kept mapping, model surgery and plain-HF export."""

import json
from collections import Counter

import pytest
import torch

from kdforge.errors import KDForgeError
from kdforge.models.vocab import (
    choose_kept_ids,
    compress_vocabulary,
    mapping_targets,
    nearest_kept,
    remap_ids,
    restrict_teacher_logits,
    token_frequencies,
)
from tests.helpers import bpe_corpus, tiny_llama, train_bpe_tokenizer

# -- a hand-made WordPiece tokenizer: frequencies and kept ids by hand ------------------------------------------

TOY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "dog", "sat", "on", "mat", "ran", "bird", "##s", "a",
             "log", "big"]
TOY_CORPUS = ["the cat sat on the mat", "the dog sat on a log", "cats ran"]


@pytest.fixture(scope="module")
def toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(TOY_VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def test_token_frequencies_count_the_corpus_by_hand(toy_tokenizer):
    # the: 2 + 1; cat: 1 + 1 ("cats" = cat ##s); sat: 2; on: 2; mat, dog, a, log, ##s, ran: 1; no special tokens
    expected = Counter({4: 3, 5: 2, 7: 2, 8: 2, 9: 1, 6: 1, 13: 1, 14: 1, 12: 1, 10: 1})
    assert token_frequencies(toy_tokenizer, TOY_CORPUS) == expected
    assert token_frequencies(toy_tokenizer, "the the") == Counter({4: 2})


def test_choose_kept_ids_keeps_specials_then_the_most_frequent(toy_tokenizer):
    freqs = token_frequencies(toy_tokenizer, TOY_CORPUS)
    # 16 ids, fraction 1/2 -> 8 kept: the 4 special tokens (never seen, kept anyway), then the (3), then the
    # count-2 words by id: cat (5), sat (7), on (8)
    assert choose_kept_ids(freqs, toy_tokenizer, 0.5).tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    # 9 kept: one count-1 word more; dog (6), mat (9), ran (10), ##s (12), a (13), log (14) tie: the lowest id wins
    assert choose_kept_ids(freqs, toy_tokenizer, 0.6).tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 6]
    # a budget below the special tokens keeps exactly them
    assert choose_kept_ids(freqs, toy_tokenizer, 0.1).tolist() == [0, 1, 2, 3]
    # a per-id sequence is the same as a Counter
    per_id = [freqs.get(i, 0) for i in range(len(TOY_VOCAB))]
    assert choose_kept_ids(per_id, toy_tokenizer, 0.5).tolist() == [0, 1, 2, 3, 4, 5, 7, 8]


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_choose_kept_ids_rejects_a_bad_fraction(toy_tokenizer, fraction):
    with pytest.raises(KDForgeError, match="fraction"):
        choose_kept_ids(Counter(), toy_tokenizer, fraction)


def test_choose_kept_ids_rejects_frequencies_of_another_tokenizer(toy_tokenizer):
    with pytest.raises(KDForgeError, match="same tokenizer"):
        choose_kept_ids(Counter({99: 4}), toy_tokenizer, 0.5)


def test_mapping_targets_exclude_special_tokens(toy_tokenizer):
    assert mapping_targets(toy_tokenizer, torch.tensor([0, 1, 2, 3, 4, 5, 7, 8])).tolist() == [4, 5, 7, 8]


# -- nearest kept token: dot products of the teacher's input embeddings -----------------------------------------


def test_nearest_kept_maximises_the_dot_product_by_hand():
    emb = torch.tensor([[1.0, 0.0],    # 0 kept: maps to itself although e0 . e1 = 3 > e0 . e0 = 1
                        [3.0, 3.0],    # 1 kept
                        [1.0, 0.1],    # 2: . e0 = 1, . e1 = 3.3, . e5 = 0.4 -> 1 (cosine would pick 0: 0.995 > 0.777)
                        [0.0, -1.0],   # 3: . e0 = 0, . e1 = -3, . e5 = -4 -> 0
                        [-1.0, 2.0],   # 4: . e0 = -1, . e1 = 3, . e5 = 8 -> 5
                        [0.0, 4.0],    # 5 kept
                        [0.0, 0.0]])   # 6: 0 with every kept row: a tie, the first candidate wins -> 0
    kept = torch.tensor([0, 1, 5])
    assert nearest_kept(emb, kept).tolist() == [0, 1, 1, 0, 5, 5, 0]
    # only targets (5, 0): 2 -> . e5 = 0.4 < . e0 = 1 -> 0; 3 -> 0; 4 -> 5; 6 -> tie, now 5 comes first
    assert nearest_kept(emb, kept, targets=torch.tensor([5, 0])).tolist() == [0, 1, 0, 0, 5, 5, 5]
    assert nearest_kept(torch.nn.Embedding.from_pretrained(emb), kept, chunk_size=2).tolist() == [0, 1, 1, 0, 5, 5, 0]


def test_nearest_kept_rejects_targets_that_are_not_kept():
    with pytest.raises(KDForgeError, match="kept id"):
        nearest_kept(torch.eye(4), torch.tensor([0, 1]), targets=torch.tensor([2]))
    with pytest.raises(KDForgeError, match="twice"):
        nearest_kept(torch.eye(4), torch.tensor([0, 0]))


def test_restrict_teacher_logits_takes_kept_columns_in_student_order():
    logits = torch.tensor([[[10.0, 11.0, 12.0, 13.0, 14.0]]])
    assert restrict_teacher_logits(logits, torch.tensor([3, 0, 4])).tolist() == [[[13.0, 10.0, 14.0]]]
    with pytest.raises(KDForgeError, match="another teacher"):
        restrict_teacher_logits(logits, torch.tensor([5]))


# -- a byte-level BPE tokenizer trained here, with tiny Llama models --------------------------------------------

@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_bpe_tokenizer()


def llama(vocab_size, hidden, tie, end_id):
    return tiny_llama(vocab_size, hidden, tie=tie, eos_token_id=end_id)


def merge_parts(tokenizer):
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return {model["vocab"][p] for pair in pairs for p in pair}


def test_bpe_kept_ids_include_every_merge_part(bpe_tokenizer):
    kept = set(choose_kept_ids(token_frequencies(bpe_tokenizer, bpe_corpus()), bpe_tokenizer, 0.25).tolist())
    assert merge_parts(bpe_tokenizer) <= kept
    assert {0, 1, 2, bpe_tokenizer.convert_tokens_to_ids("<|end|>")} <= kept
    assert not merge_parts(bpe_tokenizer) & set(mapping_targets(bpe_tokenizer, torch.tensor(sorted(kept))).tolist())


@pytest.mark.parametrize("tie", [True, False])
def test_compressed_causal_lm_exports_to_plain_transformers(bpe_tokenizer, tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = bpe_tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    torch.manual_seed(0)
    teacher, student = llama(len(tokenizer), 24, True, end_id), llama(len(tokenizer), 16, tie, end_id)
    old_in = student.get_input_embeddings().weight.detach().clone()
    old_out = student.get_output_embeddings().weight.detach().clone()

    freqs = token_frequencies(tokenizer, bpe_corpus())
    kept = choose_kept_ids(freqs, tokenizer, 0.25)
    mapping = nearest_kept(teacher.get_input_embeddings().weight, kept, targets=mapping_targets(tokenizer, kept))
    student, new_tokenizer = compress_vocabulary(student, tokenizer, kept, mapping)

    # shapes, kept rows in kept order, tying, renumbered config ids
    n = len(kept)
    assert student.get_input_embeddings().weight.shape == (n, 16) and student.lm_head.weight.shape == (n, 16)
    assert student.config.vocab_size == n and student.lm_head.out_features == n
    assert torch.equal(student.get_input_embeddings().weight, old_in[kept])
    assert torch.equal(student.lm_head.weight, (old_in if tie else old_out)[kept])
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    new_end = kept.tolist().index(end_id)  # special tokens come first: <pad>, <s>, </s>, then <|end|>
    assert new_end == 3 and student.config.eos_token_id == 3 and student.generation_config.eos_token_id == 3
    assert new_tokenizer.convert_tokens_to_ids("<|end|>") == 3 and new_tokenizer.pad_token_id == 0
    assert torch.equal(student.kdforge_vocab_map, kept)

    # new text (unseen words and characters too): the new tokenizer gives the remapped original ids
    text = ["the green bird flew over the big house quickly", "Zebras ran under a tree!<|end|>"]
    original = tokenizer(text, padding=True, return_tensors="pt")
    new = new_tokenizer(text, padding=True, return_tensors="pt")
    assert torch.equal(new.input_ids, remap_ids(original.input_ids, student.kdforge_id_map))
    assert int(new.input_ids[1, -1]) == 3

    student.save_pretrained(tmp_path)
    new_tokenizer.save_pretrained(tmp_path)
    plain_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = plain_tokenizer(text, padding=True, return_tensors="pt")
    assert torch.equal(reloaded.input_ids, new.input_ids)
    with torch.no_grad():
        assert torch.equal(plain_model(**reloaded).logits, student(**new).logits)
    assert (plain_model.lm_head.weight is plain_model.model.embed_tokens.weight) == tie


def test_a_dropped_word_encodes_to_its_nearest_kept_token(bpe_tokenizer):
    tokenizer = bpe_tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    torch.manual_seed(1)
    teacher, student = llama(len(tokenizer), 24, True, end_id), llama(len(tokenizer), 16, True, end_id)
    freqs = token_frequencies(tokenizer, bpe_corpus())
    kept = choose_kept_ids(freqs, tokenizer, 0.25)
    emb = teacher.get_input_embeddings().weight.detach()
    targets = mapping_targets(tokenizer, kept)
    mapping = nearest_kept(emb, kept, targets=targets)
    student, new_tokenizer = compress_vocabulary(student, tokenizer, kept, mapping)
    # words of the corpus that are one token each and were dropped (rarer than the kept ones)
    dropped_words = [t for t in freqs if int(mapping[t]) != t
                     and tokenizer(tokenizer.decode([t]), add_special_tokens=False).input_ids == [t]]
    assert dropped_words
    for t in dropped_words:
        word = tokenizer.decode([t])
        nearest = max(targets.tolist(), key=lambda k: float(emb[t] @ emb[k]))  # the dot-product argmax
        assert int(mapping[t]) == nearest
        assert new_tokenizer(word, add_special_tokens=False).input_ids == [kept.tolist().index(nearest)]


def test_bpe_mapping_that_would_resegment_text_is_refused(bpe_tokenizer):
    tokenizer = bpe_tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    student = llama(len(tokenizer), 16, True, end_id)
    kept = choose_kept_ids(token_frequencies(tokenizer, bpe_corpus()), tokenizer, 0.1, keep_bpe_merge_parts=False)
    assert merge_parts(tokenizer) - set(kept.tolist())  # some merge parts are dropped
    mapping = nearest_kept(student.get_input_embeddings().weight, kept)
    with pytest.raises(KDForgeError, match="merge"):
        compress_vocabulary(student, tokenizer, kept, mapping)
    assert student.config.vocab_size == len(tokenizer)  # refused before touching the model


def test_mapping_must_send_dropped_ids_to_kept_ones(bpe_tokenizer):
    tokenizer = bpe_tokenizer
    student = llama(len(tokenizer), 16, True, 2)
    kept = torch.tensor([0, 1, 2])
    with pytest.raises(KDForgeError, match="not kept"):
        compress_vocabulary(student, tokenizer, kept, torch.arange(len(tokenizer)))


# -- BERT masked LM with the real BERT WordPiece tokenizer ------------------------------------------------------

BERT_CORPUS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the teams played",
               "teammates cheered"]


def test_compressed_masked_lm_exports_to_plain_transformers(tokenizer_dir, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    teacher, student = BertForMaskedLM(config), BertForMaskedLM(config).eval()
    student.cls.predictions.bias.data.normal_()
    old_emb = student.bert.embeddings.word_embeddings.weight.detach().clone()
    old_bias = student.cls.predictions.bias.detach().clone()

    freqs = token_frequencies(tokenizer, BERT_CORPUS)
    kept = choose_kept_ids(freqs, tokenizer, 12 / len(tokenizer))  # 5 special tokens + the 7 most frequent words
    words = [tokenizer.convert_ids_to_tokens(int(i)) for i in kept]
    assert words == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "on", "sat", "dog", "cat", "and"]
    emb = teacher.get_input_embeddings().weight.detach()
    targets = mapping_targets(tokenizer, kept)
    mapping = nearest_kept(emb, kept, targets=targets)
    student, new_tokenizer = compress_vocabulary(student, tokenizer, kept, mapping)

    decoder = student.cls.predictions.decoder
    assert decoder.weight is student.bert.embeddings.word_embeddings.weight  # still tied
    assert decoder.bias is student.cls.predictions.bias and decoder.bias.shape == (12,)
    assert torch.equal(decoder.weight, old_emb[kept]) and torch.equal(decoder.bias, old_bias[kept])
    assert new_tokenizer.cls_token_id == 2 and new_tokenizer.sep_token_id == 3 and new_tokenizer.pad_token_id == 0

    # "teams" was dropped: it encodes to the kept word whose teacher embedding has the largest dot product with it
    teams = tokenizer.convert_tokens_to_ids("teams")
    nearest = max(targets.tolist(), key=lambda k: float(emb[teams] @ emb[k]))
    assert new_tokenizer("teams", add_special_tokens=False).input_ids == [kept.tolist().index(nearest)]

    text = ["the cat played with the teams", "a log!"]
    original = tokenizer(text, padding=True, return_tensors="pt")
    new = new_tokenizer(text, padding=True, return_tensors="pt")
    assert torch.equal(new.input_ids, remap_ids(original.input_ids, student.kdforge_id_map))
    student.save_pretrained(tmp_path)
    new_tokenizer.save_pretrained(tmp_path)
    # the saved tokenizer.json keeps every original string (the backend alone would keep one per id)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(saved) == len(tokenizer) and set(saved.values()) == set(range(12))
    plain_model = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = plain_tokenizer(text, padding=True, return_tensors="pt")
    assert torch.equal(reloaded.input_ids, new.input_ids)
    with torch.no_grad():
        assert torch.equal(plain_model(**reloaded).logits, student(**new).logits)


def test_compressed_student_feeds_word_kd_with_the_teachers_kept_logits(bpe_tokenizer):
    from kdforge.config import ObjectiveConfig
    from kdforge.models.outputs import Outputs
    from kdforge.objectives.base import Progress, build_objective
    from kdforge.objectives.word_kd import word_kd_loss

    tokenizer = bpe_tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    torch.manual_seed(2)
    teacher, student = llama(len(tokenizer), 24, True, end_id), llama(len(tokenizer), 16, True, end_id)
    kept = choose_kept_ids(token_frequencies(tokenizer, bpe_corpus()), tokenizer, 0.25)
    mapping = nearest_kept(teacher.get_input_embeddings().weight, kept, targets=mapping_targets(tokenizer, kept))
    student, _ = compress_vocabulary(student, tokenizer, kept, mapping)
    objective = build_objective(ObjectiveConfig(name="word_kd"))
    objective.setup(student, teacher)
    batch = tokenizer(["the cat sat on the mat", "a big dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        t_logits = teacher(**batch).logits
        s_logits = student(input_ids=remap_ids(batch.input_ids, student.kdforge_id_map),
                           attention_mask=batch.attention_mask).logits
    value = objective(Outputs(s_logits), Outputs(t_logits), dict(batch), Progress())
    expected = word_kd_loss(s_logits, t_logits[..., kept], 15.0, batch.attention_mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_student_ids_collator_gives_each_model_its_own_ids():
    from kdforge.models.vocab import StudentIdsCollator

    id_map = torch.tensor([0, 1, 2, 2, 3])  # teacher id 3 was dropped, it stands in as student id 2
    batch = StudentIdsCollator(lambda examples: {"input_ids": torch.tensor([[4, 3, 0]]),
                                                 "labels": torch.tensor([[4, 3, -100]]),
                                                 "attention_mask": torch.tensor([[1, 1, 0]])}, id_map)([{}])
    assert batch["teacher_input_ids"].tolist() == [[4, 3, 0]]
    assert batch["input_ids"].tolist() == [[3, 2, 0]]
    assert batch["labels"].tolist() == [[3, 2, -100]]  # padding stays ignored


def test_teacher_adapter_reads_the_teacher_ids():
    from kdforge.models.adapter import ModelAdapter

    batch = {"inputs": torch.tensor([1.0]), "input_ids": torch.tensor([[1]]), "teacher_input_ids": torch.tensor([[9]])}
    seen = {}

    class Spy(torch.nn.Module):
        config = type("C", (), {"_attn_implementation": "sdpa"})()

        def save_pretrained(self, *args):  # looks like an HF model to the adapter
            pass

        def forward(self, **inputs):
            seen.update(inputs)
            return type("O", (), {"logits": torch.zeros(1, 1, 2)})()

    ModelAdapter(Spy(), teacher=True)(batch)
    assert seen["input_ids"].tolist() == [[9]] and "teacher_input_ids" not in seen
    ModelAdapter(Spy())(batch)
    assert seen["input_ids"].tolist() == [[1]]


def test_latency_inputs_stay_inside_a_compressed_vocabulary(bpe_tokenizer):
    from kdforge.evaluation.latency import text_inputs

    ids = text_inputs(bpe_tokenizer, 8, 32, vocab_limit=20)["input_ids"]  # the tokenizer has 331 strings
    assert int(ids.max()) < 20 and int(ids.min()) >= 1


# -- the compression's state lives in the student's config (and buffers), so a reloaded student carries it -----

def test_a_saved_and_reloaded_student_carries_its_vocabulary_map(bpe_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdforge.config import ObjectiveConfig
    from kdforge.deploy.export import export_model
    from kdforge.models.loading import LoadedModel
    from kdforge.models.student import student_from_layers
    from kdforge.models.vocab import StudentIdsCollator, id_map_of, kept_ids_of
    from kdforge.objectives.base import build_objective
    from kdforge.recipes.stage import training_collator

    tokenizer = bpe_tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    torch.manual_seed(3)
    teacher, student = llama(len(tokenizer), 24, True, end_id), llama(len(tokenizer), 16, True, end_id)
    plain_keys = set(llama(len(tokenizer), 16, True, end_id).state_dict())
    kept = choose_kept_ids(token_frequencies(tokenizer, bpe_corpus()), tokenizer, 0.25)
    mapping = nearest_kept(teacher.get_input_embeddings().weight, kept, targets=mapping_targets(tokenizer, kept))
    student, new_tokenizer = compress_vocabulary(student, tokenizer, kept, mapping)
    id_map = student.kdforge_id_map

    # module state, not patched attributes: buffers outside the state dict, and the config
    assert {"kdforge_vocab_map", "kdforge_id_map"} <= set(dict(student.named_buffers()))
    assert not {"kdforge_vocab_map", "kdforge_id_map"} & set(vars(student))
    assert set(student.state_dict()) == plain_keys  # the weights file is a plain model's
    stored = student.config.kdforge_vocab
    assert stored["kept_ids"] == kept.tolist() and stored["id_map"] == id_map.tolist()

    export_model(LoadedModel(student, new_tokenizer, "student"), tmp_path / "student")
    assert json.loads((tmp_path / "student" / "config.json").read_text())["kdforge_vocab"] == stored
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert torch.equal(kept_ids_of(reloaded), kept) and torch.equal(id_map_of(reloaded), id_map)

    # word_kd and the training collator read the reloaded student as they read the live one
    batch = tokenizer(["the cat sat on the mat", "a big dog"], padding=True, return_tensors="pt")
    objective = build_objective(ObjectiveConfig(name="word_kd"))
    objective.setup(reloaded, teacher)
    assert torch.equal(objective.kept_ids, kept)

    class Data:
        def collator(self, tok, train=False):
            return lambda examples: {k: v.clone() for k, v in batch.items()}

    collate = training_collator(Data(), LoadedModel(reloaded, new_tokenizer), LoadedModel(teacher, tokenizer))
    assert isinstance(collate, StudentIdsCollator)
    assert torch.equal(collate([])["input_ids"], remap_ids(batch.input_ids, id_map))

    # a new model built from the compressed one speaks its vocabulary: it has no map of its own
    derived = student_from_layers(reloaded, [0])
    assert kept_ids_of(derived) is None and id_map_of(derived) is None
    assert not hasattr(derived.config, "kdforge_vocab")
