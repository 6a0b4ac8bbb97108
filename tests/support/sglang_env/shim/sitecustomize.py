"""CPU shim, part 1: lets the PyPI torchvision (a CUDA build) import on top of the CPU torch.

Python imports `sitecustomize` at start-up from PYTHONPATH, which is how this runs in the SGLang
server process and in every process it spawns. The PyPI torchvision's C++ ops library links
libtorch_cuda.so, which the CPU torch lacks, so it silently fails to load; torchvision then still
registers fake kernels for `torchvision::nms` / `torchvision::qnms` at import and dies with
"operator torchvision::nms does not exist". Defining the two schemas first makes that import work;
any real call of the ops raises, which is fine: the SGLang text path never calls them.

torch is imported only when something imports torchvision, so processes that never touch
torchvision pay nothing.

CPU shim, part 3 (part 2 is ./sgl_kernel): `--enable-return-routed-experts` on the CPU build.
The routed-experts capturer keeps its host buffer (`BaseHostCache` in
sglang/srt/state_capturer/base.py) in pinned memory: it allocates through
`ALLOC_MEMORY_FUNCS[device](..., pin_memory=True)`, which registers the pages with
`cudaHostRegister`, and the CPU torch dies there with "Torch not compiled with CUDA enabled".
Pinning only speeds up device-to-host copies, and on the CPU there is no device. Right after that
module is imported, its own reference to `ALLOC_MEMORY_FUNCS` is replaced by one that allocates
the same buffer unpinned; every other host pool of SGLang keeps the original table, and the
installed package files stay as they are.
"""
import functools
import importlib.abc
import importlib.util
import sys

# Schemas as torchvision's csrc/ops/nms.cpp and quantized/qnms declare them.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library must stay alive, or its definitions are dropped


def _define_torchvision_schemas() -> None:
    global _library
    import torch

    if torch.version.cuda is not None:
        # A CUDA torch loads torchvision's real ops library, which defines these itself.
        return
    missing = [s for s in _SCHEMAS if not hasattr(torch.ops.torchvision, s.split("(")[0])]
    if not missing:
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing:
        _library.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the schema definitions just before the first `import torchvision`, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _define_torchvision_schemas()
        return None  # the regular finders do the import itself


if "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _BeforeTorchvision())


_CAPTURER_BASE = "sglang.srt.state_capturer.base"


class _UnpinnedAllocs:
    """Stands in for SGLang's `ALLOC_MEMORY_FUNCS` table (device -> allocation function) inside one
    module: the same functions, called with pin_memory=False."""

    def __init__(self, table):
        self._table = table

    def __getitem__(self, device):
        alloc = self._table[device]

        @functools.wraps(alloc)
        def unpinned(*args, **kwargs):
            kwargs["pin_memory"] = False
            return alloc(*args, **kwargs)

        return unpinned


def _unpin_capturer_host_buffer(module) -> None:
    import torch

    if torch.cuda.is_available():
        # A GPU build pins as SGLang intends (and needs it for its asynchronous copies).
        return
    module.ALLOC_MEMORY_FUNCS = _UnpinnedAllocs(module.ALLOC_MEMORY_FUNCS)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` executes (in every process: spawned
    SGLang workers import this sitecustomize again), then steps aside."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the regular finders, now that this one is gone
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if _CAPTURER_BASE not in sys.modules:
    sys.meta_path.insert(0, _AfterImport(_CAPTURER_BASE, _unpin_capturer_host_buffer))
