"""Training data: rows read from files or the Hub, their format detected, tokenized with loss masks,
and cut into the fixed batches every sweep trial and the probe share."""
