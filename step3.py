"""Step 3 - BatchNorm after every conv but the last (and the depthwise halves), one for each use
of the shared conv, a little dropout after the pool."""
from runner import Step, main  # first: it quiets Ctrl-C while torch imports

import torch.nn as nn

from common import Recipe, SharedSplitConv, conv_block

TARGET = """
Step 2 is within budget, but its plain convs train slowly: each layer's input scale drifts as the
ones below it learn, and only a careful start (He scale) let it train at all. Keep the channels
and the training recipe, and:
- add BatchNorm after every conv but the last (the 1x1 that produces the class scores) and the
  depthwise halves of the split conv (its 1x1 half is normalised), so each layer sees normalised
  inputs whatever the weights' scale, and the same LR makes faster progress (a few parameters
  more); the shared split conv gets a BatchNorm of its own at each of its four uses, since each
  depth sees activations of another scale. PyTorch's default start is then enough;
- add a little dropout (5%) after each of the four uses of the shared split conv, where the maps
  are small: BatchNorm lets the model fit the training set much better, and this keeps it honest.
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
            nn.MaxPool2d(2),                       # 24 -> 12, RF 6
            conv_block(16, 49, kernel=1),
            SharedSplitConv(49, uses=4, dropout=dropout),  # 12 -> 10 -> 8 -> 6 -> 4, RF 10, 14, 18, 22
            nn.AdaptiveAvgPool2d(1),               # (N, 49, 4, 4) -> (N, 49, 1, 1)
            nn.Conv2d(49, 10, 1),                  # the last conv: no BatchNorm before the scores
            nn.Flatten(),                          # (N, 10, 1, 1) -> (N, 10)
            nn.LogSoftmax(dim=1))

    def forward(self, x):
        return self.layers(x)


if __name__ == "__main__":
    main(Step(3, Net, RECIPE, TARGET, NEXT))
