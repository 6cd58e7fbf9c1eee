"""Tiny random configs for the mlx-lm text architectures (mlx-lm 0.32.2).

``TINY_ARCHS`` maps an mlx-lm model type (the module name under
``mlx_lm/models/``) to a config such that::

    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    model = mod.Model(mod.ModelArgs.from_dict({"model_type": arch, **cfg}))

builds a tiny random model: hidden 64, 4 attention heads / 2 KV heads, head_dim
16, MLP 128, vocab 256, max positions 512, MoE with 4 experts top-2 (expert
MLP 64), small linear-attention / conv / SSM sizes, sliding windows of 8 so that
short test sequences cross them. Two layers; hybrids get one layer of each
kind. Exceptions, because one layer kind needs more depth:
nemotron_h (4 blocks: Mamba2, attention, MLP, MoE), llama4 (4 layers: three
chunked-RoPE layers then one global NoPE layer), gemma3n (4 layers: two that
own a KV cache and two that share it). Multimodal wrappers (gemma3, gemma3n,
gemma4, llama4, mistral3, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe) are
given a ``text_config`` only, as in their checkpoints' config.json; mlx-lm
builds only the language model from it.

Left out:
  mistral      - no such module: mlx-lm remaps model_type "mistral" to llama
                 (utils.MODEL_REMAPPING); llama, ministral3 and mistral3 cover it.
  Not attempted (less widely published; their modules may well work):
  Klear afm7 baichuan_m1 bailing_hybrid bailing_moe_linear bailing_moe_v3
  bitnet dbrx deepseek deepseek_v41 gear glm_moe_dsa gptj iquestloopcoder
  kimi_k25 kimi_k3 kimi_vl laguna lfm2-vl lille-130m longcat_flash
  longcat_flash_ngram mellum mimo_v2_flash minimax_m3_vl muse_glimmer
  muse_spark nanbeige nemotron-nas olmo openelm phi3small phixtral plamo
  plamo2 plamo3 prism_hadamard_qwen35 qwen qwen2_vl solar_open spark2_5
  step3p5 talkie telechat3 youtu_llm.
  (activations base bitlinear_layers cache gated_delta mla pipeline pixtral
  rope_utils ssm switch_layers are helper modules, not architectures.)

Every entry builds, gives finite (1, L, 256) logits, and decoding with
``make_prompt_cache`` matches the uncached forward within 1e-4 (largest
seen: 8e-6), and BatchGenerator and nn.value_and_grad work, except as
listed in ``KNOWN_MLX_LM_ISSUES`` (bugs or limits of mlx-lm 0.32.2 itself,
reproduced with these configs).
"""

from __future__ import annotations

import copy
import importlib

import mlx_grpo  # noqa: F401  (loads the optimised BLAS before mlx.core)

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

# Shared tiny dimensions.
H = 64  # hidden size
FF = 128  # dense MLP intermediate size
MI = 64  # MoE expert intermediate size
V = 256  # vocab size
P = 512  # max_position_embeddings
SW = 8  # sliding window: small so that test sequences actually cross it

_ATTN = dict(
    hidden_size=H,
    num_hidden_layers=2,
    intermediate_size=FF,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=V,
    max_position_embeddings=P,
)


def _cfg(**kw) -> dict:
    return {**_ATTN, **kw}


TINY_ARCHS: dict[str, dict] = {
    # ---- dense decoders ----------------------------------------------------
    "llama": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
        tie_word_embeddings=True,
    ),
    "qwen2": _cfg(rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": _cfg(rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    "gemma": _cfg(rms_norm_eps=1e-6, rope_theta=10000.0),
    "gemma2": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        query_pre_attn_scalar=16.0,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=16,
        sliding_window=SW,
        sliding_window_pattern=2,  # layer 0 sliding, layer 1 global
    ),
    # multimodal wrapper: text part only, as in a gemma-3-4b+ checkpoint
    "gemma3": {
        "vocab_size": V,
        "text_config": _cfg(
            model_type="gemma3_text",
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            rope_local_base_freq=10000.0,
            query_pre_attn_scalar=16,
            sliding_window=SW,
            sliding_window_pattern=2,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        ),
    },
    "phi3": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        partial_rotary_factor=0.75,
        original_max_position_embeddings=128,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0] * 6,
            "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0],
        },
        tie_word_embeddings=False,
    ),
    "ministral3": _cfg(
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
    ),
    # multimodal wrapper (Ministral 3 / Mistral 3 checkpoints): text part only
    "mistral3": {
        "text_config": _cfg(
            model_type="ministral3",
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={
                "type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
        ),
    },
    "granite": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        logits_scaling=4.0,
        attention_multiplier=0.0625,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
    ),
    "smollm3": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=5e6,
        no_rope_layer_interval=2,  # layer 0 rope, layer 1 NoPE
        tie_word_embeddings=True,
    ),
    "olmo2": _cfg(rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=False),
    "cohere": _cfg(
        layer_norm_eps=1e-5, rope_theta=8e6, logit_scale=0.0625, use_qk_norm=False
    ),
    "minicpm": _cfg(
        rms_norm_eps=1e-5,
        dim_model_base=32,
        scale_depth=1.4,
        scale_emb=12.0,
        rope_theta=10000.0,
        tie_word_embeddings=False,  # untied, its head input is scaled by dim_model_base / hidden_size
    ),
    "glm4": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        attention_bias=True,
    ),
    "exaone4": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
        sliding_window=SW,
        sliding_window_pattern="LG",  # layer 0 local (rope), layer 1 global (NoPE)
        tie_word_embeddings=False,
    ),
    "ernie4_5": _cfg(
        rms_norm_eps=1e-5, rope_theta=500000.0, use_bias=False, tie_word_embeddings=True
    ),
    "llama4_text": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        intermediate_size_mlp=FF,
        no_rope_layers=[1, 0],  # layer 0 rope, layer 1 NoPE
        use_qk_norm=True,
        tie_word_embeddings=False,
    ),
    # ---- mixture of experts --------------------------------------------------
    "qwen3_moe": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=MI,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    "mixtral": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
    "deepseek_v3": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        moe_intermediate_size=MI,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        n_group=2,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 MoE
        moe_layer_freq=1,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    "gpt_oss": _cfg(
        rms_norm_eps=1e-5,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=SW,
        layer_types=["sliding_attention", "full_attention"],
        rope_theta=150000,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 128,
        },
    ),
    # ---- hybrid (attention + linear attention / conv / ssm) -----------------
    # multimodal wrapper (Qwen3.5 checkpoints): text part only
    "qwen3_5": {
        "text_config": _cfg(
            model_type="qwen3_5_text",
            rms_norm_eps=1e-6,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            full_attention_interval=2,  # layer 0 linear attention, layer 1 full
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
                "rope_theta": 1e7,
                "partial_rotary_factor": 0.5,
            },
        ),
    },
    "qwen3_5_moe": {
        "text_config": _cfg(
            model_type="qwen3_5_moe_text",
            rms_norm_eps=1e-6,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            full_attention_interval=2,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            moe_intermediate_size=MI,
            shared_expert_intermediate_size=MI,
            norm_topk_prob=True,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
                "rope_theta": 1e7,
                "partial_rotary_factor": 0.5,
            },
        ),
    },
    "qwen3_next": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=1e7,
        partial_rotary_factor=0.25,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=2,  # layer 0 linear attention, layer 1 full
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=MI,
        shared_expert_intermediate_size=MI,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    "granitemoehybrid": _cfg(
        rms_norm_eps=1e-5,
        intermediate_size=MI,  # expert size
        layer_types=["mamba", "attention"],
        attention_bias=False,
        embedding_multiplier=12.0,
        attention_multiplier=0.0625,
        logits_scaling=4.0,
        residual_multiplier=0.22,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=FF,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_proj_bias=False,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_n_groups=1,
        mamba_conv_bias=True,
        position_embedding_type="nope",
        tie_word_embeddings=True,
    ),
    "lfm2": _cfg(
        norm_eps=1e-5,
        conv_bias=False,
        conv_L_cache=3,
        block_dim=H,
        block_ff_dim=FF,
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
        rope_theta=1e6,
        layer_types=["conv", "full_attention"],
    ),
    "nemotron_h": _cfg(
        # One layer of each block kind: Mamba2, attention, MLP, MoE.
        hybrid_override_pattern="M*-E",
        attention_bias=False,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_proj_bias=False,
        ssm_state_size=16,
        conv_kernel=4,
        n_groups=1,
        mlp_bias=False,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        moe_intermediate_size=MI,
        moe_shared_expert_intermediate_size=MI,
        n_group=1,
        topk_group=1,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
    ),
    "falcon_h1": _cfg(
        # every falcon_h1 layer runs attention and a Mamba2 mixer in parallel
        rms_norm_eps=1e-5,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_n_groups=1,
        mamba_chunk_size=16,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),

    # ---- further dense decoders ---------------------------------------------
    "phi": _cfg(layer_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5),
    "starcoder2": _cfg(norm_epsilon=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "olmo3": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        sliding_window=SW,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    ),
    "hunyuan_v1_dense": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={"type": "dynamic", "factor": 1.0, "alpha": 1000.0},
        use_qk_norm=True,
        tie_word_embeddings=True,
    ),
    "internlm2": _cfg(
        rms_norm_eps=1e-5,
        bias=False,
        rope_theta=1e6,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        tie_word_embeddings=False,
    ),
    "internlm3": _cfg(
        rms_norm_eps=1e-5,
        bias=False,
        qkv_bias=False,
        rope_theta=50000000.0,
        rope_scaling={"rope_type": "dynamic", "factor": 6.0},
        tie_word_embeddings=False,
    ),
    "exaone": {
        **_cfg(layer_norm_epsilon=1e-5, rope_theta=1e6, tie_word_embeddings=False),
        "num_layers": 2,  # exaone (3.x) names the layer count num_layers
    },
    "cohere2": _cfg(
        layer_norm_eps=1e-5,
        rope_theta=50000.0,
        logit_scale=0.25,
        sliding_window=SW,
        sliding_window_pattern=2,  # layer 0 sliding, layer 1 global
    ),
    "apertus": _cfg(
        rms_norm_eps=1e-5,
        mlp_bias=False,
        attention_bias=False,
        post_norm=False,
        qk_norm=True,
        rope_theta=12000000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
        tie_word_embeddings=False,
    ),
    "seed_oss": _cfg(
        rms_norm_eps=1e-6,
        attention_bias=True,
        attention_out_bias=False,
        mlp_bias=False,
        rope_theta=1e7,
        tie_word_embeddings=False,
    ),
    "stablelm": _cfg(
        layer_norm_eps=1e-5,
        rope_theta=10000.0,
        use_qkv_bias=True,
        partial_rotary_factor=0.25,
        use_parallel_residual=False,
        qk_layernorm=False,
    ),
    "helium": _cfg(
        rms_norm_eps=1e-8,
        attention_bias=False,
        mlp_bias=False,
        rope_theta=100000.0,
        tie_word_embeddings=False,
    ),
    "glm": _cfg(rms_norm_eps=1e-5, attention_bias=True, rope_theta=10000.0),
    "mimo": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=640000.0,
        num_nextn_predict_layers=1,
        tie_word_embeddings=False,
    ),
    "nanochat": _cfg(rope_theta=10000.0),
    "nemotron": _cfg(
        hidden_act="relu2",
        norm_eps=1e-5,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "gpt2": dict(
        n_ctx=P,
        n_embd=H,
        n_head=4,
        n_layer=2,
        n_positions=P,
        layer_norm_epsilon=1e-5,
        vocab_size=V,
    ),
    "gpt_neox": dict(
        max_position_embeddings=P,
        hidden_size=H,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        vocab_size=V,
        rotary_emb_base=10000,
        rotary_pct=0.25,
        use_parallel_residual=True,
    ),
    "gpt_bigcode": dict(
        n_embd=H,
        n_layer=2,
        n_inner=FF,
        n_head=4,
        n_positions=P,
        layer_norm_epsilon=1e-5,
        vocab_size=V,
        multi_query=True,
    ),
    "minicpm3": _cfg(
        rms_norm_eps=1e-5,
        dim_model_base=32,
        scale_depth=1.4,
        scale_emb=12.0,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        rope_theta=10000.0,
        rope_scaling={
            "type": "longrope",
            "original_max_position_embeddings": 128,
            "short_factor": [1.0, 1.0, 1.0, 1.0],
            "long_factor": [1.0, 1.5, 2.0, 3.0],
        },
        tie_word_embeddings=False,
    ),
    # multimodal wrapper (Qwen3-VL checkpoints): text part only
    "qwen3_vl": {
        "text_config": _cfg(
            model_type="qwen3_vl_text",
            rms_norm_eps=1e-6,
            rope_theta=5e6,
            rope_scaling={
                "rope_type": "default",
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            tie_word_embeddings=True,
        ),
    },
    "gemma4_text": _cfg(
        rms_norm_eps=1e-6,
        global_head_dim=32,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=V,
        sliding_window=SW,
        sliding_window_pattern=2,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
    # ---- further mixture of experts ------------------------------------------
    "qwen2_moe": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=MI,
        shared_expert_intermediate_size=MI,
        tie_word_embeddings=False,
    ),
    "qwen3_vl_moe": {
        "text_config": _cfg(
            model_type="qwen3_vl_moe_text",
            rms_norm_eps=1e-6,
            rope_theta=5e6,
            rope_scaling={
                "rope_type": "default",
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=MI,
            norm_topk_prob=True,
            tie_word_embeddings=False,
        ),
    },
    "olmoe": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        intermediate_size=MI,
        tie_word_embeddings=False,
    ),
    "granitemoe": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        intermediate_size=MI,
        logits_scaling=4.0,
        attention_multiplier=0.0625,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_bias=False,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    ),
    "phimoe": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        intermediate_size=MI,
        num_local_experts=4,
        num_experts_per_tok=2,
        original_max_position_embeddings=128,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
            "short_mscale": 1.0,
            "long_mscale": 1.2,
            "original_max_position_embeddings": 128,
        },
    ),
    "glm4_moe": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        rope_scaling=None,
        partial_rotary_factor=0.5,
        attention_bias=True,
        use_qk_norm=True,
        moe_intermediate_size=MI,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
        tie_word_embeddings=False,
    ),
    "deepseek_v2": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        moe_intermediate_size=MI,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        kv_lora_rank=32,
        q_lora_rank=None,  # as in DeepSeek-V2-Lite
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
    "dots1": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        first_k_dense_replace=1,
        moe_intermediate_size=MI,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        scoring_func="noaux_tc",
        n_group=1,
        topk_group=1,
        tie_word_embeddings=False,
    ),
    "hunyuan": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={"type": "dynamic", "factor": 1.0, "alpha": 1000.0},
        attention_bias=False,
        moe_topk=2,
        num_experts=4,
        num_shared_expert=1,
        use_mixed_mlp_moe=True,
        moe_intermediate_size=MI,
        use_qk_norm=True,
        use_cla=True,  # cross-layer attention: layer 1 reuses layer 0's KV
        cla_share_factor=2,
        tie_word_embeddings=True,
    ),
    "bailing_moe": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=600000.0,
        moe_intermediate_size=MI,
        num_experts=4,
        num_shared_experts=1,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        routed_scaling_factor=2.5,
        n_group=1,
        topk_group=1,
        tie_word_embeddings=False,
    ),
    "ernie4_5_moe": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        use_bias=False,
        tie_word_embeddings=True,
        moe_num_experts=4,
        moe_k=2,
        moe_layer_start_index=1,  # layer 0 dense, layer 1 MoE
        moe_intermediate_size=MI,
        moe_num_shared_experts=1,
        moe_use_aux_free=True,
    ),
    "exaone_moe": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        moe_intermediate_size=MI,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        sliding_window=SW,
        layer_types=["sliding_attention", "full_attention"],
        is_moe_layer=[False, True],
        tie_word_embeddings=False,
    ),
    "afmoe": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        moe_intermediate_size=MI,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        num_dense_layers=1,  # layer 0 dense, layer 1 MoE
        sliding_window=SW,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    ),
    # multimodal wrapper (Llama 4 checkpoints): text part only. Llama 4 needs
    # 4 layers to hold both of its attention kinds: layers 0-2 chunked
    # attention with RoPE, layer 3 global attention without RoPE.
    "llama4": {
        "text_config": _cfg(
            model_type="llama4_text",
            num_hidden_layers=4,
            rms_norm_eps=1e-5,
            attention_bias=False,
            attention_chunk_size=SW,
            interleave_moe_layer_step=2,  # layers 1 and 3 MoE
            intermediate_size=MI,  # expert size
            intermediate_size_mlp=FF,
            num_local_experts=4,
            num_experts_per_tok=1,  # mlx-lm's llama4 supports top-1 only
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
            use_qk_norm=True,
        ),
    },
    # multimodal wrapper (Gemma 4 26B-A4B-like): text part only, MoE block
    "gemma4": {
        "vocab_size": V,
        "text_config": _cfg(
            model_type="gemma4_text",
            rms_norm_eps=1e-6,
            global_head_dim=32,
            num_kv_shared_layers=0,
            hidden_size_per_layer_input=0,
            sliding_window=SW,
            layer_types=["sliding_attention", "full_attention"],
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=MI,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        ),
    },
    # ---- further hybrids / state-space models --------------------------------
    "lfm2_moe": _cfg(
        norm_eps=1e-5,
        conv_bias=False,
        conv_L_cache=3,
        moe_intermediate_size=MI,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        use_expert_bias=True,
        num_dense_layers=1,  # layer 0 (conv) dense, layer 1 (attention) MoE
        rope_theta=1e6,
        layer_types=["conv", "full_attention"],
    ),
    "olmo_hybrid": _cfg(
        rms_norm_eps=1e-6,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        linear_allow_neg_eigval=True,
        attention_bias=False,
        layer_types=["linear_attention", "full_attention"],
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "kimi_linear": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        model_max_length=P,
        linear_attn_config={
            "kda_layers": [1],  # 1-based: layer 0 KDA linear attention
            "full_attn_layers": [2],  # layer 1 MLA
            "num_heads": 4,
            "head_dim": 16,
            "short_conv_kernel_size": 4,
        },
        num_experts=4,
        num_experts_per_token=2,
        num_shared_experts=1,
        moe_intermediate_size=MI,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        mla_use_nope=True,
        num_expert_group=1,
        topk_group=1,
        tie_word_embeddings=False,
    ),
    "jamba": _cfg(
        rms_norm_eps=1e-6,
        attn_layer_offset=1,  # layer 0 mamba, layer 1 attention
        attn_layer_period=2,
        expert_layer_offset=1,  # layer 1 MoE
        expert_layer_period=2,
        mamba_d_conv=4,
        mamba_d_state=16,
        mamba_expand=2,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    ),
    "mamba2": dict(
        num_heads=4,
        head_dim=32,
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        state_size=16,
        num_hidden_layers=2,
        layer_norm_epsilon=1e-5,
        conv_kernel=4,
        n_groups=1,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
        time_step_limit=(0.0, float("inf")),
        time_step_rank="auto",
    ),
    # multimodal wrapper (Gemma 3n checkpoints): text part only. 4 layers so that
    # both KV-owning and KV-sharing layers of each attention kind are present.
    "gemma3n": {
        "text_config": _cfg(
            model_type="gemma3n_text",
            num_hidden_layers=4,
            rms_norm_eps=1e-6,
            num_kv_shared_layers=2,
            vocab_size_per_layer_input=V,
            sliding_window=SW,
            rope_local_base_freq=10000.0,
            rope_theta=1e6,
            final_logit_softcapping=30.0,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention",
            ],
            activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
            hidden_size_per_layer_input=16,
            altup_num_inputs=4,
            altup_coef_clip=120.0,
            altup_correct_scale=True,
            altup_active_idx=0,
            laurel_rank=8,
        ),
    },
    # ---- late additions -------------------------------------------------------
    "glm4_moe_lite": _cfg(
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        moe_intermediate_size=MI,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=1.8,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        tie_word_embeddings=False,
    ),
    "deepseek_v32": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        moe_intermediate_size=MI,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        index_head_dim=16,
        index_n_heads=2,
        index_topk=SW,  # sparse attention kicks in beyond SW keys
    ),
    "mistral4": _cfg(
        rms_norm_eps=1e-6,
        moe_intermediate_size=MI,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_parameters={
            "type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
        tie_word_embeddings=False,
    ),
    "minimax": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=5e6,
        rotary_dim=8,
        intermediate_size=MI,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=0,
        use_qk_norm=True,
        tie_word_embeddings=False,
    ),
    "recurrent_gemma": _cfg(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        conv1d_width=4,
        logits_soft_cap=30.0,
        attention_window_size=SW,
        block_types=["recurrent", "attention"],
    ),
    "mamba": dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        state_size=16,
        num_hidden_layers=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        time_step_rank="auto",
        tie_word_embeddings=True,
    ),
    "rwkv7": dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        norm_eps=1e-5,
        head_dim=16,
        num_hidden_layers=2,
        a_low_rank_dim=8,
        v_low_rank_dim=8,
        gate_low_rank_dim=16,
        decay_low_rank_dim=8,
    ),
}

TINY_ARCH_NAMES = sorted(TINY_ARCHS)

# Failures of mlx-lm 0.32.2 itself on these configs, for tests to skip or xfail.
KNOWN_MLX_LM_ISSUES: dict[str, str] = {
    "gemma3n": "uncached forward differs from cached decoding: without a cache "
    "the KV-sharing layers use their own k/v projections instead of the shared KV",
    "gemma2": "BatchGenerator with prompts of different lengths gives wrong tokens "
    "(the padding mask is broadcast over the KV-head axis when heads != kv heads)",
    "jamba": "BatchGenerator with prompts of different lengths gives wrong tokens "
    "for the left-padded prompt",
    "olmo_hybrid": "BatchGenerator with prompts of different lengths gives wrong "
    "tokens for the left-padded prompt",
    "internlm2": "BatchGenerator raises: dynamic NTK RoPE needs a scalar offset",
    "internlm3": "BatchGenerator raises: dynamic NTK RoPE needs a scalar offset",
    "gpt_bigcode": "BatchGenerator raises: learned positions need a scalar offset",
    "llama4": "BatchGenerator raises: ChunkedKVCache does not support batching",
    "recurrent_gemma": "Model.__init__ skips nn.Module.__init__, so "
    "trainable_parameters() / nn.value_and_grad raise AttributeError '_no_grad'",
}


def tiny_args(arch: str):
    """The ModelArgs of the tiny config for ``arch``."""
    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    cfg = copy.deepcopy(TINY_ARCHS[arch])
    return mod, mod.ModelArgs.from_dict({"model_type": arch, **cfg})


def _fill_zero_params(model, scale: float) -> None:
    """Give every all-zero floating parameter small random values.

    mlx-lm zero-initialises some tensors that real checkpoints fill in: MoE
    router weights and score-correction biases (all experts would tie), LayerNorm
    biases, gpt-oss attention sinks, and the mixing/gate tensors of rwkv7 and
    recurrent_gemma (their time-mixing branches would output exact zeros, making
    the model context-free). Random values keep every code path live in tests.
    """
    updates = [
        (k, scale * mx.random.normal(v.shape, dtype=v.dtype))
        for k, v in tree_flatten(model.parameters())
        if v.size and mx.issubdtype(v.dtype, mx.floating) and not mx.any(v).item()
    ]
    if updates:
        model.update(tree_unflatten(updates))


def build_tiny(arch: str, seed: int = 0, *, fill_zeros: bool = True):
    """A tiny random float32 model of architecture ``arch``, parameters evaluated.

    ``mx.random`` is seeded with ``seed`` before the model is built, so equal
    seeds give equal weights. With ``fill_zeros`` (the default), parameters that
    mlx-lm initialises to all zeros get small random values (see
    ``_fill_zero_params``); pass ``fill_zeros=False`` for mlx-lm's plain init.
    """
    mod, args = tiny_args(arch)
    mx.random.seed(seed)
    model = mod.Model(args)
    model.set_dtype(mx.float32)
    if fill_zeros:
        _fill_zero_params(model, 0.02)
    mx.eval(model.parameters())
    return model
