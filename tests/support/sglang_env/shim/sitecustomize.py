"""CPU shim, part 1: lets the PyPI torchvision (a CUDA build) import on top of the CPU torch.

Python imports `sitecustomize` at start-up from PYTHONPATH, which is how this runs in the SGLang
server process and in every process it spawns. The PyPI torchvision's C++ ops library links
libtorch_cuda.so, which the CPU torch lacks, so it silently fails to load; torchvision then still
registers fake kernels for `torchvision::nms` / `torchvision::qnms` at import and dies with
"operator torchvision::nms does not exist". Defining the two schemas first makes that import work;
any real call of the ops raises, which is fine: the SGLang text path never calls them.

torch is imported only when something imports torchvision, so processes that never touch
torchvision pay nothing.
"""
import importlib.abc
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
