"""Step 4 - same model as step 3; random rotations and shifts, and a one-cycle LR schedule."""
from common import Recipe, main
from step3 import Net  # the model is step 3's, unchanged; only how it is trained changes

TARGET = """
Step 3's model is the size we keep: the budget leaves little room to grow it, so the remaining
gain must come from how it is trained:
- rotate each training image by its own random angle in +-7 degrees: some digits are written
  slanted, and the test set has them too;
- shift each training image by its own random offset of up to 2 pixels in x and y: digits are
  not all centred the same way. Both make the train set harder than the test set, so the model
  cannot simply memorise it; both run batched on the device, costing almost no time;
- train with a one-cycle LR schedule (warm up to a peak of 0.1, then anneal towards zero): the
  high LR early explores, the annealed tail settles the weights, so the last epochs stop moving;
- drop the dropout: augmentation now does the regularising, and dropout slows training.
Aim: >= 99.40 in each of the last 3 of 15 epochs, for every seed we try.
Why 8,826 parameters and not the 8,000 stretch: while choosing this recipe, a 7,766-parameter
version dipped below 99.40 within its last 3 epochs on several seeds (scratch runs, listed in the
README), and an 8,502-parameter one (10 channels after the transition) held 4 of 5 seeds, seed 5
falling to 99.30 (logs/superseded/step4_seeds_8502_v1.log); 2 more channels there bought the margin.
"""

RECIPE = Recipe(lr=0.1, schedule="onecycle", batch_size=128, max_rotation=7.0, max_shift=2.0,
                dropout=0.0)

# This step's changes against step 3, each a set of recipe fields that --ablate reverts together.
CHANGES = {"rotation": ("max_rotation",), "shift": ("max_shift",), "LR schedule": ("schedule", "lr"),
           "dropping dropout": ("dropout",)}

if __name__ == "__main__":
    main(4, Net, RECIPE, TARGET, changes=CHANGES)
