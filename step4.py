"""Step 4 - same model as step 3; light random rotations and shifts, a one-cycle LR schedule,
smaller batches with a little weight decay, and a moving average of the weights for testing."""
from runner import Step, main  # first: it quiets Ctrl-C while torch imports

from common import Recipe
from step3 import RECIPE as STEP3_RECIPE
from step3 import Net  # the model is step 3's, unchanged; only how it is trained changes

TARGET = """
Step 3's model is the size we keep (5,974 parameters, chosen by the model search that step 2
describes), so the remaining gain must come from how it is trained:
- rotate each training image by its own random angle in +-5 degrees, and shift it by its own
  offset of up to 1 pixel in x and y: digits are written slanted and off-centre, and the test
  set has them too. Kept light on purpose: with +-7 degrees and 2 pixels, the setting a
  9,246-parameter model held every seed with, this model trained at 99.2% on its augmented
  batches against 99.4% on held-out images - it underfit - and on held-out images the lighter
  setting raised its lowest of the last 3 by 0.065 on 4 seeds, 3 of them up and none down
  (+-3 degrees was worse again);
- train with a one-cycle LR schedule (warm up to a peak of 0.05, then anneal towards zero): the
  high LR early explores, the annealed tail settles the weights. The peak is half what the
  9,246-parameter model used: with 0.1, one of six held-out runs of this model stalled at 99.22
  from epoch 5 on, where the LR peaks, while the wider model had no such seed; at 0.05 that seed
  reached 99.47;
- batches of 64 instead of 128 (twice the updates in the same 15 epochs, each a little noisier)
  and weight decay 1e-4, which keeps the small net's weights from growing in the long tail;
- drop the dropout: augmentation now does the regularising, and dropout slows training;
- test and save a moving average of the weights (and of BatchNorm's statistics), updated every
  step with decay 0.998, not the weights of the last step: single epochs dip in the annealing
  tail, and the average smooths those last steps out.
Aim: >= 99.40 in each of the last 3 of 15 epochs for every seed, with margin: the lowest of the
last 3 at 99.50 on average over 20 seeds, as the 9,246-parameter model had it (20 of 20 seeds,
mean 99.53). On held-out images this model scored 0.035 below that one, seed by seed (standard
error 0.027, seeds 1-6; one weak seed, 6, makes most of it): a small deficit, which the 20 seeds
on the test set must show is affordable. The selection runs are in logs/README.md.
"""

NEXT = """the bar holds at 5,974 parameters; what is left is the same margin at 5,000 or fewer,
where this skeleton with 8 channels after the transition (4,794) lost 0.16 on held-out images."""

RECIPE = Recipe(lr=0.05, schedule="onecycle", batch_size=64, weight_decay=1e-4, max_rotation=5.0,
                max_shift=1.0, dropout=0.0, ema_decay=0.998)

# This step's changes against step 3, each the recipe fields that --ablate sets back to step 3's.
CHANGES = {name: {field: getattr(STEP3_RECIPE, field) for field in fields} for name, fields in {
    "augmentation": ("max_rotation", "max_shift"), "LR schedule": ("schedule", "lr"),
    "batch 64 and weight decay": ("batch_size", "weight_decay"), "dropping dropout": ("dropout",),
    "weight averaging": ("ema_decay",)}.items()}

if __name__ == "__main__":
    main(Step(4, Net, RECIPE, TARGET, NEXT, CHANGES))
