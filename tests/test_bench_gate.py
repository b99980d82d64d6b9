"""The regression gate, `xvalid bench --compare OLD.json NEW.json`, on bench files built here:
a deliberately slowed backend is flagged (exit 1), an identical rerun is not, noise within the
samples' spread is not a regression, and mismatched runs are said plainly."""

from __future__ import annotations

import copy
import json

import pytest

from xvalid.bench.gate import judge_metric
from xvalid.bench.rows import Row, Stats

MODEL = {"name": "tiny", "source": "preset", "path": None, "seed": 123, "parameters": 102720,
         "weight_bytes": 409600.0, "load_ms": {},
         "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
                    "num_key_value_heads": 2, "vocab_size": 128, "intermediate_size": 192,
                    "max_position_embeddings": 128}}
MACHINE = {"cpu": "Test CPU", "cores": 2, "usable_cores": 2, "simd": ["avx2", "fma"],
           "memory_gib": 16.0, "platform": "Linux", "machine": "x86_64"}


def row(backend: str, batch: int, seq: int, prefill: list[float], decode: list[float],
        threads: int = 2, status: str = "ok") -> dict:
    r = Row("tiny", backend, "backend", batch, seq, 8, threads, status)
    if status == "ok":
        r.timing = "in-process"
        r.prefill_ms, r.decode_ms_per_token = Stats.of(prefill), Stats.of(decode)
        r.total_ms = Stats.of([p + 8 * d for p, d in zip(prefill, decode)])
    else:
        r.reason = "logits max abs 0.5 > atol"
    return r.to_json()


def bench_doc(rows: list[dict], machine=MACHINE, model=MODEL) -> dict:
    return {"schema": "xvalid-bench", "schema_version": 1, "partial": False,
            "interrupted_at": None, "exit_code": 0, "command": "xvalid bench", "started": "",
            "duration_s": 1.0, "machine": machine, "versions": {}, "settings": {},
            "models": [model], "roofs": [], "cells_total": 2, "rows": rows, "profile": None}


STEADY = [10.0, 10.1, 9.9, 10.0, 10.05]  # std about 0.08


def baseline() -> dict:
    return bench_doc([row("torch", 1, 32, [20.0, 20.2, 19.9], [2.0, 2.01, 1.99]),
                      row("cpp", 1, 32, STEADY, [1.0, 1.01, 0.99, 1.0, 1.0]),
                      row("cpp", 4, 128, [40.0, 40.4, 39.8], [1.5, 1.52, 1.49])])


def write(tmp_path, name: str, doc: dict):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def gate(cli, tmp_path, old: dict, new: dict, *args):
    return cli("bench", "--compare", write(tmp_path, "old.json", old),
               write(tmp_path, "new.json", new), *args)


def test_an_identical_rerun_passes(cli, tmp_path):
    result = gate(cli, tmp_path, baseline(), baseline())
    assert result.code == 0, result.out + result.err
    assert "gate: PASS" in result.out and "SLOWER" not in result.out
    assert result.out.count(" same") == 9  # 3 rows x 3 metrics


def test_a_slowed_backend_is_flagged(cli, tmp_path):
    new = baseline()
    new["rows"][1] = row("cpp", 1, 32, [1.5 * v for v in STEADY], [1.0, 1.01, 0.99, 1.0, 1.0])
    result = gate(cli, tmp_path, baseline(), new)
    assert result.code == 1, result.out + result.err
    assert "gate: FAIL" in result.out
    lines = [line for line in result.out.splitlines() if "SLOWER" in line]
    assert len(lines) == 2  # prefill and total; decode unchanged
    assert all("cpp" in line for line in lines)
    assert any("prefill" in line and "0.67x" in line and "+50.0%" in line for line in lines)


def test_slower_within_the_samples_spread_is_not_a_regression():
    # 20% slower median, but the samples scatter far more than that
    old = Stats.of([10.0, 4.0, 16.0, 10.0, 10.0])
    new = Stats.of([12.0, 5.0, 19.0, 12.0, 12.0])
    verdict, spread = judge_metric(old, new, 5.0)
    assert verdict == "same" and spread > 2.0
    # the same 20% with tight samples is
    verdict, _ = judge_metric(Stats.of([10.0, 10.01, 9.99]), Stats.of([12.0, 12.01, 11.99]), 5.0)
    assert verdict == "SLOWER"


def test_the_threshold_decides_small_but_real_slowdowns(cli, tmp_path):
    new = baseline()
    new["rows"][1] = row("cpp", 1, 32, [1.03 * v for v in STEADY], [1.0, 1.01, 0.99, 1.0, 1.0])
    assert gate(cli, tmp_path, baseline(), new).code == 0  # 3% < 5%
    result = gate(cli, tmp_path, baseline(), new, "--threshold", 2)
    assert result.code == 1 and "threshold 2%" in result.out


def test_a_backend_that_became_invalid_fails_the_gate(cli, tmp_path):
    new = baseline()
    new["rows"][2] = row("cpp", 4, 128, [], [], status="invalid")
    result = gate(cli, tmp_path, baseline(), new)
    assert result.code == 1 and "now INVALID" in result.out


def test_mismatches_are_said_plainly(cli, tmp_path):
    other = dict(MACHINE, cpu="Other CPU", cores=8)
    new = bench_doc(baseline()["rows"], machine=other)
    result = gate(cli, tmp_path, baseline(), new)
    assert result.code == 0
    assert "machine mismatch: the files come from different machines (cpu: Test CPU -> Other " \
           "CPU; cores: 2 -> 8)" in result.out

    new = bench_doc([row("torch", 1, 32, [20.0], [2.0], threads=1),
                     row("cpp", 1, 32, STEADY, [1.0], threads=2)])
    result = gate(cli, tmp_path, baseline(), new)
    assert "thread mismatch: OLD ran at threads [2], NEW at [1, 2]" in result.out
    assert "row(s) only in OLD" in result.out and "row(s) only in NEW" in result.out

    changed = copy.deepcopy(MODEL)
    changed["config"]["hidden_size"] = 128
    result = gate(cli, tmp_path, baseline(), bench_doc(baseline()["rows"], model=changed))
    assert result.code == 2  # nothing left to compare
    assert "nothing to compare" in result.err


@pytest.mark.parametrize("content,needle", [
    ("{", "not valid JSON"),
    ('{"schema": "xvalid-compare-report"}', "not an xvalid bench file"),
    ('{"schema": "xvalid-bench", "schema_version": 99, "rows": []}', "schema version 99"),
    ('{"schema": "xvalid-bench", "schema_version": 1, "rows": [{"backend": "x"}]}',
     "a row is malformed"),
])
def test_bad_bench_files_are_one_line_exit_2(cli, tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = write(tmp_path, "good.json", baseline())
    cli("bench", "--compare", good, bad).assert_one_line_error(2, needle)


def test_compare_usage(cli, tmp_path):
    good = write(tmp_path, "good.json", baseline())
    cli("bench", "--compare", good, tmp_path / "none.json").assert_one_line_error(2, "no such file")
    cli("bench", "model.json", "--compare", good, good).assert_one_line_error(2, "runs nothing")
    cli("bench", "--compare", good).assert_one_line_error(2, "--compare")
