"""Inference-only execution of frozen convolutions through oneDNN (CPU).

# b batch · c channels · h w grid

For a network in eval mode run without autograd, a convolution followed by BatchNorm (running
statistics), ReLU and a residual addition is one affine map and two point-wise operations. Here
it becomes a single oneDNN call: BatchNorm folded into the weights and bias, ReLU and the
addition fused as post-ops, and the weights reordered once into oneDNN's blocked layout for the
input shape they will see (PyTorch's eager convolution reorders them on every call). On a CPU
this removes most of the memory passes of a ResNet, which dominate once several processes share
the machine.

The operators are ``torch.ops.mkldnn._convolution_pointwise`` (and its ``.binary`` overload), the
ones Inductor emits for the same fusion. :func:`available` says whether this PyTorch has them;
callers keep their module path as the reference and as the fallback, and test both equal.

:class:`FrozenConvCache` holds the frozen convolutions of one module for the last few input
shapes and rebuilds them whenever a parameter or buffer of that module changes (in place, by
``load_state_dict``, or by moving the module), so a cached weight is never stale.
"""

from collections import OrderedDict
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["FrozenConv", "FrozenConvCache", "available"]


def available() -> bool:
    """Whether this PyTorch build offers oneDNN's fused convolution operators."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_convolution_pointwise") and hasattr(
        ops, "_reorder_convolution_weight"
    )


class FrozenConv:
    """A convolution (with an optional BatchNorm folded in) frozen for one input shape.

    Args:
        conv: the convolution (any groups, stride, padding, dilation; zero padding only).
        bn: a BatchNorm applied to its output, folded in with its running statistics.
        input_shape: ``(b, c, h, w)`` of the inputs it will see (the weights are reordered for it).
    """

    __slots__ = ("bias", "dilation", "groups", "padding", "stride", "weight")

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, input_shape: Sequence[int]) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{conv} must use numeric zero padding to be frozen")
        with torch.no_grad():
            weight, bias = conv.weight, conv.bias
            if bn is not None:
                if bn.running_mean is None or bn.running_var is None:
                    raise ValueError(f"{bn} has no running statistics to fold")
                weight, bias = fuse_conv_bn_weights(
                    weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
                )
            self.padding = list(conv.padding)
            self.stride = list(conv.stride)
            self.dilation = list(conv.dilation)
            self.groups = conv.groups
            self.bias = None if bias is None else bias.detach().contiguous()
            self.weight = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach().contiguous(), self.padding, self.stride, self.dilation, self.groups, list(input_shape)
            )

    def __call__(
        self, x: Float[Tensor, "b c h w"], *, relu: bool = False, residual: Float[Tensor, "b o h2 w2"] | None = None
    ) -> Float[Tensor, "b o h2 w2"]:
        """``relu?(conv(x) + residual?)`` in one oneDNN call."""
        unary = "relu" if relu else "none"
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, unary, [], ""
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x,
            residual,
            self.weight,
            self.bias,
            self.padding,
            self.stride,
            self.dilation,
            self.groups,
            "add",
            None,
            unary if relu else None,
            [],
            "",
        )


class FrozenConvCache:
    """Frozen convolutions of ``module``, keyed by a name and the input shape.

    :meth:`validate` (once per forward pass) drops everything when any parameter or buffer of
    ``module`` changed since the last call; at most ``max_shapes`` input shapes are kept (least
    recently used dropped first), each holding one copy of the folded weights.
    """

    def __init__(self, module: nn.Module, *, max_shapes: int = 2) -> None:
        self._module = [module]  # a list, so that nn.Module does not adopt it as a child
        self._max_shapes = max_shapes
        self._state: tuple = ()
        self._shapes: OrderedDict[tuple[int, ...], dict[str, FrozenConv]] = OrderedDict()

    def _fingerprint(self) -> tuple:
        module = self._module[0]
        tensors = [*module.parameters(), *module.buffers()]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def validate(self) -> None:
        """Forget every frozen convolution if the module's tensors changed."""
        state = self._fingerprint()
        if state != self._state:
            self._shapes.clear()
            self._state = state

    def get(
        self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, x: Float[Tensor, "b c h w"], *, shape_key: tuple
    ) -> FrozenConv:
        """The frozen ``conv`` (+ ``bn``) named ``name`` for inputs shaped like ``x`` in a pass keyed ``shape_key``."""
        convs = self._shapes.get(shape_key)
        if convs is None:
            convs = self._shapes[shape_key] = {}
            while len(self._shapes) > self._max_shapes:
                self._shapes.popitem(last=False)
        else:
            self._shapes.move_to_end(shape_key)
        frozen = convs.get(name)
        if frozen is None:
            frozen = convs[name] = FrozenConv(conv, bn, tuple(x.shape))
        return frozen

    def clear(self) -> None:
        self._shapes.clear()
        self._state = ()

    def __getstate__(self) -> dict:
        """Copies and pickles start empty: reordered weights are a cache, rebuilt on demand."""
        return {"_module": self._module, "_max_shapes": self._max_shapes, "_state": (), "_shapes": OrderedDict()}
