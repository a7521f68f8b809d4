"""Make PyPI's torchvision importable next to torch+cpu (installed by install.sh on CPU machines only).

PyPI's x86_64 torchvision wheels are CUDA builds: their `_C.so` cannot load next to torch 2.13.0+cpu, and the
import then dies in `torchvision/_meta_registrations.py`, which registers fake kernels for the
`torchvision::nms` and `torchvision::qnms` operators that `_C.so` would have defined. transformers needs
torchvision for the Qwen2.5-VL image/video processors (they use `transforms.v2`, pure Python).

This module, imported at interpreter start through `tv_cpu_shim.pth`, installs a one-shot import hook: the
first time anything imports `torchvision`, it defines those two operator schemas (with a plain PyTorch CPU
kernel for nms) before torchvision's own code runs. Interpreter start-up is unaffected: torch is imported only
when torchvision is. The other C ops (roi_align, deform_conv, image/video decoding) stay unavailable.
"""
import importlib.abc
import sys

_LIBS = []  # keep the torch.library.Library objects alive for the life of the process


def _nms_cpu(dets, scores, iou_threshold):
    import torch
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _define_ops():
    import torch
    try:
        torch.ops.torchvision.nms  # already defined (a working _C.so was loaded)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms_cpu, "CPU")
    _LIBS.append(lib)


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_ops()
        return None  # let the normal finders import the real package


if not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionHook())
