"""`TrainingError`: training diverged. Apart from `run.py` (which imports torch) so that `app.py` can catch it
while `--help` and the argument checks stay light."""


class TrainingError(ValueError):
    """Training diverged (one-line message); nothing is written."""
