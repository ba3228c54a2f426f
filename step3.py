"""Step 3 - BatchNorm after every conv but the last (and the depthwise halves), a little dropout
after the pool."""
from runner import Step, main  # first: it quiets Ctrl-C while torch imports

import torch.nn as nn

from common import BlurPool, Recipe, conv_block, separable_block

TARGET = """
Step 2 is within budget, but its plain convs train slowly: each layer's input scale drifts as the
ones below it learn, and only a careful start (He scale) let it train at all. Keep the channels
and the training recipe, and:
- add BatchNorm after every conv but the last (the 1x1 that produces the class scores) and the
  depthwise halves of the split convs (their 1x1 halves are normalised), so each layer sees
  normalised inputs whatever the weights' scale, and the same LR makes faster progress (a few
  parameters more); PyTorch's default start is then enough;
- add a little dropout (5%) after the four split convs of the second block, where the maps are
  small: BatchNorm lets the model fit the training set much better, and this keeps it honest.
Aim: a clear rise in test accuracy over step 2 at nearly the same size, with a small train-test gap.
"""

NEXT = """the capacity is fixed by the budget, so feed it harder data (random rotations and
shifts) and let a one-cycle LR schedule settle the last epochs."""

RECIPE = Recipe(lr=0.01, schedule="constant", batch_size=128, dropout=0.05)


class Net(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.layers = nn.Sequential(
            conv_block(1, 8),                      # 28 -> 26, RF 3
            conv_block(8, 16),                     # 26 -> 24, RF 5
            BlurPool(16),                          # 24 -> 12, RF 8: a max at stride 1, a blur at stride 2
            separable_block(16, 30, dropout=dropout),  # 12 -> 10, RF 12; its 1x1 widens 16 to 30
            separable_block(30, dropout=dropout),  # 10 -> 8, RF 16
            separable_block(30, dropout=dropout),  # 8 -> 6, RF 20
            separable_block(30, dropout=dropout),  # 6 -> 4, RF 24
            nn.AdaptiveAvgPool2d(1),               # (N, 30, 4, 4) -> (N, 30, 1, 1)
            nn.Conv2d(30, 10, 1),                  # the last conv: no BatchNorm before the scores
            nn.Flatten(),                          # (N, 10, 1, 1) -> (N, 10)
            nn.LogSoftmax(dim=1))

    def forward(self, x):
        return self.layers(x)


if __name__ == "__main__":
    main(Step(3, Net, RECIPE, TARGET, NEXT))
