"""Step 1 - setup and skeleton: data, statistics, loaders, the train/test loop, and a
deliberately heavy version of the skeleton that every later step keeps."""
from runner import Step, main  # first: it quiets Ctrl-C while torch imports

import torch.nn as nn

from common import BlurPool, Recipe, conv_block

TARGET = """
Get the whole pipeline right before the model: read MNIST, measure its statistics (the
normalisation comes from them), iterate shuffled batches, train and test every epoch, log it.
Fix the skeleton that later steps keep: two 3x3 convs (RF 5, where strokes and edges show on
28x28 digits), a transition (a pool that tolerates shifts: the max over each 2x2 window at stride
1, then a fixed blur at stride 2; then a 1x1 conv), four unpadded 3x3 convs that shrink the 12x12
map to 4x4 (RF 24: a digit's 20x20 box, so the last layer sees whole digits), an output block.
Make it heavy on purpose (a 4x4 kernel of 480 channels over the last 4x4 map, about 285K
weights) to see the ceiling of this skeleton and how far it overfits, with no BatchNorm, no
augmentation and a constant LR.
"""

NEXT = """cut the parameters to under 10,000: fewer channels, and global average pooling
instead of the big output kernel, keeping the skeleton and the training recipe."""

RECIPE = Recipe(lr=0.01, schedule="constant", batch_size=128)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            conv_block(1, 8, bn=False),        # 28 -> 26, RF 3
            conv_block(8, 16, bn=False),       # 26 -> 24, RF 5
            BlurPool(16),                      # 24 -> 12, RF 8: a max at stride 1, a blur at stride 2
            conv_block(16, 16, kernel=1, bn=False),
            conv_block(16, 32, bn=False),      # 12 -> 10, RF 12
            conv_block(32, 32, bn=False),      # 10 -> 8, RF 16
            conv_block(32, 32, bn=False),      # 8 -> 6, RF 20
            conv_block(32, 32, bn=False),      # 6 -> 4, RF 24
            # The heavy output: one 4x4 kernel sees the whole map; most weights live here,
            # yet it runs once per image, so it is cheap in time.
            conv_block(32, 480, kernel=4, bn=False),  # 4 -> 1, RF 30
            nn.Conv2d(480, 10, 1),
            nn.Flatten(),                      # (N, 10, 1, 1) -> (N, 10)
            nn.LogSoftmax(dim=1))

    def forward(self, x):
        return self.layers(x)


if __name__ == "__main__":
    main(Step(1, Net, RECIPE, TARGET, NEXT))
