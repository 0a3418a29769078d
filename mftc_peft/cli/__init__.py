"""The `mftc-peft` command-line application (also `python -m mftc_peft`), apart from the library it drives.

`app` parses the arguments and runs the commands; `data` reads and checks the data files, `methods` builds the
adapters, `run` is the fine-tuning job, `output` the run folder. Only `main` is the package's interface.
"""

from .app import main

__all__ = ["main"]
