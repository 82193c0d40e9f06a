"""The one user-facing error type, and its kinds.

Anything raised as a ``CogvxError`` is the user's to fix (a flag, a file, a folder) and its message says
how; the CLI prints it as one line. Every other exception is a bug or a failure below cogvx and keeps
its traceback.
"""

from __future__ import annotations


class CogvxError(Exception):
    """An error the user can fix; the message names the file or flag and what to do."""


class ConfigError(CogvxError):
    """A setting (flag or config-file value) that cannot be used."""


class InputError(CogvxError):
    """Input data (videos, captions, metadata files, prompts, images) that cannot be used."""


class ModelError(CogvxError):
    """A model name, folder or component that cannot be used for this job."""


class CacheError(CogvxError):
    """A cache folder that cannot be used as it is."""


class RunError(CogvxError):
    """A run folder (checkpoints, validation latents, metrics) that cannot be used or written."""
