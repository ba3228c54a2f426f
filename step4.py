"""Step 4 - same model as step 3; random rotations and shifts, a one-cycle LR schedule, and smaller
batches with a little weight decay."""
from common import Recipe, Step, main  # first: it quiets Ctrl-C during imports
from step3 import RECIPE as STEP3_RECIPE
from step3 import Net  # the model is step 3's, unchanged; only how it is trained changes

TARGET = """
Step 3's model is the size we keep: the budget leaves little room to grow it, so the remaining
gain must come from how it is trained:
- rotate each training image by its own random angle in +-7 degrees, and shift it by its own
  offset of up to 2 pixels in x and y: digits are written slanted and off-centre, and the test
  set has them too. Both make the train set harder than the test set, so the model cannot simply
  memorise it; both run batched on the device, costing almost no time;
- train with a one-cycle LR schedule (warm up to a peak of 0.1, then anneal towards zero): the
  high LR early explores, the annealed tail settles the weights, so the last epochs stop moving;
- batches of 64 instead of 128 (twice the updates in the same 15 epochs, each a little noisier)
  and weight decay 1e-4, which keeps the small net's weights from growing in the long tail;
- drop the dropout: augmentation now does the regularising, and dropout slows training.
Aim: >= 99.40 in each of the last 3 of 15 epochs for every seed, with margin: the lowest of the
last 3 at 99.50 on average over 20 seeds. The batch and weight decay are new in this version: on
an H100, 16 seeds each, batch 128 without weight decay held 14 of 16 (mean lowest-of-last-3
99.45), batch 64 with weight decay 1e-4 held 16 of 16 (99.49); the validation runs that checked
it on the CPU are listed in the README.
"""

NEXT = """the bar holds; what is left is the stretch goal: the same margin at 8,000 parameters
or fewer."""

RECIPE = Recipe(lr=0.1, schedule="onecycle", batch_size=64, weight_decay=1e-4, max_rotation=7.0,
                max_shift=2.0, dropout=0.0)

# This step's changes against step 3, each the recipe fields that --ablate sets back to step 3's.
CHANGES = {name: {field: getattr(STEP3_RECIPE, field) for field in fields} for name, fields in {
    "augmentation": ("max_rotation", "max_shift"), "LR schedule": ("schedule", "lr"),
    "batch 64 and weight decay": ("batch_size", "weight_decay"), "dropping dropout": ("dropout",)}.items()}

if __name__ == "__main__":
    main(Step(4, Net, RECIPE, TARGET, NEXT, CHANGES))
