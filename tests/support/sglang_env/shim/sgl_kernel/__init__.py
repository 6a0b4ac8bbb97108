"""CPU shim, part 2: a stand-in for `sgl_kernel`, SGLang's CUDA kernel package (not installable here).

SGLang imports a few of its names at module import time on every device; on the CPU path
(`--device cpu --attention-backend torch_native`) it never calls them. Each name below is a stub that
raises if it is ever called, so a code path that really needs a CUDA kernel fails loudly instead of
computing something wrong. The list is exactly what sglang==0.5.23 imports while it starts a dense
Qwen3 server on the CPU; a newer SGLang that imports more fails at start with an ImportError naming
the missing one.
"""

__version__ = "0.0.0+cpu-shim"


def _unavailable(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is a CPU-shim stub (tests/support/sglang_env/shim): "
                                  f"this SGLang code path needs the CUDA kernel package")

    stub.__name__ = stub.__qualname__ = name
    return stub


_NAMES = (
    "copy_all_layer_kv_cache_cpu",
    "assign_req_to_token_pool_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
)

globals().update({name: _unavailable(name) for name in _NAMES})
