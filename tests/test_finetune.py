"""Fine-tuning's layer groups (carprune.finetune.layer_groups): the compressed layer with its
channel-wise followers, and the layers that read its channels (`graph.LayerAnalysis.readers`),
on the CIFAR ResNet-20's residual streams and option-A padding shortcuts; and `finetune` training
exactly those groups at their learning rates."""

from __future__ import annotations

import pytest
import torch

import carprune as cp
from carprune.finetune import layer_groups

RESNET20 = cp.models.resnet_cifar(20).eval()


@pytest.mark.parametrize("layer, own, nxt", [
    # the stem feeds stage 1's residual stream: every block of stage 1 and stage 2's first conv
    # read it; stage 2's later blocks read it only through layer2.0's padding shortcut
    ("conv1", {"conv1", "bn1", "relu"},
     {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"}),
    ("layer1.0.conv2", {"layer1.0.conv2", "layer1.0.bn2"},
     {"layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"}),
    ("layer2.1.conv2", {"layer2.1.conv2", "layer2.1.bn2"}, {"layer2.2.conv1", "layer3.0.conv1"}),
    # a block's first conv: its block's second conv alone
    ("layer2.0.conv1", {"layer2.0.conv1", "layer2.0.bn1", "layer2.0.relu1"}, {"layer2.0.conv2"}),
    # the last stream reaches the classifier through pooling and flatten
    ("layer3.2.conv2", {"layer3.2.conv2", "layer3.2.bn2"}, {"linear"}),
])
def test_groups_follow_channels_and_stop_at_padding_shortcuts(layer, own, nxt):
    assert layer_groups(RESNET20, [layer]) == (own, nxt)


def test_groups_of_several_layers_exclude_each_other():
    own, nxt = layer_groups(RESNET20, ["layer2.0.conv1", "layer2.0.conv2"])
    assert {"layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2"} <= own
    assert nxt == {"layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1"}   # not layer2.0.conv2


def test_finetune_trains_the_groups_at_their_rates():
    """lr 0 for the layer and for the others, 1e-3 for the readers: only the readers move."""
    torch.manual_seed(0)
    model = cp.models.resnet_cifar(20).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    cfg = cp.FineTune(train_data=(x, y), iters=2, batch_size=8, lr_layer=0.0, lr_next=1e-3,
                      lr_other=0.0)
    cp.finetune(model, "layer1.0.conv2", cfg)
    moved = {k.rsplit(".", 1)[0] for k, v in model.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])}
    assert moved == {"layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"}
