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

import json

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


# ---------------------------------------------------------------------------------------------
# quoting a hostile file in a message

QUOTE_CHARS = 40  # text quoted from a file is cut to this many characters, "..." ending the cut


def cut(text: str) -> str:
    """`text` if short, else its start and "...": a message line stays short."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS - 3] + "..."


def brief(value) -> str:
    """A parsed JSON value written as JSON and cut short for a one-line message. At most three
    levels of lists and dicts are walked, and walking stops once the text is long enough, so
    the cost is bounded however large the value. The C++ loader writes the same text
    (csrc/io/model_file.cpp, brief)."""
    parts: list[str] = []
    length = 0

    def add(text: str) -> None:
        nonlocal length
        parts.append(text)
        length += len(text)

    def walk(value, levels: int) -> None:
        if isinstance(value, str):
            add(json.dumps(value[:QUOTE_CHARS + 1], ensure_ascii=False))
        elif isinstance(value, (list, dict)):
            is_dict = isinstance(value, dict)
            add("{" if is_dict else "[")
            if levels == 0 and value:
                add("...")
            for index, item in enumerate(value.items() if is_dict else value):
                if levels == 0 or length > QUOTE_CHARS:
                    break
                if index:
                    add(", ")
                if is_dict:
                    key, item = item
                    add(json.dumps(key[:QUOTE_CHARS + 1], ensure_ascii=False) + ": ")
                walk(item, levels - 1)
            add("}" if is_dict else "]")
        else:  # a number, true, false or null
            add(json.dumps(value))

    walk(value, 3)
    return cut("".join(parts))
