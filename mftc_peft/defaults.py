"""Defaults that `MFTCConfig` and the command line's help share: the help must print them without importing PEFT,
transformers or torch (seconds), and must not drift from the config."""

BUDGET = 0.03
WARMUP_STEPS = 12
# Half the budget in a low-rank part on every target weight, half in the warm-up's blocks (NOTES 86-91)
LOW_RANK_SHARE = 0.5
