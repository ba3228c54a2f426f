"""Step 4 - same model as step 3; random rotations and shifts, a one-cycle LR schedule, smaller
batches with a little weight decay, and a moving average of the weights for testing."""
from runner import Step, main  # first: it quiets Ctrl-C while torch imports

from common import Recipe
from step3 import RECIPE as STEP3_RECIPE
from step3 import Net  # the model is step 3's, unchanged; only how it is trained changes

TARGET = """
Step 3's model is the size we keep (9,246 parameters: the budget leaves little room to grow it),
so the remaining gain must come from how it is trained:
- rotate each training image by its own random angle in +-7 degrees, and shift it by its own
  offset of up to 2 pixels in x and y: digits are written slanted and off-centre, and the test
  set has them too. Both make the train set harder than the test set, so the model cannot simply
  memorise it; both run batched on the device, costing almost no time;
- train with a one-cycle LR schedule (warm up to a peak of 0.1, then anneal towards zero): the
  high LR early explores, the annealed tail settles the weights;
- batches of 64 instead of 128 (twice the updates in the same 15 epochs, each a little noisier)
  and weight decay 1e-4, which keeps the small net's weights from growing in the long tail;
- drop the dropout: augmentation now does the regularising, and dropout slows training;
- test and save a moving average of the weights (and of BatchNorm's statistics), updated every
  step with decay 0.998, not the weights of the last step: at epoch 13 the one-cycle LR is still
  0.009, and single epochs dip there; the average smooths those last steps out.
Aim: >= 99.40 in each of the last 3 of 15 epochs for every seed, with margin: the lowest of the
last 3 at 99.50 on average over 20 seeds. Without the average, this recipe held 18 of 20 seeds
on this CPU (mean lowest-of-last-3 99.48, final 99.54); both misses dipped at epoch 13 (99.38,
99.39) and recovered by epoch 15. On held-out training images (train on the first 50,000,
measure on the last 10,000, seeds 1-4; the average and the weights as trained tested in the same
runs), the average moved the mean lowest-of-last-3 from 99.45 to 99.50 and the mean of the last 3
from 99.48 to 99.51; seed by seed +0.01, +0.04, +0.12, +0.02 on the lowest (1.9 standard errors):
a lead, not proof; the 20 seeds on the test set are the check. The selection runs are in the
README.
"""

NEXT = """the bar holds; what is left is the stretch goal: the same margin at 8,000 parameters
or fewer."""

RECIPE = Recipe(lr=0.1, schedule="onecycle", batch_size=64, weight_decay=1e-4, max_rotation=7.0,
                max_shift=2.0, dropout=0.0, ema_decay=0.998)

# This step's changes against step 3, each the recipe fields that --ablate sets back to step 3's.
CHANGES = {name: {field: getattr(STEP3_RECIPE, field) for field in fields} for name, fields in {
    "augmentation": ("max_rotation", "max_shift"), "LR schedule": ("schedule", "lr"),
    "batch 64 and weight decay": ("batch_size", "weight_decay"), "dropping dropout": ("dropout",),
    "weight averaging": ("ema_decay",)}.items()}

if __name__ == "__main__":
    main(Step(4, Net, RECIPE, TARGET, NEXT, CHANGES))
