"""The user's mistakes, as one exception type.

`common.cli.run` turns a UsageError (and only it, with a missing optional package) into one `error:` line
and exit 2: bad flags, unreadable or mismatched weight files, missing data. Any other exception, a
ValueError from a bug included, keeps its traceback. It lives in models/, the lowest layer, because model
code reads the user's files too.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user, said in one line that names what to change."""


class MissingFile(UsageError, FileNotFoundError):
    """A file or folder the user named is not there (also a FileNotFoundError, as torchvision raises)."""


class MissingDependency(ImportError):
    """An optional package a task needs (mmsegmentation, scikit-learn, open_clip) is not installed: bad input,
    not a bug."""
