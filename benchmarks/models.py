"""Model definitions shared by the curvjax benchmarks.

Two networks in flax linen, each with a twin in PyTorch that is built *from the flax parameters*,
so that curvjax and BackPACK can be timed on the same weights and data:

- :class:`ThreeC3D` -- the DeepOBS ``3c3d`` convolutional network (895,210 parameters for
  CIFAR-10 shapes, 32x32x3 inputs and 10 classes), with a ``num_classes`` argument for the
  CIFAR-100 variant (918,340 parameters);
- :class:`WideMLP` -- a fully connected ReLU network on flattened inputs (1,841,162 parameters
  with the defaults on CIFAR-10 shapes).

Layout conversions done by :func:`torch_sequential_from_flax`:

- convolution kernels: flax ``HWIO`` ``[kh, kw, in, out]`` -> torch ``OIHW``;
- ``SAME`` padding of the 3x3 convolution -> ``padding=1`` (an integer: BackPACK's unfold does
  not take ``"same"``);
- dense kernels: flax ``[in, out]`` -> torch ``[out, in]``;
- the first dense layer after a flatten: flax flattens ``NHWC`` (index ``(h * W + w) * C + c``),
  torch flattens ``NCHW`` (index ``(c * H + h) * W + w``), so the rows of that kernel are permuted;
- max-pooling 3x3 / stride 2 with TensorFlow's ``SAME`` padding pads only at the end (by one
  element for the even sizes 28, 12 and 6 met here); torch's ``ceil_mode=True`` without padding
  produces exactly those windows.

torch is imported lazily, only by :func:`torch_sequential_from_flax`, so this module works
without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: Parameter count of DeepOBS 3c3d on CIFAR-10 (BackPACK, Fig. 6).
THREE_C_THREE_D_PARAMS = 895_210

#: Input shape (without the batch axis) of CIFAR-10 / CIFAR-100 images, NHWC.
CIFAR_SHAPE = (32, 32, 3)


class ThreeC3D(nn.Module):
    """DeepOBS ``3c3d``: three convolutions with max-pooling, then three dense layers.

    conv(64, 5x5, VALID) ReLU, maxpool 3x3/2 SAME; conv(96, 3x3, VALID) ReLU, maxpool 3x3/2 SAME;
    conv(128, 3x3, SAME) ReLU, maxpool 3x3/2 SAME; flatten; dense 512 ReLU; dense 256 ReLU;
    dense ``num_classes``.

    Attributes:
        num_classes: number of outputs (10 for CIFAR-10, 100 for CIFAR-100).
        conv_features: output channels of the three convolutions; the defaults are DeepOBS's,
            smaller values give a cheap model of the same structure (used by ``--smoke``).
        dense_features: widths of the two hidden dense layers.
    """

    num_classes: int = 10
    conv_features: Sequence[int] = (64, 96, 128)
    dense_features: Sequence[int] = (512, 256)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Map images ``[N, H, W, 3]`` to logits ``[N, num_classes]``."""
        kernels = ((5, 5), (3, 3), (3, 3))
        paddings = ("VALID", "VALID", "SAME")
        for features, kernel, padding in zip(self.conv_features, kernels, paddings, strict=True):
            x = nn.Conv(features, kernel, padding=padding)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        for features in self.dense_features:
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(self.num_classes)(x)


class WideMLP(nn.Module):
    """A wide fully connected ReLU network on flattened inputs.

    Attributes:
        num_classes: number of outputs.
        hidden_features: widths of the hidden layers; with the default ``(512, 512)`` and
            CIFAR-10 inputs (3,072 features) the network has 1,841,162 parameters.
    """

    num_classes: int = 10
    hidden_features: Sequence[int] = (512, 512)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Map inputs ``[N, ...]`` to logits ``[N, num_classes]``."""
        x = x.reshape((x.shape[0], -1))
        for features in self.hidden_features:
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(self.num_classes)(x)


def count_params(params: Any) -> int:
    """Total number of scalar entries over all leaves of a parameter pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))


def init_model(
    model: nn.Module, key: jax.Array, input_shape: Sequence[int] = CIFAR_SHAPE
) -> dict[str, Any]:
    """Initialise ``model`` on a single dummy input of shape ``input_shape`` (no batch axis).

    The initialisation is jitted: one compilation instead of one per operation.
    """
    return jax.jit(model.init)(key, jnp.zeros((1, *input_shape), jnp.float32))


def _conv_output_size(size: int, kernel: int, padding: str) -> int:
    """Spatial size after a stride-1 convolution."""
    return size if padding == "SAME" else size - kernel + 1


def _pool_output_size(size: int) -> int:
    """Spatial size after 3x3 / stride-2 max-pooling with ``SAME`` padding."""
    return -(-size // 2)


def _layer_names(model: nn.Module) -> list[str]:
    """Flax submodule names in the order of the torch twin's layers."""
    if isinstance(model, ThreeC3D):
        convs = [f"Conv_{i}" for i in range(len(model.conv_features))]
        return convs + [f"Dense_{i}" for i in range(len(model.dense_features) + 1)]
    if isinstance(model, WideMLP):
        return [f"Dense_{i}" for i in range(len(model.hidden_features) + 1)]
    raise TypeError(f"no torch twin for model type {type(model).__name__}")


def _flatten_rows(model: nn.Module, input_shape: Sequence[int]) -> np.ndarray | None:
    """Permutation of the first dense kernel's rows from flax's NHWC to torch's NCHW flatten.

    Row ``r`` of the flax kernel belongs to the NHWC position ``(h, w, c)``; torch's ``Flatten``
    enumerates NCHW positions, so torch's row ``(c, h, w)`` is flax's row ``rows[(c, h, w)]``.
    ``None`` where no permutation is needed (the MLP flattens its NHWC input on both sides).
    """
    if not isinstance(model, ThreeC3D):
        return None
    height, width, _ = input_shape
    for kernel, padding in zip((5, 3, 3), ("VALID", "VALID", "SAME"), strict=True):
        height = _pool_output_size(_conv_output_size(height, kernel, padding))
        width = _pool_output_size(_conv_output_size(width, kernel, padding))
    channels = model.conv_features[-1]
    rows = np.arange(height * width * channels).reshape(height, width, channels)
    return rows.transpose(2, 0, 1).reshape(-1)


def to_torch_layout(
    model: nn.Module,
    tree: dict[str, Any],
    input_shape: Sequence[int] = CIFAR_SHAPE,
    lead: int = 0,
) -> list[np.ndarray]:
    """Convert a params-shaped pytree to the parameter layout and order of the torch twin.

    Works for the parameters themselves and for any quantity with the same layout (gradients,
    ``sum_grad_squared``, ``variance``), also with ``lead`` leading axes (``lead=1`` for
    per-example gradients ``[N, *shape]``; ``batch_l2`` leaves ``[N]`` only need the ordering,
    which ``lead=1`` gives for them too).

    Args:
        model: a :class:`ThreeC3D` or :class:`WideMLP` instance.
        tree: ``{"Conv_0": {"kernel": ..., "bias": ...}, ...}`` (the ``"params"`` collection).
        input_shape: input shape without the batch axis, NHWC.
        lead: number of leading axes in front of each parameter's own shape.

    Returns:
        Numpy float32 arrays in the order of ``torch_sequential_from_flax(...).parameters()``:
        for each layer its weight (``OIHW`` for a convolution, ``[out, in]`` for a dense layer,
        first dense layer's inputs in NCHW flatten order), then its bias.
    """
    rows = _flatten_rows(model, input_shape)
    arrays = []
    first_dense = True
    for name in _layer_names(model):
        kernel = np.asarray(tree[name]["kernel"], dtype=np.float32)
        bias = np.asarray(tree[name]["bias"], dtype=np.float32)
        axes = tuple(range(lead))
        if kernel.ndim - lead == 4:  # HWIO -> OIHW
            kernel = kernel.transpose(*axes, lead + 3, lead + 2, lead, lead + 1)
        elif kernel.ndim - lead == 2:  # [in, out] -> [out, in]
            if first_dense and rows is not None:
                kernel = np.take(kernel, rows, axis=lead)
            first_dense = False
            kernel = kernel.transpose(*axes, lead + 1, lead)
        # np.array copies: the result is writable and C-contiguous, as torch.from_numpy wants.
        arrays += [np.array(kernel, order="C"), np.array(bias, order="C")]
    return arrays


def torch_sequential_from_flax(
    model: nn.Module, variables: dict[str, Any], input_shape: Sequence[int] = CIFAR_SHAPE
):
    """Build a ``torch.nn.Sequential`` that computes the same function as the flax ``model``.

    Args:
        model: a :class:`ThreeC3D` or :class:`WideMLP` instance.
        variables: its flax variables ``{"params": ...}`` (as returned by ``model.init``).
        input_shape: input shape without the batch axis, NHWC (``(32, 32, 3)`` for CIFAR).

    Returns:
        A float32 ``torch.nn.Sequential`` whose parameters are copies of ``variables`` (see
        :func:`to_torch_layout`). Its input is NCHW for :class:`ThreeC3D` (transpose the flax
        input with ``x.transpose(0, 3, 1, 2)``) and the flax input as is for :class:`WideMLP`
        (which flattens its NHWC input itself).
    """
    import torch
    from torch import nn as tnn

    params = variables["params"]
    layers: list[tnn.Module] = []
    if isinstance(model, ThreeC3D):
        paddings = ("VALID", "VALID", "SAME")
        for index, (kernel_size, padding) in enumerate(zip((5, 3, 3), paddings, strict=True)):
            in_channels, out_channels = np.shape(params[f"Conv_{index}"]["kernel"])[2:]
            # An integer, not "same": BackPACK's unfold needs numbers (odd kernels: symmetric).
            torch_padding = kernel_size // 2 if padding == "SAME" else 0
            layers += [
                tnn.Conv2d(in_channels, out_channels, kernel_size, padding=torch_padding),
                tnn.ReLU(),
                tnn.MaxPool2d(3, stride=2, ceil_mode=True),
            ]
        layers.append(tnn.Flatten())
        hidden = len(model.dense_features)
    else:
        layers.append(tnn.Flatten())
        hidden = len(model.hidden_features)
    for index in range(hidden + 1):
        in_features, out_features = np.shape(params[f"Dense_{index}"]["kernel"])
        layers.append(tnn.Linear(in_features, out_features))
        if index < hidden:
            layers.append(tnn.ReLU())
    sequential = tnn.Sequential(*layers)
    arrays = to_torch_layout(model, params, input_shape)
    with torch.no_grad():
        for parameter, array in zip(sequential.parameters(), arrays, strict=True):
            if tuple(parameter.shape) != array.shape:
                raise ValueError(f"shape mismatch: torch {tuple(parameter.shape)} vs {array.shape}")
            parameter.copy_(torch.from_numpy(array))
    return sequential
