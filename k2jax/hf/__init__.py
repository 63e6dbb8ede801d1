"""Hugging Face interop: load and save Kimi-Linear and Kimi K2 / DeepSeek-V3 checkpoints (config.json + safetensors).

Two conventions exist for each family, and both load and save:
- REMOTE_CODE: the released checkpoints' own keys and names, read by the modeling code shipped with them
  (`configuration_kimi.py`, `configuration_deepseek.py`; `model_type` kimi_linear, deepseek_v3 or kimi_k2).
- TRANSFORMERS: what transformers 5's native `KimiLinearForCausalLM` / `DeepseekV3ForCausalLM` write
  (`layer_types`, `mlp_layer_types`, `linear_*`, `rope_parameters`, `rope_interleave`, null token ids, ...).
`config_from_hf` reads either; every key of a config.json is mapped, known not to change the computation, or an
error naming it (the key tables below). `save_hf_checkpoint(..., format=...)` writes either; REMOTE_CODE is the
default.

Our parameter tree mirrors the HF module names without the `model.` prefix; the layouts differ (HF tensors as the
released model.safetensors.index.json names them):

    ours                                        HF
    Linear kernel [in, out]                     `*.weight` [out, in]                     (transpose)
    embed_tokens [V, hidden]                    model.embed_tokens.weight [V, hidden]   (as is)
    lm_head.kernel [hidden, V]                  lm_head.weight [V, hidden]              (absent when tied)
    *_conv1d.weight [W, D]                      *_conv1d.weight [D, 1, W]
    A_log [H]                                   A_log [1, 1, H, 1]
    experts.w1 / w3 [E, hidden, I]              experts.{e}.w1 / w3 .weight [I, hidden]  (Kimi-Linear)
    experts.w2 [E, I, hidden]                   experts.{e}.w2.weight [hidden, I]
    experts.w1_packed u8 [E, hidden/2, I]       experts.{e}.w1.weight_packed i32 [I, hidden/8]  (INT4 experts:
    experts.w1_scale [E, hidden/g, I]           experts.{e}.w1.weight_scale [I, hidden/g]    compressed-tensors,
                                                experts.{e}.w1.weight_shape i64 [2] = [I, hidden]  compressed_tensors)
    norms, dt_bias, e_score_correction_bias     same name, same layout

Tensor namings (`Naming`): Kimi-Linear's remote code keeps the MoE under `block_sparse_moe.` with experts
`w1/w2/w3` and the dense MLP under `mlp.`; transformers saves Kimi-Linear the same way except that the dense MLP
is under `block_sparse_moe.` too. Kimi K2 / DeepSeek-V3 put both under `mlp.` with experts
`gate_proj/down_proj/up_proj`. transformers' in-memory names (written by `save_pretrained(...,
save_original_format=False)`) fuse tensors: `experts.gate_up_proj` [E, 2I, hidden], `experts.down_proj`
[E, hidden, I], `self_attn.conv1d.weight` [3D, 1, W] (q, k, v), and move the KDA gate under
`self_attn.forget_gate.`; they load too (loading picks the naming from the stored names).

Safetensors headers are parsed in k2jax.hf.safetensors (the format is a u64 header size, a JSON header and raw
little-endian data) and tensors are read with plain `readinto` calls at their offsets: no memory map, so file pages
never count towards the process's resident memory. Each model parameter is assembled in one 64-byte-aligned buffer in
our layout, streaming 1 MiB blocks of HF rows into it (transposes and dtype casts included); routed experts fill one
preallocated [E, ...] buffer. On CPU, XLA adopts such an aligned buffer in `device_put` without copying, so loading
peaks at about the model size (bench/hf_load.py: 1.01x for a 1 GB checkpoint); on an accelerator the host holds one
parameter at a time. Pickle-based weights (`.bin`, `.pt`) are refused, never unpickled.

Quantized checkpoints: only compressed-tensors "pack-quantized" INT4 routed experts (Kimi K2 Thinking) are accepted;
their nibbles are copied into the model's packed INT4 experts without dequantizing. A model with INT4 experts is
saved the same way.

Multi-token-prediction (MTP) layers (DeepSeek-V3's `num_nextn_predict_layers`) are not loaded: k2jax has no MTP
head, and their tensors (layers >= num_hidden_layers) are skipped with a logged warning that counts them.

Modules: `config` (config.json <-> ModelConfig), `names` (tensor names and layouts), `safetensors` (files),
`load`, `save`, `compressed_tensors` (INT4 experts' format). The names below are the public entry points.
"""

from k2jax.hf.config import (
                             CONFIG_FILE,
                             FORMATS,
                             REMOTE_CODE,
                             TRANSFORMERS,
                             config_from_hf,
                             hf_config_dict,
                             hf_convention,
                             transformers_attention_factor,
)
from k2jax.hf.load import load_hf_checkpoint, read_hf_config
from k2jax.hf.safetensors import CheckpointError
from k2jax.hf.save import save_hf_checkpoint

__all__ = ["CONFIG_FILE", "FORMATS", "REMOTE_CODE", "TRANSFORMERS", "CheckpointError", "config_from_hf",
           "hf_config_dict", "hf_convention", "load_hf_checkpoint", "read_hf_config", "save_hf_checkpoint",
           "transformers_attention_factor"]
