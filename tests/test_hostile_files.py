"""Hostile model files, generated: byte flips, truncations, spliced junk and edited numbers.
Whatever the damage, both loaders either read the file or refuse it with one line (exit 2
from the CLI, ModelFileError from the C++ module): never a crash, a hang or a traceback."""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@st.composite
def damaged(draw, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "number"]))
    n = len(original)
    if kind == "flip":  # a few bytes anywhere get random values
        data = bytearray(original)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return original[:draw(st.integers(0, n - 1))]
    if kind == "splice":  # junk inserted at a random place
        at = draw(st.integers(0, n))
        return original[:at] + draw(st.binary(min_size=1, max_size=40)) + original[at:]
    # a number in the JSON (a config value, a shape, a dimension) replaced by a hostile one
    numbers = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?(e[-+]?\d+)?", original[:4000])]
    start, end = draw(st.sampled_from(numbers))
    value = draw(st.sampled_from([b"0", b"-1", b"1e308", b"NaN", b"2147483648", b"99999999999",
                                  b"3.5", b"true", b"null", b'"7"', b"[]"]))
    return original[:start] + value + original[end:]


class Original(bytes):
    def __repr__(self) -> str:  # hypothesis prints arguments of failing cases: keep it short
        return f"<tiny model file, {len(self)} bytes>"


@pytest.fixture(scope="module")
def original(tiny_model) -> Original:
    return Original(tiny_model.read_bytes())


@settings(max_examples=int(os.environ.get("XVALID_FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_are_read_or_refused_in_one_line(cli, tmp_path, original, data):
    payload = data.draw(damaged(original), label="damaged file")
    path = tmp_path / "damaged.json"
    path.write_bytes(payload)
    result = cli("inspect", path, "--no-tensors")
    if result.code != 0:
        result.assert_one_line_error(2)
    core = pytest.importorskip("xvalid._core")
    try:
        core.Model(str(path))
        cpp_ok = True
    except core.ModelFileError as exc:
        assert "\n" not in str(exc)
        cpp_ok = False
    # The two readers agree on what is a valid file, except where JSON number spellings
    # differ (Python's json accepts NaN, nlohmann does not).
    if b"NaN" not in payload:
        assert cpp_ok == (result.code == 0), (result.err, payload[:40], payload[-40:])


def test_original_is_valid(cli, original, tmp_path):
    path = tmp_path / "m.json"
    path.write_bytes(original)
    assert cli("inspect", path, "--no-tensors").code == 0
    assert json.loads(original)["format_version"] == 1
