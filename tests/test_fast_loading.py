"""The loaders' fast JSON path against their plain one (docs/model-format.md, "Load times").

Both loaders decode a file's long "data" strings straight from its text and parse only the
rest: the Python reader with pybase64 (modelfile._parse_skipping), the C++ loader with its own
decoder (csrc/io/base64.cpp, model_file.cpp). Whatever the file, that must give exactly what
parsing all of it gives (modelfile._parse_text(skipping=False), xvalid._core._load_text(
whole=True)): the same tensors, meta and config, or the same message. The files: the tiny
model with its data strings damaged at every position mod 4 (start, middle, end), padding
variants, escapes, whitespace and control bytes inside them, their keys spelled or placed
otherwise, duplicated, and random damage; and files larger than the C++ loader's scan window.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xvalid import modelfile
from xvalid.errors import ModelFileError

core = pytest.importorskip("xvalid._core")
WINDOW = 8 << 20  # the C++ loader scans the text in windows of this many bytes (load_json)


def python_outcome(text: bytes, skipping: bool) -> str:
    """'loaded <digest of every tensor, the config and meta>' or the message, as read_model
    gives it for a file holding `text`."""
    path = Path("m.json")
    try:
        mf = modelfile.parse_model(modelfile._parse_text(text, path, skipping=skipping))
    except ModelFileError as exc:
        return str(exc)
    digest = hashlib.sha256()
    for key, array in modelfile.named_tensors(mf):
        digest.update(key.encode() + array.dtype.str.encode() + str(array.shape).encode() + array.tobytes())
    digest.update(json.dumps([mf.config.to_json(), mf.meta], sort_keys=True).encode())
    return "loaded " + digest.hexdigest()


def cpp_outcome(text: bytes, whole: bool) -> str:
    try:
        tensors = core._load_text(text, "m.json", whole)
    except core.ModelFileError as exc:
        return str(exc)
    return "loaded " + hashlib.sha256(b"".join(len(t).to_bytes(8, "little") + t for t in tensors)).hexdigest()


def outcomes(text: bytes) -> dict[str, str]:
    out = {"python fast": python_outcome(text, True), "python plain": python_outcome(text, False),
           "c++ fast": cpp_outcome(text, False), "c++ plain": cpp_outcome(text, True)}
    return out


def disagreements(files: dict[str, bytes]) -> tuple[list[str], dict[str, int]]:
    """Files on which a loader's fast and plain parses differ, or the two loaders' verdicts do;
    and how many were loaded and refused."""
    bad, seen = [], {"loaded": 0, "refused": 0}
    for name, text in files.items():
        o = outcomes(text)
        if o["python fast"] != o["python plain"] or o["c++ fast"] != o["c++ plain"]:
            bad.append(f"{name}: {o}")
        elif o["python fast"].startswith("loaded ") != o["c++ fast"].startswith("loaded "):
            bad.append(f"{name}: the loaders disagree: {o}")
        seen["loaded" if o["python fast"].startswith("loaded ") else "refused"] += 1
    return bad, seen


@pytest.fixture(scope="module")
def base(tiny_model) -> bytes:
    return tiny_model.read_bytes()


def data_strings(text: bytes, at_least: int = modelfile.DECODE_EARLY_CHARS) -> list[tuple[int, int]]:
    """[begin, end) of each "data" string's content that the fast path decodes, found here
    independently of the loaders' scanners."""
    return [m.span(1) for m in re.finditer(rb'"data": "([^"]*)"', text) if m.end(1) - m.start(1) >= at_least]


def test_the_fast_path_decodes_the_tiny_models_tensors(base):
    """Not a fallback in disguise: the long strings arrive decoded, the short ones as text."""
    doc = modelfile._parse_text(base, Path("m.json"))
    assert isinstance(doc["weights"]["tok_embedding"]["data"], modelfile.DecodedText)
    assert isinstance(doc["weights"]["final_rms"]["data"], str)  # 64 floats: 344 characters
    assert len(data_strings(base)) >= 10
    plain = json.loads(base)["weights"]["tok_embedding"]["data"]
    assert doc["weights"]["tok_embedding"]["data"].raw == base64.b64decode(plain)
    assert len(doc["weights"]["tok_embedding"]["data"]) == len(plain)


REPLACEMENTS = {
    "equals": b"=", "backslash": b"\\", "quote": b'"', "newline": b"\n", "space": b" ", "tab": b"\t",
    "control": b"\x01", "nul": b"\x00", "byte-ff": b"\xff", "utf8-e-acute": "\u00e9".encode(),
    "dash": b"-", "underscore": b"_", "bracket": b"[", "brace": b"}", "colon": b":",
    "escaped-slash": b"\\/", "escaped-A": b"\\u0041", "escaped-newline": b"\\n", "two-chars": b"AB",
}


def test_damage_inside_a_data_string_at_every_position_mod_4(base):
    """Each replacement at the first four, four middle and last four characters of a long
    string: the body the fast decoders check in bulk, and the last quad, where padding may be."""
    begin, end = data_strings(base)[0]
    middle = (begin + end) // 2 // 4 * 4
    positions = [begin + i for i in range(4)] + [middle + i for i in range(4)] + [end - 4 + i for i in range(4)]
    files = {f"{name}@{pos - begin}": base[:pos] + rep + base[pos + 1:]
             for pos in positions for name, rep in REPLACEMENTS.items()}
    bad, seen = disagreements(files)
    assert not bad, "\n".join(bad)
    assert seen["loaded"] and seen["refused"], seen  # "\/" for "/" keeps it valid, and so on


def test_padding_and_length_variants(base):
    begin, end = data_strings(base)[1]
    ends = {"drop-1": b"", "drop-2": b"", "pad-1": b"=", "pad-2": b"==", "pad-3": b"===", "pad-4": b"====",
            "pad-then-letter": b"=A", "letter-pad-letter": b"A=A", "extra-quad": b"AAAA", "extra-pad-quad": b"AA==",
            "extra-2": b"AA"}
    cut = {"drop-1": 1, "drop-2": 2, "pad-1": 1, "pad-2": 2, "pad-3": 3, "pad-4": 4, "pad-then-letter": 2,
           "letter-pad-letter": 3, "extra-quad": 0, "extra-pad-quad": 0, "extra-2": 0}
    files = {name: base[:end - cut[name]] + tail + base[end:] for name, tail in ends.items()}
    files["padded-in-the-middle"] = base[:begin + 2] + b"==" + base[begin + 4:]
    bad, _ = disagreements(files)
    assert not bad, "\n".join(bad)


def test_data_strings_placed_or_keyed_otherwise(base):
    """The scanners find `"data": "<long string>"` by its spelling; anything else is left to
    the parser, and a decoded string that is not where tensors are read is not used."""
    (begin, end), (begin2, end2) = data_strings(base)[:2]
    key = base.rfind(b'"data"', 0, begin)
    long_text = base[begin:end]
    files = {
        "key-escaped": base[:key] + b'"d\\u0061ta"' + base[key + 6:],
        "key-other-spelling": base[:key] + b'"Data"' + base[key + 6:],
        "whitespace-around-colon": base[:key + 6] + b" \n\t : \r\n " + base[begin - 1:],
        "no-colon": base[:begin - 3] + base[begin - 2:],
        "two-colons": base[:begin - 2] + b":" + base[begin - 2:],
        "in-an-array": base[:begin - 1] + b'["' + long_text + b'"]' + base[end + 1:],
        "a-number-instead": base[:begin - 1] + b"12" + base[end + 1:],
        "duplicated-data-key": base[:end + 1] + b', "data": "' + base[begin2:end2] + b'"' + base[end + 1:],
        "duplicated-data-key-bad": base[:end + 1] + b', "data": "' + long_text[:-1] + b'*"' + base[end + 1:],
        "unterminated": base[:end] + base[end + 1:],
        "cut-inside": base[:(begin + end) // 2],
        "quote-escaped-before-key": base[:key] + b'"x\\"' + base[key + 1:],
        "meta-data": base.replace(b'"meta":{', b'"meta":{"data": "' + long_text + b'", ', 1),
        "meta-nested-data": base.replace(b'"meta":{', b'"meta":{"x": {"data": "' + long_text + b'"}, ', 1),
        "config-data": base.replace(b'"config":{', b'"config":{"data": "' + long_text + b'", ', 1),
        "top-level-data": b'{"data": "' + long_text + b'", ' + base[1:],
        "inside-another-string": base.replace(b'"meta":{', b'"meta":{"s": "\\"data\\": \\"' + long_text + b'\\"", ', 1),
        "as-a-key": base.replace(b'"meta":{', b'"meta":{"' + long_text + b'": 1, ', 1),
        "number-overflow-elsewhere": base.replace(b'"seed":123', b'"seed":1e999', 1),
        "bad-utf8-elsewhere": base.replace(b'"meta":{', b'"meta":{"x": "\xc3\x28", ', 1),
        "utf8-bom": b"\xef\xbb\xbf" + base,
        "utf16-bom": b"\xff\xfe" + base,
        "trailing-junk": base + b"x",
        "two-documents": base + base,
    }
    bad, seen = disagreements(files)
    assert not bad, "\n".join(bad)
    assert seen["loaded"] >= 8 and seen["refused"] >= 8, seen


def test_meta_keeps_a_long_data_string_as_text(base, tmp_path):
    """A string the fast path decoded but that is not a tensor's comes back as the text it was."""
    begin, end = data_strings(base)[0]
    path = tmp_path / "m.json"
    path.write_bytes(base.replace(b'"meta":{', b'"meta":{"data": "' + base[begin:end] + b'", ', 1))
    assert modelfile.read_model(path).meta["data"] == base[begin:end].decode()


def test_random_damage(base):
    rng = random.Random(2024)
    spans = data_strings(base)
    files = {}
    for k in range(120):
        data = bytearray(base)
        if k % 2:  # a few bytes inside the long strings, from the characters that matter there
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(*rng.choice(spans))] = rng.choice(b'=\\"\n -_A/+\x00\xff\x7f')
        else:  # anywhere
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        files[f"random-{k}"] = bytes(data)
    bad, _ = disagreements(files)
    assert not bad, "\n".join(bad)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="AQgw+/=-_ \n\\\"\u00e9\x00", max_size=24))
def test_fast_base64_accepts_only_what_base64_accepts(text):
    """modelfile._fast_b64decode (pybase64) may refuse more than base64.b64decode(validate=True),
    never less, and gives the same bytes: a refused text goes to base64 for its message."""
    fast = modelfile._fast_b64decode(text)
    if fast is not None:
        assert fast == base64.b64decode(text, validate=True)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_fast_base64_decodes_what_the_writer_writes(raw):
    text = base64.b64encode(raw)
    assert modelfile._fast_b64decode(text) == raw
    assert modelfile._fast_b64decode(memoryview(text)) == raw
    assert modelfile._fast_b64decode(text.decode()) == raw


# ---- files larger than the C++ loader's scan window -------------------------------------------

def padded_to_window(base: bytes, target: int) -> bytes:
    """`base` with a meta string long enough that byte `target` of the tiny model's first long
    data string falls on the C++ loader's first window boundary."""
    begin, _ = data_strings(base)[0]
    filler = WINDOW - (begin + target) - len(b'"pad": "", ')
    assert filler > 0
    return base.replace(b'"meta":{', b'"meta":{"pad": "' + b"x" * filler + b'", ', 1)


@pytest.mark.parametrize("target", [0, 1, 3, 4, 5000])
def test_a_data_string_across_the_scan_window(base, target):
    text = padded_to_window(base, target)
    begin, _ = data_strings(text)[0]
    assert begin + target == WINDOW
    o = outcomes(text)
    assert o["c++ fast"] == o["c++ plain"] and o["c++ fast"].startswith("loaded "), o
    assert o["python fast"] == o["python plain"] and o["python fast"].startswith("loaded "), o


@pytest.mark.parametrize("shift", [-2, -1, 0, 1])
@pytest.mark.parametrize("backslashes", [1, 2, 3])
def test_backslashes_across_the_scan_window(tmp_path, shift, backslashes):
    """A run of backslashes before a quote, split by the window boundary: the C++ scan carries
    the count over, and both loaders find the same too deep bracket (or none)."""
    head = b'{"meta": {"s": "'
    before = WINDOW + shift - len(head) - backslashes // 2
    text = head + b"x" * before + b"\\" * backslashes + b'"}, "x": ' + b"[" * 70 + b"]" * 70 + b"}"
    path = tmp_path / "deep.json"
    path.write_bytes(text)
    messages = []
    for load, error in ((modelfile.load_json, ModelFileError), (core.Model, core.ModelFileError)):
        try:
            load(str(path))
            messages.append("loaded")
        except error as exc:
            messages.append(str(exc))
    if backslashes % 2 == 0:  # the quote ends the string: the brackets after it count
        deepest = len(head) + before + backslashes + len(b'"}, "x": ') + 63
        assert messages == [f"{path}: not valid JSON: arrays and objects nested deeper than 64 levels "
                            f"(at byte offset {deepest})"] * 2
    else:  # the quote is escaped: the brackets are inside a string
        assert not any("nested deeper" in m for m in messages), messages


def test_a_file_that_cannot_be_mapped_is_read(tmp_path):
    """/dev/null is no regular file: the loaders read it instead of mapping it, and find it as
    empty as an empty file."""
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    for load, error in ((modelfile.load_json, ModelFileError), (core.Model, core.ModelFileError)):
        messages = []
        for path in (empty, Path("/dev/null")):
            with pytest.raises(error) as err:
                load(str(path))
            messages.append(str(err.value).removeprefix(f"{path}: "))
        assert messages[0] == messages[1] and "not valid JSON" in messages[0], messages
