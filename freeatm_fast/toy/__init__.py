"""The tiny text-to-image model of the toy world (issue #8): model, training, shipped weights."""
