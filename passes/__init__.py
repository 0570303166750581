"""g4c.passes — IR-to-IR rewrites (fusions, pruning, KV-cache planning, clean-ups), one per module,
each proven against the reference interpreter (`g4c.passes.equivalence`)."""

from g4c.passes import (cse, dce, fold_layer_scalar, fuse_attention, fuse_encoder_attention, fuse_lm_head, fuse_mlp,
                        fuse_moe, fuse_ple, fuse_residual_norm, plan_kv_cache, prune_kv_shared_prefill)
from g4c.passes.manager import (DEFAULT_PIPELINE, Pass, PassContext, PassManager, available_passes,
                                resolve_passes)

PASS_MODULES = (fuse_ple, fuse_attention, fuse_encoder_attention, fuse_moe, fuse_mlp, fuse_lm_head, fuse_residual_norm, fold_layer_scalar,
                prune_kv_shared_prefill, plan_kv_cache, cse, dce)

__all__ = ["DEFAULT_PIPELINE", "Pass", "PassContext", "PassManager", "available_passes",
           "resolve_passes", "PASS_MODULES"]
