"""Step 4 - same model as step 3; random rotations and shifts, a one-cycle LR schedule, smaller
batches with a little weight decay, and a moving average of the weights for testing."""
from runner import Step, main  # first: it quiets Ctrl-C while torch imports

from common import Recipe
from step3 import RECIPE as STEP3_RECIPE
from step3 import Net  # the model is step 3's, unchanged; only how it is trained changes

TARGET = """
Step 3's model is the size we keep (5,858 parameters, chosen by the model search that step 2
describes), so the remaining gain must come from how it is trained:
- rotate each training image by its own random angle in +-7 degrees, and shift it by its own
  offset of up to 2 pixels in x and y: digits are written slanted and off-centre, and the test
  set has them too. Both make the train set harder than the test set, so the model cannot simply
  memorise it; both run batched on the device, costing almost no time;
- train with a one-cycle LR schedule (warm up to a peak of 0.05, then anneal towards zero): the
  high LR early explores, the annealed tail settles the weights. The peak is half what the
  9,246-parameter model used: in the model search, a model of this size with full 3x3 convs (10
  channels) stalled at 99.21 from epoch 5 on, where the LR peaks, on one of six held-out runs
  with a peak of 0.1 (and lighter augmentation), and reached 99.47 with 0.05; the split-conv
  model was trained at 0.05 only;
- batches of 64 instead of 128 (twice the updates in the same 15 epochs, each a little noisier)
  and weight decay 1e-4, which keeps the small net's weights from growing in the long tail;
- drop the dropout: augmentation now does the regularising, and dropout slows training;
- test and save a moving average of the weights (and of BatchNorm's statistics), updated every
  step with decay 0.998, not the weights of the last step: single epochs dip in the annealing
  tail, and the average smooths those last steps out.
Aim: >= 99.40 in each of the last 3 of 15 epochs for every seed, with margin: the lowest of the
last 3 at 99.50 on average over 20 seeds, as the 9,246-parameter model had it (20 of 20 seeds,
mean 99.53). On held-out images this model matched that one, seed by seed: +0.005 (standard
error 0.018, seeds 1-6), where full 3x3 convs at 10 channels stayed 0.035 below it and then held
only 14 of 20 seeds on the test set; the 20 seeds on the test set are the check. The selection
runs are in logs/README.md.
"""

NEXT = """the bar holds at 5,858 parameters; what is left is the same margin at 5,000 or fewer,
with the same split convs at 22 channels (4,802 parameters) as the first candidate."""

RECIPE = Recipe(lr=0.05, schedule="onecycle", batch_size=64, weight_decay=1e-4, max_rotation=7.0,
                max_shift=2.0, dropout=0.0, ema_decay=0.998)

# This step's changes against step 3, each the recipe fields that --ablate sets back to step 3's.
CHANGES = {name: {field: getattr(STEP3_RECIPE, field) for field in fields} for name, fields in {
    "augmentation": ("max_rotation", "max_shift"), "LR schedule": ("schedule", "lr"),
    "batch 64 and weight decay": ("batch_size", "weight_decay"), "dropping dropout": ("dropout",),
    "weight averaging": ("ema_decay",)}.items()}

if __name__ == "__main__":
    main(Step(4, Net, RECIPE, TARGET, NEXT, CHANGES))
