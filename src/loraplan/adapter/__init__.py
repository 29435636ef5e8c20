"""After training: a PEFT adapter folder read back, its spectra analyzed, compressed by SVD
truncation, and merged into its base."""
