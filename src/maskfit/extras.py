"""Optional packages: imported where a command needs them, or one error naming the extra that installs them.

A plain ``pip install maskfit`` trains and samples; evaluation, the sweep plot, the dopri5 sampler and the
SD-VAE need packages from the extras in pyproject.toml (``maskfit[eval]``, ``[dopri5]``, ``[vae]``).
"""
from __future__ import annotations

import importlib
from types import ModuleType

# Top-level package -> the extra of pyproject.toml that installs it.
EXTRA_OF = {"scipy": "eval", "matplotlib": "eval", "torchdiffeq": "dopri5", "diffusers": "vae"}


class MissingPackageError(ImportError, RuntimeError):
    """An optional package a command needs is not installed. An ImportError for library callers; also a
    RuntimeError, which the CLI prints as one line (it shows tracebacks for other ImportErrors: bugs)."""


def require(module: str, purpose: str, otherwise: str = "") -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`MissingPackageError` saying what to install.

    purpose: what needs it ("the Fréchet distance"); otherwise: an alternative that needs no install.
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRA_OF[top]
        raise MissingPackageError(
            f"{purpose} needs {top}, which cannot be imported ({err}): pip install 'maskfit[{extra}]' "
            f"(or pip install {top}){'; ' + otherwise if otherwise else ''}"
        ) from err
