"""Step 2 - make it light: same skeleton, split 3x3 convs, fewer channels, global average pooling
at the output."""
from runner import Step, main  # first: it quiets Ctrl-C while torch imports

import torch.nn as nn

from common import BlurPool, Recipe, conv_block, separable_block

TARGET = """
Step 1's parameters are about 28 times the 10,000 budget, and most of them sit in its 4x4
output kernel. Keep the skeleton's places (the same receptive field on the same map sizes) and
the training recipe, and make the model light:
- replace the big output kernel by global average pooling and a 1x1 conv to the 10 classes;
- split each of the four 3x3 convs after the pool in two: a 3x3 within each channel
  (depthwise), then a 1x1 across channels. At 30 channels that is 270 + 900 weights a layer
  where a full 3x3 needs 8,100;
- let the first split conv's 1x1 do the transition's work: it takes the 16 channels of the pool
  to 30, so the 1x1 after the pool goes (its weights, and a 3x3 within 30 channels where 16
  suffice, would cost 1,086 parameters with BatchNorm);
- narrow the rest: 8 and 16 channels before the pool (the most right before it, at RF 5, where
  digit strokes are already detected);
- keep step 1's pool, which tolerates shifts: a max over each 2x2 window at stride 1, then a
  fixed blur at stride 2, no weights (a plain max-pool changes which pixel wins each window when
  the digit moves by one pixel);
- start every conv's weights at He scale (variance 2 / fan-in), which keeps the signal's size
  through each conv and ReLU: nothing is normalised yet, and at PyTorch's default scale the
  first split conv alone shrinks the signal's mean square about 10-fold.
Why this size: in a model search on held-out training images (train on the first 50,000,
measure on the last 10,000, with BatchNorm and step 4's way of training), full 3x3 convs at 10
channels (5,974 parameters with BatchNorm) stayed 0.035 below 14 channels (9,246) and then held
only 14 of 20 seeds on the test set. Split convs behind a plain max-pool held all 20 test seeds
at 5,726-5,956 parameters, but at a mean lowest-of-last-3 of 99.46-99.498, short of 99.50 (at
7,042: 99.503), and 22 channels (4,802) lost about 0.04 on held-out images. This skeleton gives
30 channels to three of the four split convs at 5,956, and the shift-tolerant pool raised it on
held-out images by 0.022 over the same weights behind a max-pool (standard error 0.012, seeds
1-6), the first change at this size that let it fit the shifted training images better.
logs/README.md gives every seed's number.
Aim: under 6,000 parameters with no overfitting, accepting a lower accuracy for now.
"""

NEXT = """normalise activations with BatchNorm so the small net trains faster and further,
and regularise a little if it then overfits."""

RECIPE = Recipe(lr=0.01, schedule="constant", batch_size=128)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            conv_block(1, 8, bn=False),        # 28 -> 26, RF 3
            conv_block(8, 16, bn=False),       # 26 -> 24, RF 5
            BlurPool(16),                      # 24 -> 12, RF 8: a max at stride 1, a blur at stride 2
            separable_block(16, 30, bn=False),  # 12 -> 10, RF 12; its 1x1 widens 16 to 30
            separable_block(30, bn=False),     # 10 -> 8, RF 16
            separable_block(30, bn=False),     # 8 -> 6, RF 20
            separable_block(30, bn=False),     # 6 -> 4, RF 24
            nn.AdaptiveAvgPool2d(1),           # (N, 30, 4, 4) -> (N, 30, 1, 1)
            nn.Conv2d(30, 10, 1),
            nn.Flatten(),                      # (N, 10, 1, 1) -> (N, 10)
            nn.LogSoftmax(dim=1))
        for m in self.layers[:-3].modules():  # He scale where a ReLU follows: the signal keeps its size
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        return self.layers(x)


if __name__ == "__main__":
    main(Step(2, Net, RECIPE, TARGET, NEXT))
