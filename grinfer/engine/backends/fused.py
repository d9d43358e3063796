"""`fused`: the layer stack on Triton kernels and cuBLAS, K/V read straight from the paged cache.

Per layer, over the step's new tokens (bf16 or fp16, fp32 statistics and accumulation):

    group_layer_norm   GroupLN_in(x), the previous layer's output bias added into x on the way
    addmm (cuBLAS)     h = xn W_uvqk^T + b
    silu_scatter_kv    h = SiLU(h) in place; K/V of the new tokens written into the cache pool (the
                       candidates' into scratch pages for this step); an 8-bit pool (kv_dtype) is
                       written by KVPool.write's PyTorch quantisation instead
    attention          the paged HSTU attention dispatcher with the Triton kernel: every key read from the pool
                       through the block tables
    group_norm_mul     y = GroupLN_attn(A V) * U
    addmm (cuBLAS)     x = x + y W_o^T (the residual as cuBLAS's C input; the bias joins in the next norm)

No host round trip inside a step: the loop bounds and key counts come with the step's indices. On CUDA
the whole stack is replayed from a CUDA graph per shape bucket (graphs.py; EngineConfig.cuda_graphs) and
featurizing + token embedding go through torch.compile.
"""

from __future__ import annotations

import torch

from grinfer.config import EngineConfig
from grinfer.engine.backends.compiled import compile_featurize_embed
from grinfer.engine.backends.eager import EagerBackend
from grinfer.engine.backends.graphs import GraphCache, LayerInputs
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.step import StepIndex
from grinfer.model.mtgr import MTGR
from grinfer.model.quantize_dense import linear
from grinfer.ops.hstu_attention import paged_hstu_attention
from grinfer.ops.layer_norm import LayerNormKernels


class FusedBackend(EagerBackend):
    name = "fused"
    keys_in_pool = True  # the step's candidates' K/V go to scratch pages of the cache

    def __init__(self, model: MTGR, config: EngineConfig | None = None):
        super().__init__(model, config)
        cfg = model.cfg
        if cfg.rel_bias:
            raise ValueError("backend: 'fused' has no relative attention bias; serve rel_bias models with 'eager'")
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        from grinfer.ops.triton import hstu_attention  # Triton is needed from here on only

        if device.type != "cuda" and not hstu_attention.interpreted():
            raise ValueError("backend: 'fused' runs Triton kernels on a CUDA device (on the CPU only under "
                             "TRITON_INTERPRET=1, for tests); use 'eager' or 'compiled' here")
        self._norms = LayerNormKernels("triton")  # the epilogues' dispatcher
        self._layout_counts = cfg.mask == "dynamic"  # the engine's key layout gives the visible-key counts
        self._attn_config = hstu_attention.default_config(cfg.head_dim, cfg.head_dim, dtype, self._layout_counts)
        if device.type == "cuda":
            self.featurize_embed = compile_featurize_embed(model)
        self.use_graphs = device.type == "cuda" and (config is None or config.cuda_graphs)  # full-stack steps only
        self.graphs: GraphCache | None = None  # made at the first step, for the engine's pool

    def run_layers(self, x: torch.Tensor, idx: StepIndex, pool: KVPool, first: int, last: int) -> torch.Tensor:
        inputs = LayerInputs(idx.q_meta.offsets, idx.q_meta.group, idx.q_meta.pos, idx.q_slots, idx.k_meta.offsets,
                             idx.k_meta.group, idx.k_meta.pos, idx.block_table, idx.k_counts, idx.max_len_q)
        if not self.use_graphs or (first, last) != (0, len(self.model.layers)):
            return self._layers(x, inputs, pool, first, last)  # layer-chunked steps are rare: no graphs
        if self.graphs is None:
            self.graphs = GraphCache(lambda xs, ins: self._layers(xs, ins, pool, first, last), x.shape[1],
                                     x.dtype, x.device)
        return self.graphs(x, inputs)

    def capture_pending(self, min_steps: int = 1) -> bool:
        return self.graphs is not None and self.graphs.capture_pending(min_steps)

    def stats(self) -> dict:
        return self.graphs.stats() if self.graphs is not None else {}

    def _layers(self, x: torch.Tensor, inp: LayerInputs, pool: KVPool, first: int, last: int) -> torch.Tensor:
        cfg, norms = self.model.cfg, self._norms
        d, heads, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
        bias = None  # the previous layer's output bias, added into x (in place, on addmm's output) by the next norm
        for i in range(first, last):
            layer = self.layer(i)
            xn = norms.group_layer_norm(x, inp.q_group, layer.norm_in.weight, layer.norm_in.bias,
                                        layer.norm_in.eps, add=bias)
            h = linear(xn, layer.uvqk)
            if pool.k_scale is None:
                norms.silu_scatter_kv(h, d, inp.q_slots, pool.k[i], pool.v[i])
            else:  # 8-bit K/V: SiLU, then the pool quantises and writes them (PyTorch ops)
                torch.nn.functional.silu(h, inplace=True)
                pool.write(i, inp.q_slots, h[:, 3 * d:].view(-1, heads, dh), h[:, d:2 * d].view(-1, heads, dh))
            u, q = h[:, :d], h[:, 2 * d:3 * d]
            k_scale, v_scale = pool.scales(i)
            attn = paged_hstu_attention(
                q.view(-1, heads, dh), pool.k[i], pool.v[i], inp.block_table, pool.block_size, inp.q_offsets,
                inp.k_offsets, inp.q_group, inp.q_pos, inp.k_group, inp.k_pos, mode=cfg.mask,
                normalizer=cfg.normalizer, max_seq_len=cfg.max_seq_len, k_scale=k_scale, v_scale=v_scale,
                max_len_q=inp.max_len_q, k_counts=inp.k_counts, layout_counts=self._layout_counts,
                config=self._attn_config, kernel="triton")
            y = norms.group_norm_mul(attn.view(-1, d), u, inp.q_group, layer.norm_attn.weight,
                                     layer.norm_attn.bias, layer.norm_attn.eps)
            x = linear(y, layer.out, residual=x)
            bias = layer.out.bias
        return x if bias is None else x + bias
