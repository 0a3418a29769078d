"""Defaults that `MFTCConfig` and the command line's help share: the help must print them without importing PEFT,
transformers or torch (seconds), and must not drift from the config."""

BUDGET = 0.03
# Warm-up micro-batches: 4 since benchmarks/results/NOTES.md 99 (12 before). Next to the low-rank part a quarter of the
# benchmarks' 16 tied them within noise on both lab tasks, at a quarter of the cost.
WARMUP_STEPS = 4
# Half the budget in a low-rank part on every target weight, half in the warm-up's blocks (NOTES 86-91)
LOW_RANK_SHARE = 0.5
