"""`xvalid bench`: prefill and decode speed over batch x prompt-length grids, every backend
validated before it is timed (docs/bench.md).

    grid.py      axes (comma lists, ranges), grid presets, cells, the cells that cannot fit
    roofs.py     compute and bandwidth roofs measured in the run; a forward's flops and bytes
    machine.py   CPU, cores, SIMD flags, memory, peak resident memory
    run.py       the run: validation (compare's steps), timing, Ctrl-C keeps what was measured
    rows.py      the one row type, its statistics, speedups and ranks
    output.py    terminal table, bench.json / bench.csv / bench.md
    plots.py     throughput, speedup heatmap, latency shares (PNG)
    profile.py   --profile: per-op times, torch and C++ side by side
    live.py      the live table and progress bar
    gate.py      --compare OLD.json NEW.json: the regression gate
"""
