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
