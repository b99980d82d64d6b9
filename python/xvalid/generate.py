"""Seeded random-weight models that make bugs visible.

- weights N(0, 1) * init_std, drawn in file order from one seeded generator;
- norm weights uniform in [0.5, 1.5], not all ones, so an engine that ignores them fails;
- lm_head tied to (equal to) the embedding;
- padded input rows (left and right) so that an engine that ignores the mask fails;
- inputs drawn from a second generator, so changing --seq-len keeps the weights.
"""

from __future__ import annotations

import os

import numpy as np

from . import __version__
from .config import ModelConfig
from .dtypes import DEFAULT_BLOCK_SIZE, quantization_meta, store_weights
from .errors import ConfigError
from .modelfile import LayerWeights, ModelFile, Weights, layer_shapes


def rope_tables(max_pos: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_pos, hd) float32, rotate-half layout: column j uses inv_freq[j mod hd/2]."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq)  # (max_pos, hd/2)
    angles = np.concatenate((angles, angles), axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def padded_inputs(rng: np.random.Generator, vocab: int, batch_size: int, seq_len: int,
                  pad_rows: int, pad_len: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Random ids (B,S) int32 and a mask (B,S) uint8 whose last `pad_rows` rows are padded,
    alternating left, right, left, ..., each by `pad_len` positions (None: a random 1..S-1
    per row). Each padded row keeps at least one real token. Padded positions keep their
    random ids, not one token id: with a constant id there, padded rows agree whatever the
    attention does with them, and padding bugs go unseen."""
    ids = rng.integers(0, vocab, size=(batch_size, seq_len), dtype=np.int32)
    mask = np.ones((batch_size, seq_len), np.uint8)
    padding = []
    for n, row in enumerate(range(batch_size - pad_rows, batch_size)):
        side = "left" if n % 2 == 0 else "right"
        length = int(rng.integers(1, seq_len))  # 1 .. S-1, drawn even when fixed: same stream
        length = pad_len if pad_len is not None else length
        span = slice(0, length) if side == "left" else slice(seq_len - length, seq_len)
        mask[row, span] = 0
        padding.append({"row": row, "side": side, "length": length})
    return ids, mask, padding


def check_input_options(cfg: ModelConfig, batch_size: int, seq_len: int, pad: int | None,
                        pad_len: int | None, seed: int) -> int:
    """Refuse impossible input flags (--batch-size, --seq-len, --pad, --pad-len, --seed) with
    the flag named; returns the padded row count (`pad` None: one padded row if S > 1)."""
    if batch_size <= 0 or seq_len <= 0:
        raise ConfigError(f"--batch-size and --seq-len must be positive, got {batch_size}, {seq_len}")
    if seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {seq_len} exceeds --max-pos {cfg.max_position_embeddings}")
    if pad is None:
        pad = 1 if seq_len > 1 else 0
    if not 0 <= pad <= batch_size:
        raise ConfigError(f"--pad {pad} must be between 0 and --batch-size {batch_size}")
    if pad and seq_len < 2:
        raise ConfigError("--pad needs --seq-len >= 2 (a padded row keeps one real token)")
    if pad_len is not None and not 1 <= pad_len <= seq_len - 1:
        raise ConfigError(f"--pad-len {pad_len} must be between 1 and --seq-len - 1 = "
                          f"{seq_len - 1} (a padded row keeps one real token)")
    if pad_len is not None and not pad:
        raise ConfigError("--pad-len needs padded rows (--pad >= 1)")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed must be in [0, 2^63), got {seed}")
    return pad


def seed_streams(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """(weights, inputs): two independent streams of one seed, so the inputs drawn for a seed
    do not depend on the model's size."""
    weight_seed, input_seed = np.random.SeedSequence(seed).spawn(2)
    return weight_seed, input_seed


def draw_inputs(cfg: ModelConfig, batch_size: int, seq_len: int, seed: int, pad: int,
                pad_len: int | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The seeded inputs of a file: ids (B,S) int32, mask (B,S) uint8, the padding notes
    (padded_inputs, drawn from the seed's input stream)."""
    return padded_inputs(np.random.default_rng(seed_streams(seed)[1]), cfg.vocab_size,
                         batch_size, seq_len, pad, pad_len)


def check_weight_memory(cfg: ModelConfig, extra_floats: int = 0) -> None:
    """Refuse a model whose float32 weights and RoPE tables (plus `extra_floats`, such as an
    untied head) would take more than half the machine's memory."""
    need = 4 * (cfg.num_parameters + 2 * cfg.max_position_embeddings * cfg.head_dim
                + extra_floats)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise ConfigError(f"this config needs {need / 2**30:.1f} GiB of float32 weights; the machine "
                          f"has {have / 2**30:.1f} GiB of memory (smaller --hidden/--layers/--vocab?)")


def generate_model(cfg: ModelConfig, *, batch_size: int = 2, seq_len: int = 5, seed: int = 123,
                   pad: int | None = None, init_std: float = 0.02,
                   pad_len: int | None = None) -> ModelFile:
    """A ModelFile with seeded weights and inputs; `pad` None means one padded row if S > 1;
    `pad_len` padding positions per padded row (None: random)."""
    pad = check_input_options(cfg, batch_size, seq_len, pad, pad_len, seed)
    if not (init_std > 0 and np.isfinite(init_std)):
        raise ConfigError(f"--init-std must be a positive number, got {init_std}")
    check_weight_memory(cfg)

    rng = np.random.default_rng(seed_streams(seed)[0])

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:  # norm weights
            return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        out = rng.standard_normal(size=shape, dtype=np.float32)
        out *= np.float32(init_std)
        return out

    H, V = cfg.hidden_size, cfg.vocab_size
    embedding = draw((V, H))
    layers = [LayerWeights(**{name: draw(shape) for name, shape in layer_shapes(cfg).items()})
              for _ in range(cfg.num_hidden_layers)]
    weights = Weights(tok_embedding=embedding, final_rms=draw((H,)), lm_head=embedding,
                      layers=layers)
    ids, mask, padding = draw_inputs(cfg, batch_size, seq_len, seed, pad, pad_len)
    cos, sin = rope_tables(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta)
    meta = {"seed": seed, "B": batch_size, "S": seq_len, "head_dim": cfg.head_dim,
            "generator": {"tool": "xvalid", "version": __version__, "init_std": init_std,
                          "norm_weights": "uniform(0.5, 1.5)", "pad_rows": pad,
                          "padding": padding}}
    return ModelFile(cfg, weights, ids, mask, cos, sin, meta)


def logit_statistics(logits: np.ndarray, mask: np.ndarray) -> dict:
    """Entropy and top-1 margin of the next-token distributions on unpadded rows.

    A clear margin means top-1 agreement is a meaningful check; values are rounded to 6
    significant digits so the file does not depend on the last bits of a BLAS.
    """
    rows = logits[mask.astype(bool)].astype(np.float64)  # (rows, V)
    logp = rows - rows.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    entropy = -(np.exp(logp) * logp).sum(-1)
    top2 = np.sort(rows, axis=-1)[:, -2:] if rows.shape[1] > 1 else np.zeros((len(rows), 2))
    margin = top2[:, 1] - top2[:, 0]
    r = lambda x: float(f"{float(x):.6g}")  # noqa: E731
    return {"rows": int(len(rows)), "entropy_mean": r(entropy.mean()), "entropy_max": r(entropy.max()),
            "max_entropy": r(np.log(rows.shape[1])), "top1_margin_min": r(margin.min()),
            "top1_margin_median": r(np.median(margin)), "logits_absmax": r(np.abs(rows).max()),
            "logits_std": r(rows.std())}


def reference_logits(mf: ModelFile, dtype: str = "float32") -> np.ndarray:
    """The reference's logits (B, S, V) on the file's own inputs, computed in `dtype`."""
    from .reference import Reference
    return Reference(mf, dtype).forward(mf.input_ids, mf.attention_mask).numpy()


def source_logits(mf: ModelFile) -> np.ndarray:
    """The logits a `source` record keeps: the reference computed in float64, rounded to
    float32. Free of float32 rounding noise, so the quantisation cost measures the conversion
    alone, and the same on every machine and thread count (a float32 forward's last bits
    are not), so the same generate flags still write the same bytes."""
    return reference_logits(mf, "float64").astype(np.float32)


def record_reference(mf: ModelFile, logits: np.ndarray) -> None:
    """meta.reference: the statistics of the reference's logits of the model in the file."""
    mf.meta["reference"] = {"dtype": "float32", **logit_statistics(logits, mf.attention_mask)}


def weight_dtype_flags(weight_dtype: str, block_size: int | None) -> str:
    """The generate flags that make a file of `weight_dtype` ('' for float32)."""
    if weight_dtype == "float32":
        return ""
    block = f" --quant-block {'row' if block_size is None else block_size}" * (weight_dtype == "int8")
    return f" --weight-dtype {weight_dtype}{block}"


def finish_model(mf: ModelFile, weight_dtype: str | None,
                 block_size: int | None = DEFAULT_BLOCK_SIZE) -> ModelFile:
    """A made model (generate, import) ready to write: its weights stored in `weight_dtype`
    (None: as they are) and meta.reference recorded, so that a later PASS is known to mean
    something. One reference forward: a conversion to a reduced dtype records the converted
    model's own statistics (convert_weights), so the unconverted model's are not computed."""
    converted = weight_dtype not in (None, mf.weight_dtype)
    if not converted or weight_dtype == "float32":  # the same values either way
        record_reference(mf, reference_logits(mf))
    return convert_weights(mf, weight_dtype, block_size) if converted else mf


def convert_weights(mf: ModelFile, weight_dtype: str,
                    block_size: int | None = DEFAULT_BLOCK_SIZE) -> ModelFile:
    """`mf` with its weights stored in `weight_dtype` (dtypes.store_weights), and the record
    compare's quantisation cost needs: `source` (source_logits of the model before
    conversion; a file that already has a source keeps it, the most original model),
    meta.quantization, and meta.reference for the new model. Converting to float32 keeps the stored values exactly (the same model); a
    conversion to what the file already stores returns `mf` unchanged."""
    before = mf.weight_dtype
    same_blocks = all(stored.block_size == (block_size or stored.shape[-1])
                      for stored in mf.storage.values() if stored.dtype == "int8")
    if weight_dtype == before and same_blocks:
        return mf
    out = store_weights(mf, weight_dtype, block_size)
    out.meta = dict(mf.meta)
    if weight_dtype != "float32" and out.source_logits is None:
        out.source_logits = source_logits(mf)
        out.source_weight_dtype = before
    if weight_dtype != "float32":  # recorded anew below, after quantization (one key order)
        out.meta.pop("reference", None)
    out.meta["quantization"] = quantization_meta(weight_dtype, block_size, before)
    if weight_dtype != "float32":
        record_reference(out, reference_logits(out))
    generator = out.meta.get("generator")
    if isinstance(generator, dict) and isinstance(generator.get("command"), str):
        generator = out.meta["generator"] = dict(generator)
        if before == "float32":  # the same generate command, with the dtype flags, makes it
            generator["command"] += weight_dtype_flags(weight_dtype, block_size)
        else:  # converted twice: no generate command makes this file
            del generator["command"]
    return out
