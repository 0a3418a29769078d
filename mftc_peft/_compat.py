"""Version gate: the PEFT internals MFTC relies on were verified on the versions below, and the tests cover them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))  # [lower, upper)


def check_peft_version() -> None:
    try:
        installed = Version(version("peft"))
    except PackageNotFoundError:
        raise ImportError("mftc-peft needs PEFT: install `peft>=0.21,<0.22`.") from None
    lower, upper = SUPPORTED_PEFT
    if not lower <= Version(installed.base_version) < upper:
        raise ImportError(
            f"mftc-peft supports peft>={lower},<{upper} (the versions its tests cover), but peft {installed} is "
            f"installed. Install a supported version: pip install 'peft>={lower},<{upper}'."
        )
