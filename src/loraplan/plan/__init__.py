"""Decide and size: a `LoraPlan`, its exact parameter count and peak memory, the recommended plan,
and the configuration files of PEFT, axolotl, LLaMA-Factory and torchtune, read and written."""
