"""Errors that end a command with a one-line message and a documented exit code.

Exit codes (the CLI's contract, also in README.md):
  0  success / verdict PASS
  1  verdict FAIL (a candidate does not match the reference)
  2  bad input or usage (malformed model file, impossible config, bad flag)
  3  a candidate could not run: an external engine failed (non-zero exit, timeout, missing or
     wrong-size output), or the C++ kernel failed to rebuild
  4  internal error (a bug in xvalid: please report it)
  130 interrupted (Ctrl-C)
"""

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_BAD_INPUT = 2
EXIT_ENGINE = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130


class XValidError(Exception):
    """Base class: the message is shown as-is on one line."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(XValidError):
    """An impossible model configuration (heads not dividing hidden, ...)."""


class ModelFileError(XValidError):
    """A model file that cannot be read: the message names the key, expected vs found."""


class InputError(XValidError):
    """Bad runtime inputs (ids out of range, mask of the wrong width, ...)."""


class EngineError(XValidError):
    """An external engine that did not produce usable output."""

    exit_code = EXIT_ENGINE


class BuildError(XValidError):
    """The C++ kernel did not compile (editable installs rebuild on import)."""

    exit_code = EXIT_ENGINE
