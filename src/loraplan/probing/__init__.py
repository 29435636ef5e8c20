"""Measure before training: where the model wants to change on the user's data, and in how many
directions, from a few gradient batches."""
