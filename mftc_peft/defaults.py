"""Defaults that `MFTCConfig` and the command line's help share: the help must print them without importing PEFT,
transformers or torch (seconds), and must not drift from the config."""

BUDGET = 0.03
WARMUP_STEPS = 12
