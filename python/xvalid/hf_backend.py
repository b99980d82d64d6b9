"""The `hf` backend: transformers' LlamaForCausalLM (eager attention) on a model file's
weights, registered in backends.py, where transformers is installed (the `hf` extra)."""

from __future__ import annotations

import numpy as np

from .backends import Backend, require_transformers
from .modelfile import ModelFile


class HfBackend(Backend):
    """transformers' LlamaForCausalLM with eager attention in float32, built in memory from the
    file's weights (the checkpoint `xvalid export` would write). Its RoPE tables are its own
    (from rope_theta), so a file with other tables is refused. Positions are the index in the
    sequence whatever the padding (docs/model.md), passed as position_ids; the KV cache is
    transformers' own. Intermediates come from forward hooks, q and k after RoPE from a
    wrapper around modeling_llama.apply_rotary_pos_emb."""

    name = "hf"

    def __init__(self, mf: ModelFile, dtype: str = "float32"):
        self.transformers = require_transformers()
        import torch

        from .hf import check_rope_tables, hf_config, hf_state
        check_rope_tables(mf)  # transformers computes its tables from rope_theta alone
        self.torch, self.cfg = torch, mf.config
        # config.json's dict read as from_pretrained reads it
        config = self.transformers.LlamaConfig.from_dict(hf_config(mf), attn_implementation="eager")
        with torch.device("meta"):  # no random init of weights that are replaced at once
            model = self.transformers.LlamaForCausalLM(config)
        state = {name: torch.from_numpy(np.array(a, dtype=np.float32))
                 for name, a in hf_state(mf).items()}
        if "lm_head.weight" not in state:  # tied: one tensor under both names
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        # RoPE as transformers computes it from rope_theta: its inv_freq buffers, made on the
        # meta device above, are made again (transformers 4 also keeps one per layer).
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if type(child).__name__.endswith("RotaryEmbedding"):
                    setattr(parent, child_name, type(child)(config=config))
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"hf backend: {left[0]} was not set from the file")
        # A half compute dtype: weights cast to it, as from_pretrained(torch_dtype=...) does;
        # transformers' own RMSNorm and eager softmax then work in float32 inside.
        self.dtype = dtype
        self.model = model.to(getattr(torch, dtype)).eval()
        self.cache = None

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)

    def _run(self, ids, mask, past):
        torch = self.torch
        ids, mask = np.asarray(ids), np.asarray(mask)
        from .modelfile import check_inputs
        p0 = 0 if past is None else past.get_seq_length()
        check_inputs(ids, mask, self.cfg, past_len=p0)
        positions = torch.arange(p0, p0 + ids.shape[1])[None].expand(ids.shape[0], -1)
        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                              attention_mask=torch.from_numpy(mask.astype(np.int64)),
                              position_ids=positions, past_key_values=past,
                              use_cache=past is not None)

    def forward(self, ids, mask, capture: bool = False):
        if not capture:
            return self._run(ids, mask, None).logits.float().numpy(), None
        with _HfCapture(self.model, self.cfg) as sink:
            logits = self._run(ids, mask, None).logits.float().numpy()
        sink["logits"] = logits
        return logits, sink

    def reset_cache(self) -> None:
        self.cache = self.transformers.DynamicCache()

    def step(self, ids, mask) -> np.ndarray:
        out = self._run(ids, mask, self.cache)
        self.cache = out.past_key_values
        return out.logits.float().numpy()

    def info(self) -> dict:
        return {"transformers": self.transformers.__version__, "torch": self.torch.__version__,
                "attention": "eager", "dtype": self.dtype, "threads": self.torch.get_num_threads()}


class _HfCapture:
    """Forward hooks that record the named intermediates (docs/intermediates.md) of one
    LlamaForCausalLM forward into a dict of numpy arrays; q and k after RoPE through a wrapper
    of modeling_llama.apply_rotary_pos_emb, restored on exit."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.sink: dict[str, np.ndarray] = {}
        self.handles = []

    def _keep(self, name: str, t, view=None) -> None:
        """Record tensor t (the first of a tuple) as float32 numpy, reshaped by `view`."""
        t = t[0] if isinstance(t, tuple) else t
        array = t.detach().float().numpy().copy()
        self.sink[name] = view(array) if view else array

    def _out(self, module, name, view=None):
        self.handles.append(module.register_forward_hook(
            lambda m, args, out: self._keep(name, out, view)))

    def _in(self, module, name, view=None):
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args: self._keep(name, args[0], view)))

    def __enter__(self) -> dict:
        from transformers.models.llama import modeling_llama
        cfg, inner = self.cfg, self.model.model
        heads = lambda n: lambda a: a.reshape(*a.shape[:2], n, cfg.head_dim)  # noqa: E731
        self._out(inner.embed_tokens, "embedding")
        for l, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self._out(layer.input_layernorm, f"layer{l}.attn_norm")
            self._out(attn.v_proj, f"layer{l}.v", heads(cfg.num_key_value_heads))
            self._in(attn.o_proj, f"layer{l}.attn_heads", heads(cfg.num_attention_heads))
            self._out(attn.o_proj, f"layer{l}.attn_out")
            self._in(layer.post_attention_layernorm, f"layer{l}.attn_residual")
            self._out(layer.post_attention_layernorm, f"layer{l}.ffn_norm")
            self._out(mlp.gate_proj, f"layer{l}.gate")
            self._out(mlp.up_proj, f"layer{l}.up")
            self._out(mlp.down_proj, f"layer{l}.ffn_out")
            self._out(layer, f"layer{l}.residual")
        self._out(inner.norm, "final_norm")
        self.module, self.original = modeling_llama, getattr(modeling_llama, "apply_rotary_pos_emb", None)
        if self.original is not None:
            calls = iter(range(cfg.num_hidden_layers))

            def rope_and_keep(q, k, *args, **kwargs):
                q, k = self.original(q, k, *args, **kwargs)
                l = next(calls)
                self._keep(f"layer{l}.q", q.transpose(1, 2))  # (B, NH, S, hd) -> (B, S, NH, hd)
                self._keep(f"layer{l}.k", k.transpose(1, 2))
                return q, k
            modeling_llama.apply_rotary_pos_emb = rope_and_keep
        return self.sink

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        if self.original is not None:
            self.module.apply_rotary_pos_emb = self.original
