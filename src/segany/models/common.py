"""Small building blocks shared by the SAM components."""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as _module


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a ``(B, C, H, W)`` tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused layer_norm over channels-last data: same values as the reference's explicit
        # mean/variance (within 2e-6) at a fraction of the memory traffic.
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (``lin1``/``lin2`` keys)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, scratch: Scratch | None = None
                ) -> torch.Tensor:
        """``lin2(act(lin1(x)))``, plus ``residual`` (added as the last product is written) if given.
        ``scratch``: where the hidden layer may be written (see :class:`Scratch`)."""
        act = None if intercepted(self.act) else _FUSABLE.get((type(self.act), getattr(self.act, "approximate", None)))
        if act:  # applied as the product is written
            out = None if scratch is None else scratch.take_output("mlp_hidden", x, self.lin1.out_features)
            hidden = linear_layer(x, self.lin1, activation=act, out=out)
        else:
            hidden = self.act(self.lin1(x))
        return linear_layer(hidden, self.lin2, residual=residual, residual_owned=scratch is not None)


# Activation modules that :func:`linear` can apply inside its product: exact GELU and ReLU.
_FUSABLE = {(nn.GELU, "none"): "gelu", (nn.ReLU, None): "relu"}


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (``layers.i`` keys)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else F.relu(layer(x))
        return torch.sigmoid(x) if self.sigmoid_output else x


# Tokens an MLP takes at a time in CPU inference (mlp_in_chunks): 1024, 2048 and 4096 measured
# the same on MobileSAM and SAM 2 encoders, within noise; a whole 16384-token map ~1.3× slower.
CPU_MLP_ROWS = 2048


def mlp_in_chunks(x: torch.Tensor, lin1: nn.Linear, lin2: nn.Linear, norm: nn.Module | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """``lin2(gelu(lin1(norm(x))))`` of tokens ``(..., C)`` (``norm`` if given), plus ``residual``
    (shaped as the output) if given, the GELU and the residual applied as the products are written.

    In CPU inference on more than :data:`CPU_MLP_ROWS` tokens it goes a chunk of tokens at a time,
    so that a chunk's hidden layer stays in cache, where that of a large map would be written to
    fresh memory and read back (MobileSAM's second stage: 33 MB; SAM 2's first stage: 100 MB)."""
    rows = x.numel() // x.shape[-1]
    # A hook on one of the layers sees the whole map, as in the reference, not chunks of it.
    whole = not (is_plain(lin1, nn.Linear) and is_plain(lin2, nn.Linear)
                 and (norm is None or is_plain(norm, nn.LayerNorm)))
    if rows <= CPU_MLP_ROWS or whole or not onednn_products(x):
        y = x if norm is None else norm(x)
        hidden = linear_layer(y, lin1, activation="gelu")
        return linear_layer(hidden, lin2, residual=residual)
    flat = x.reshape(rows, -1)
    res = None if residual is None else residual.reshape(rows, -1)
    out = None
    for s in range(0, rows, CPU_MLP_ROWS):
        part = slice(s, s + CPU_MLP_ROWS)
        y = mlp_in_chunks(flat[part], lin1, lin2, norm, None if res is None else res[part])
        if out is None:  # the dtype the whole map's product would have (autocast, residual)
            out = y.new_empty(rows, y.shape[-1])
        out[part] = y
    return out.view(*x.shape[:-1], lin2.out_features)


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a 1×1, stride-1 ``conv`` of ``(B, C, H, W)`` maps. On channels-last data in CPU
    inference it is one matrix product over the channels, returned channels-last (PyTorch's CPU
    convolution took 3-4× as long for SAM 2's 256×256 maps)."""
    plain = (is_plain(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
             and conv.padding == (0, 0) and conv.groups == 1)
    if plain and onednn_products(x) and x.is_contiguous(memory_format=torch.channels_last):
        y = linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias)
        return y.permute(0, 3, 1, 2)
    return conv(x)


class Scratch:
    """Output buffers reused from block to block within one CPU inference pass of an encoder; a
    block given one also owns its input (the pass made it), so it may add its residuals in place.

    glibc's allocator maps every block larger than 32 MB afresh and returns it to the system when
    freed, so each of ViT-B's 38–50 MB products (qkv, the MLP's hidden layer) would otherwise
    page-fault its whole output in again at every block. One buffer per role, made once per pass
    and dropped with it: no state is left behind between calls.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def wanted(x: torch.Tensor) -> Scratch | None:
        """A new scratch for a pass over ``x`` where reuse is safe and pays (CPU, no autograd, not
        under ``torch.compile``), else None. Not for an encoder with hooks or stand-ins inside
        (:func:`plain_inside`): a hook may keep an output that a later block would overwrite."""
        return Scratch() if onednn_products(x) else None

    def take(self, role: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of ``numel`` elements (``like``'s dtype and device) for ``role``; what the
        previous taker of that role wrote there is overwritten."""
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
            buf = self._buffers[role] = like.new_empty(numel)
        return buf[:numel]

    def take_output(self, role: str, x: torch.Tensor, features: int) -> torch.Tensor:
        """A buffer for the ``(rows of x, features)`` output of a product of ``x``."""
        return self.take(role, x.numel() // x.shape[-1] * features, x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
           residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
           residual_owned: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x (..., K)``, ``weight (N, K)``, then ``activation`` (``"gelu"``,
    exact, or ``"relu"``) if given, then ``+ residual`` (shaped as the output) if given. ``out``: a
    contiguous buffer of the output's size the plain product may write to without autograd (a
    :meth:`Scratch.take_output`); the result is then a view of it. ``residual_owned``: the caller gives
    ``residual`` up, and the plain product may accumulate onto it in place (no fresh output, no
    bias copy, no separate add: two passes over the output instead of four).

    In CPU inference (fp32, or bf16 on a CPU with bf16 units; the dtype autocast would pick) this is
    one oneDNN call with the bias, the activation or the residual applied as the product is written
    (PyTorch's own path copies the bias into the output first, and runs the activation or the add
    as another pass over it), except for products of many rows in fp32 on a CPU without AVX-512,
    where MKL's product and in-place passes are faster (see :data:`ONEDNN_FP32_MAX_ROWS`).
    Elsewhere, with autograd on, and under ``torch.compile``, the plain ops.
    """
    if onednn_products(x):
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        shape, rows = (*x.shape[:-1], weight.shape[0]), x.numel() // x.shape[-1]
        if ((dtype == torch.float32 and rows <= ONEDNN_FP32_MAX_ROWS or dtype == torch.bfloat16 and CPU_NATIVE_BF16)
                and (weight.dtype == dtype or autocast and weight.dtype == torch.float32)):
            x, weight = x.to(dtype).reshape(rows, -1), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            if residual is None or activation:
                out = _ONEDNN_LINEAR(x, weight, bias, activation or "none", [], "none" if activation == "gelu" else "")
            elif residual.dtype == dtype:
                out = _ONEDNN_LINEAR.binary(x, residual.reshape(rows, -1), weight, bias, "add")
                return out.view(shape)
            else:  # an fp32 residual under bf16 autocast: the sum is fp32, as PyTorch's add would make it
                out = _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
            y = out.view(shape)
            return y if residual is None else residual + y
    # The in-place and out= products below bypass autocast: only for operands of one dtype.
    if (residual_owned and residual is not None and not activation and not torch.is_grad_enabled()
            and residual.dtype == x.dtype == weight.dtype and residual.is_contiguous()
            and residual.shape == (*x.shape[:-1], weight.shape[0])):
        acc = residual.view(-1, weight.shape[0])
        if bias is not None:
            acc.add_(bias)
        return acc.addmm_(x.reshape(acc.shape[0], -1), weight.t()).view(residual.shape)
    if out is not None and not torch.is_grad_enabled() and out.dtype == x.dtype == weight.dtype:
        rows = x.numel() // x.shape[-1]
        flat = out.view(rows, weight.shape[0])
        x2d = x.reshape(rows, -1)
        y = (torch.mm(x2d, weight.t(), out=flat) if bias is None else torch.addmm(bias, x2d, weight.t(), out=flat))
        y = y.view(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight, bias)
    if activation:
        y = activate(y, activation)  # y is new: in place unless autograd keeps the product
    if residual is None:
        return y
    in_place = not torch.is_grad_enabled() and residual.dtype == y.dtype and residual.shape == y.shape
    return y.add_(residual) if in_place else residual + y


def linear_layer(x: torch.Tensor, layer: nn.Module, activation: str | None = None,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 residual_owned: bool = False) -> torch.Tensor:
    """:func:`linear` with an ``nn.Linear``'s weight and bias, or, where ``layer`` is not a plain
    ``nn.Linear`` (a hook on it, a LoRA wrapper, a quantised stand-in: :func:`is_plain`), ``layer(x)``
    itself, then ``activation`` and ``residual`` as separate ops."""
    if is_plain(layer, nn.Linear):
        return linear(x, layer.weight, layer.bias, activation, residual, out, residual_owned)
    y = layer(x)
    if activation:  # out of place, not activate(): a hook on the layer may have kept y
        y = _ACTIVATIONS[activation][0](y)
    return y if residual is None else residual + y


def intercepted(module: nn.Module) -> bool:
    """Whether calling ``module`` would run more than its class's ``forward``: a hook of its own or
    one set on all modules, or a ``forward`` replaced on the instance (as accelerate's hooks do)."""
    return _intercepted_here(module) or _global_hooks()


def is_plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling ``module`` would only run ``cls.forward``: it is exactly a ``cls`` (not a
    subclass or a stand-in such as a LoRA wrapper or a dynamically quantised Linear, whose weight
    is a method) and not :func:`intercepted`. Only then may a fast path read its parameters or
    call its other methods instead of calling it."""
    return type(module) is cls and not intercepted(module)


def plain_tree(module: nn.Module) -> bool:
    """Whether no module in ``module``'s tree is :func:`intercepted` and each is of a class from segany
    or ``torch.nn``: a condition for its fused paths (outputs written into shared buffers, residuals
    added in place, maps taken in bands), whose callers otherwise compose the modules as the
    reference does. A fused path that relies on a part being of one class, or on a layer having
    a bias, checks that too (:func:`plain_inside`'s ``parts``, ``transformer._fusable_attention``)."""
    return not _global_hooks() and _plain_walk([module])


def plain_inside(module: nn.Module, **parts: type[nn.Module]) -> bool:
    """:func:`plain_tree` of ``module``'s submodules (its own hooks see its output, which its fused
    path computes as well), each of ``parts`` (attribute name → class) exactly of its class."""
    return (all(type(getattr(module, name, None)) is cls for name, cls in parts.items())
            and not _global_hooks() and _plain_walk([c for c in module._modules.values() if c is not None]))


def _plain_walk(stack: list[nn.Module]) -> bool:
    while stack:  # (not module.modules(): this walk is faster, ~1 µs a module)
        m = stack.pop()
        if _intercepted_here(m) or not type(m).__module__.startswith(("segany.", "torch.nn.modules.")):
            return False
        stack.extend(c for c in m._modules.values() if c is not None)
    return True


def _intercepted_here(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation`` (``"gelu"``, exact, or ``"relu"``) of a tensor the caller made: in place
    without autograd (no fresh output to allocate and touch), else out of place, as it is under
    ``torch.compile`` too (which fuses it with the ops around it itself)."""
    out_of_place, in_place = _ACTIVATIONS[activation]
    # An if, not a bool index into the pair: torch 2.11's compiler broke the graph at every MLP on
    # that index, and 12-32 blocks then ran eagerly past its recompile limit.
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return out_of_place(x)
    return in_place(x)


# activation → (out of place, in place)
_ACTIVATIONS = {"gelu": (F.gelu, getattr(torch._C._nn, "gelu_", F.gelu)), "relu": (F.relu, F.relu_)}


def half_residual_stream(x: torch.Tensor) -> torch.Tensor:
    """``x`` in bf16 for CPU inference under bf16 autocast (``half=True``), else unchanged.

    A transformer's residual stream kept in fp32 under autocast costs a cast before every product
    and fp32 adds; in bf16 the LayerNorms read it directly (they compute in fp32 inside) and the
    adds fuse into the products (:func:`linear`'s ``residual``). ViT-B encoder on a 2-core AVX512-BF16
    CPU: ~8 % faster, embedding error against fp32 1.0 % → 1.3 % (random weights; the reference's
    encoder with its weights cast to bf16 gives 1.1 % on a GPU). GPUs, autograd and CPUs without
    bf16 units keep fp32, and so do encoders with hooks or stand-ins inside (their callers skip
    this: a hook sees the reference's fp32 stream).
    """
    if (CPU_NATIVE_BF16 and onednn_products(x) and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return x.to(torch.bfloat16, memory_format=torch.contiguous_format)
    return x


def onednn_products(x: torch.Tensor) -> bool:
    """Whether :func:`linear` runs ``x``'s products through oneDNN: CPU inference outside
    ``torch.compile`` (which fuses these itself)."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and _ONEDNN_LINEAR is not None
            and not torch.compiler.is_compiling())


def _onednn_linear():
    """PyTorch's fused oneDNN linear (the kernel its CPU compiler emits), if this build has it."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def _cpu_has(*features: str) -> bool:
    """Whether this CPU has any of ``features`` (``torch.cpu._is_<feature>_supported``)."""
    try:
        return any(getattr(torch.cpu, f"_is_{f}_supported")() for f in features)
    except AttributeError:
        return False


_ONEDNN_LINEAR = _onednn_linear()
# Whether this CPU computes bf16 products in hardware. Elsewhere bf16 is emulated: a ViT-B-sized
# product ran 8× slower than in fp32 on a 2-core AVX2 EPYC.
CPU_NATIVE_BF16 = _cpu_has("avx512_bf16", "amx_tile")
# Whether this CPU has AVX-512: where it has not, MKL takes the fp32 products oneDNN loses
# (ONEDNN_FP32_MAX_ROWS below; the decoder's 4096-deep products in transformer._rows_times_image).
CPU_AVX512 = _cpu_has("avx512")
# The most rows of an fp32 product that go through oneDNN. On an AVX-512 EPYC its fused products
# beat MKL at every size of these models; on a 2-core AVX2 EPYC (Zen 3) MKL's products plus an
# in-place pass ran 15–30 % faster for ViT-B's 4096-row products (fc1 with GELU 134 against 198 ms),
# while oneDNN kept its lead for the decoder's few-row products (7 × 256 × 4096: 0.23 against 0.35 ms).
ONEDNN_FP32_MAX_ROWS = sys.maxsize if CPU_AVX512 else 256
