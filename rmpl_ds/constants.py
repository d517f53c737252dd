"""Constants shared by the data, model and training layers (a leaf module: it imports nothing)."""

# The label value a position carries when it is not trained on; the cross entropy ignores it (HF's convention).
IGNORE_INDEX = -100
