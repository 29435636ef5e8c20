"""Autograd pieces that keep less memory with the same gradients: a causal-LM loss without fp32
logits, and saved tensors recomputed in the backward pass. Torch only; no files, no models loaded."""
