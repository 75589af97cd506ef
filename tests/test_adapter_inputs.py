"""ModelAdapter(input_paths=...): forward pre-hooks capture the input of a module (the feature a
classification head reads), for the CIFAR nets and a tiny BERT classifier."""

import pytest
import torch

from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.heads import head_path
from kdforge.models.vision_nets import build_vision_net
from tests.helpers import tiny_bert


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "small_cnn"])
def test_vision_nets_head_input_and_pool_input(name):
    torch.manual_seed(0)
    model = build_vision_net(name, num_classes=5).eval()
    assert head_path(model) == "fc"
    adapter = ModelAdapter(model, hook_paths=["layer3"], input_paths=["fc", "pool"])
    x = torch.randn(3, 3, 16, 16)
    out = adapter({"pixel_values": x})
    feat, fmap = out.features["input:fc"], out.features["input:pool"]
    assert feat.shape == (3, model.fc.in_features) and fmap.shape[:2] == (3, model.fc.in_features)
    assert torch.allclose(model.fc(feat), out.logits, atol=1e-6)
    assert torch.allclose(fmap.mean((2, 3)), feat, atol=1e-6)  # pool's input is the map before global pooling
    assert torch.allclose(model.post_act(out.features["layer3"]), fmap)  # output hooks still work alongside
    out2 = adapter({"pixel_values": torch.randn(2, 3, 16, 16)})  # cleared and refilled each forward
    assert out2.features["input:fc"].shape[0] == 2 and set(out2.features) == {"layer3", "input:fc", "input:pool"}


def test_bert_classifier_input_and_remove_hooks():
    torch.manual_seed(0)
    model = tiny_bert(vocab_size=50, num_labels=3, layers=1).eval()
    path = head_path(model)
    assert path == "classifier"
    adapter = ModelAdapter(model, input_paths=[path])
    batch = {"input_ids": torch.randint(5, 50, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 0])}
    out = adapter(batch)
    feat = out.features["input:classifier"]
    assert feat.shape == (4, 32)
    assert torch.allclose(model.classifier(feat), out.logits, atol=1e-6)
    assert len(model.classifier._forward_pre_hooks) == 1
    adapter.remove_hooks()
    assert len(model.classifier._forward_pre_hooks) == 0
    assert "input:classifier" not in adapter(batch).features


def test_unknown_input_path_is_a_one_line_error():
    model = build_vision_net("small_cnn", num_classes=2)
    with pytest.raises(KDForgeError, match="did you mean fc"):
        ModelAdapter(model, input_paths=["fcc"])


# ----------------------------------------------------------------------------- which batch keys a model gets


def test_an_unknown_batch_key_reaches_no_model_that_does_not_take_it():
    torch.manual_seed(0)
    bert = tiny_bert(vocab_size=50, num_labels=3, layers=1).eval()
    batch = {"input_ids": torch.randint(5, 50, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)}
    plain = ModelAdapter(bert)(batch).logits
    assert torch.equal(ModelAdapter(bert)({**batch, "source_id": torch.ones(4, 7), "note": "x"}).logits, plain)

    net = build_vision_net("small_cnn", num_classes=2).eval()
    images = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])}
    expected = net(images["pixel_values"])
    assert torch.equal(ModelAdapter(net)({**images, "source_id": torch.ones(2)}).logits, expected)


def test_a_custom_module_gets_exactly_the_keys_its_forward_names():
    seen = {}

    class TwoInputs(torch.nn.Module):
        def forward(self, input_ids, mask):
            seen.update(input_ids=input_ids, mask=mask)
            return torch.zeros(input_ids.shape[0], 2)

    class ImageAndMask(torch.nn.Module):
        def forward(self, x, mask=None):
            seen.update(x=x, mask=mask)
            return torch.zeros(x.shape[0], 2)

    ids, mask, extra = torch.tensor([[1, 2]]), torch.tensor([[1, 0]]), torch.tensor([7])
    batch = {"input_ids": ids, "mask": mask, "attention_mask": mask, "labels": torch.tensor([1]),
             "index": torch.tensor([0]), "texts": ["a b"], "source_id": extra}
    assert ModelAdapter(TwoInputs())(batch).logits.shape == (1, 2)
    assert set(seen) == {"input_ids", "mask"} and seen["input_ids"] is ids and seen["mask"] is mask
    seen.clear()
    teacher_ids = torch.tensor([[9, 9]])
    ModelAdapter(TwoInputs(), teacher=True)({**batch, "teacher_input_ids": teacher_ids})
    assert seen["input_ids"] is teacher_ids
    seen.clear()
    pixels = torch.randn(1, 3, 4, 4)
    ModelAdapter(ImageAndMask())({"pixel_values": pixels, "mask": mask, "labels": torch.tensor([1])})
    assert seen["x"] is pixels and seen["mask"] is mask  # the image as its first argument, the named key by name
    with pytest.raises(KDForgeError, match="no model input"):
        ModelAdapter(ImageAndMask())({"mask": mask})


def test_a_hugging_face_forward_without_kwargs_gets_only_its_named_keys():
    seen = {}

    class Named(torch.nn.Module):
        config = type("C", (), {"_attn_implementation": "sdpa"})()

        def save_pretrained(self, *args):  # looks like an HF model to the adapter
            pass

        def forward(self, input_ids, attention_mask=None, labels=None, output_hidden_states=None,
                    output_attentions=None, return_dict=None):
            seen.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return type("O", (), {"logits": torch.zeros(1, 2)})()

    ModelAdapter(Named())({"input_ids": torch.tensor([[1]]), "attention_mask": torch.tensor([[1]]),
                           "labels": torch.tensor([0]), "source_id": torch.tensor([3])})
    assert seen["labels"] is None and seen["attention_mask"].tolist() == [[1]]  # labels stay out, as before


def test_a_module_that_reads_the_batch_gets_it_whole_and_unchanged():
    seen = []

    class ReadsBatch(torch.nn.Module):
        reads_batch = True

        def forward(self, batch):
            seen.append(batch)
            return torch.zeros(1, 2)

    batch = {"input_ids": torch.tensor([[1]]), "teacher_input_ids": torch.tensor([[9]]), "texts": ["a"],
             "labels": torch.tensor([0]), "source_id": torch.tensor([3])}
    ModelAdapter(ReadsBatch(), teacher=True)(batch)
    assert seen[0] is batch and batch["input_ids"].tolist() == [[1]]
