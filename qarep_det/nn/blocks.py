"""Re-parameterizable blocks: RepVGG (the baseline), QARepVGG (its quantization-friendly redesign) and QARepVGG V2.

All train as parallel 3x3 / 1x1 / identity (/ average-pool) branches and ``reparameterize()`` in place into one 3x3
conv with bias followed by the block's activation (``act``: ReLU by default, see ``activation``). Fusion reads
BatchNorm running statistics, as Ultralytics' own ``fuse()`` does, whatever the module's train/eval flag: a fused
block has no BatchNorm left, so the flag no longer changes its output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qarep_det.nn.activation import make_activation
from qarep_det.nn.fusion import avg_pool_kernel, bn_scale, fold_bn, fused_conv, identity_kernel, pad_to_3x3
from qarep_det.nn.registry import yaml_module


def check_conv_args(name: str, c1: int, c2: int, s: int, g: int, strides: tuple[int, ...] = (1, 2)) -> None:
    """Raise one readable ``ValueError`` for channel/stride/group arguments no conv of ours can take."""
    for label, value in (("c1", c1), ("c2", c2), ("g", g)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {label} must be a positive int, got {value!r}")
    if s not in strides:
        raise ValueError(f"{name}: stride s must be one of {strides}, got {s!r}")
    if c1 % g or c2 % g:
        raise ValueError(f"{name}: channels c1={c1} and c2={c2} must both be divisible by groups g={g}")


def conv_bn(c1: int, c2: int, k: int, s: int, g: int) -> nn.Sequential:
    """A bias-free conv followed by BatchNorm, the unit every branch is built from."""
    return nn.Sequential(
        nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False),
        nn.BatchNorm2d(c2),
    )


def fold_conv_bn(branch: nn.Sequential) -> tuple[Tensor, Tensor]:
    """Kernel and bias of a ``conv_bn`` branch."""
    conv, bn = branch
    return fold_bn(conv.weight, bn)


class Reparameterizable(nn.Module):
    """A unit that trains in one form and fuses in place into a single conv with bias, followed by its activation.

    Subclasses build their branches (named in ``branch_names``, deleted on fusion), define ``forward_branches``
    (the pre-ReLU output in training form), ``fused_kernel_bias`` (that output as one kernel and bias) and
    ``geometry`` (a conv of theirs whose stride and groups the fused conv takes).
    """

    branch_names: tuple[str, ...] = ()

    def __init__(self, act: str = "relu") -> None:
        super().__init__()
        self.act = make_activation(act)

    @property
    def fused(self) -> bool:
        """True once ``reparameterize()`` has replaced the branches with a single conv."""
        return hasattr(self, "conv")

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x) if self.fused else self.forward_branches(x))

    def forward_branches(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def fused_kernel_bias(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def geometry(self) -> nn.Conv2d:
        raise NotImplementedError

    def branch_bns(self) -> dict[str, nn.BatchNorm2d]:
        """The training form's BatchNorms by branch name (what a diagnosis reads the BN scales of); none once fused."""
        return {}

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one conv with bias, in place. Calling it again does nothing."""
        if self.fused:
            return
        kernel, bias = self.fused_kernel_bias()
        self.conv = fused_conv(self.geometry(), kernel, bias)
        for name in self.branch_names:
            delattr(self, name)


class RepBlock(Reparameterizable):
    """Shared shape of both block flavours: argument checks, the identity rule, the 3x3 branch's geometry."""

    def __init__(self, c1: int, c2: int, s: int = 1, g: int = 1, act: str = "relu") -> None:
        super().__init__(act)
        check_conv_args(type(self).__name__, c1, c2, s, g)
        self.c1, self.c2, self.s, self.g = c1, c2, s, g
        self.has_identity = c1 == c2 and s == 1

    def geometry(self) -> nn.Conv2d:
        return self.branch_3x3[0]

    def identity(self, like: Tensor) -> Tensor:
        """The identity branch as a 3x3 kernel (only meaningful when ``has_identity``)."""
        return identity_kernel(self.c1, self.g, like)

    def extra_repr(self) -> str:
        return f"c1={self.c1}, c2={self.c2}, s={self.s}, g={self.g}, identity={self.has_identity}, fused={self.fused}"


class ThreeBranchBlock(RepBlock):
    """The RepVGG family as one block: ``act(post(bn(conv3x3(x)) + bn1(conv1x1(x)) + bn_id(x)))``, the identity
    term only when c1 == c2 and s == 1, and ``post``, ``bn1``, ``bn_id`` each a BatchNorm or nothing. Three class
    flags say which, and that is all that separates RepVGG from QARepVGG and the steps of the QARepVGG paper's
    ablation between them (Chu et al., AAAI 2024):

    - ``bn_1x1``: the 1x1 branch is conv + BN (else a plain bias-free conv);
    - ``bn_identity``: the identity branch is a BN (else the plain tap ``x``);
    - ``bn_post``: one BN after the sum (``post``; else none).

    Every combination fuses with the same kernel algebra, so the steps differ in training only. Subclasses set the
    flags and list their branch modules in ``branch_names``; the flags live on the class, not the instance, so a
    pickled block of an older version (same attribute and branch names) unpickles unchanged.
    """

    bn_1x1: bool
    bn_identity: bool
    bn_post: bool

    def __init__(self, c1: int, c2: int, s: int = 1, g: int = 1, act: str = "relu") -> None:
        super().__init__(c1, c2, s, g, act)
        self.branch_3x3 = conv_bn(c1, c2, 3, s, g)
        self.branch_1x1 = conv_bn(c1, c2, 1, s, g) if self.bn_1x1 else nn.Conv2d(c1, c2, 1, s, 0, groups=g, bias=False)
        if self.bn_identity:
            self.branch_identity = nn.BatchNorm2d(c2) if self.has_identity else None
        if self.bn_post:
            self.bn = nn.BatchNorm2d(c2)

    def shortcut(self, x: Tensor) -> Tensor:
        """What an identity block adds to the two conv branches, before the identity BN if there is one: ``x``."""
        return x

    def shortcut_kernel(self, like: Tensor) -> Tensor:
        """:meth:`shortcut` as a 3x3 kernel."""
        return self.identity(like)

    def forward_branches(self, x: Tensor) -> Tensor:
        y = self.branch_3x3(x) + self.branch_1x1(x)
        if self.has_identity:
            tap = self.shortcut(x)
            y = y + (self.branch_identity(tap) if self.bn_identity else tap)
        return self.bn(y) if self.bn_post else y

    def branch_bns(self) -> dict[str, nn.BatchNorm2d]:
        if self.fused:
            return {}
        bns = {"3x3": self.branch_3x3[1]}
        if self.bn_1x1:
            bns["1x1"] = self.branch_1x1[1]
        if self.bn_identity and self.has_identity:
            bns["identity"] = self.branch_identity
        if self.bn_post:
            bns["post"] = self.bn
        return bns

    def fused_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = fold_conv_bn(self.branch_3x3)
        if self.bn_1x1:
            k1, b1 = fold_conv_bn(self.branch_1x1)
            kernel, bias = kernel + pad_to_3x3(k1), bias + b1
        else:
            kernel = kernel + pad_to_3x3(self.branch_1x1.weight)
        if self.has_identity:
            k_id = self.shortcut_kernel(kernel)
            if self.bn_identity:
                k_id, b_id = fold_bn(k_id, self.branch_identity)
                bias = bias + b_id
            kernel = kernel + k_id
        return fold_bn(kernel, self.bn, bias) if self.bn_post else (kernel, bias)


@yaml_module
class RepVGGBlock(ThreeBranchBlock):
    """RepVGG (Ding et al., CVPR 2021): ``relu(bn(conv3x3) + bn(conv1x1) + bn(x))``, identity only if c1 == c2, s == 1.
    Steps S0 (with ``--rep-l2 custom``, as its authors train it) and S1 (plain weight decay) of the paper's ablation.

    The identity BN sees post-ReLU input; a dead channel drives its ``gamma / sigma`` up by orders of magnitude,
    which is what ruins INT8 after fusion. Kept as the baseline for A/B comparisons.
    """

    bn_1x1, bn_identity, bn_post = True, True, False
    branch_names = ("branch_3x3", "branch_1x1", "branch_identity")

    def custom_l2_kernels(self) -> tuple[Tensor, Tensor]:
        """The 3x3 and 1x1 conv weights: what RepVGG's custom L2 penalizes instead of weight decay."""
        return self.branch_3x3[0].weight, self.branch_1x1[0].weight

    def custom_l2(self) -> Tensor:
        """RepVGG's custom L2 (Ding et al., CVPR 2021): a squared norm of the *equivalent* kernel.

        The 3x3 kernel's ring (non-centre taps) counts as is. At the centre, where the 1x1 branch adds in, the term
        is ``(K3c * t3 + K1 * t1)^2 / (t3^2 + t1^2)`` with ``t = gamma / sqrt(var + eps)`` of each branch's BN
        (detached: kernels get penalized): the fused centre, normalized so that the penalty equals plain L2 when one
        branch is absent.
        """
        k3, k1 = self.custom_l2_kernels()
        t3, t1 = (bn_scale(branch[1]).detach().reshape(-1, 1, 1, 1) for branch in (self.branch_3x3, self.branch_1x1))
        centre = k3[:, :, 1:2, 1:2]
        ring = k3.square().sum() - centre.square().sum()
        equivalent = centre * t3 + k1 * t1
        return ring + (equivalent.square() / (t3.square() + t1.square())).sum()


@yaml_module
class RepVGGNoIdBNBlock(ThreeBranchBlock):
    """Step S2 of the paper's ablation: RepVGG without the identity BN, ``relu(bn(conv3x3) + bn(conv1x1) + x)``.

    No BN ever sees the block's post-ReLU input, so no dead channel can blow up a BN scale (the paper: INT8 63.5 ->
    62.5 top-1 on RepVGG-A0 nonetheless, FP32 71.9 -> 70.7)."""

    bn_1x1, bn_identity, bn_post = True, False, False
    branch_names = ("branch_3x3", "branch_1x1")


@yaml_module
class QARepNoPostBNBlock(ThreeBranchBlock):
    """Step S3 of the paper's ablation: S2 with a plain 1x1 too, i.e. QARepVGG without its post-BN,
    ``relu(bn(conv3x3) + conv1x1 + x)``. Only the 3x3 branch has a BN (the paper: INT8 69.5, FP32 70.1)."""

    bn_1x1, bn_identity, bn_post = False, False, False
    branch_names = ("branch_3x3", "branch_1x1")


@yaml_module
class QARepBlock(ThreeBranchBlock):
    """QARepVGG (Chu et al., AAAI 2024): ``relu(bn_post(bn(conv3x3) + conv1x1 + x))``; step S4 of its ablation.

    BN only on the 3x3 branch, a plain bias-free 1x1 conv, an identity without BN (same presence rule as
    RepVGG) and one BN after the sum. The post-BN folds into the fused kernel too, so the deployed block is a
    single conv + ReLU exactly like RepVGG's.
    """

    bn_1x1, bn_identity, bn_post = False, False, True
    branch_names = ("branch_3x3", "branch_1x1", "bn")


@yaml_module
class QARepBlockV2(QARepBlock):
    """QARepVGG V2 (YOLOv6's ``QARepVGGBlockV2``, the block of its published -qa models): V1 plus a 3x3 average
    pool (stride 1, zero padding counted, no BN) on identity blocks, ``relu(bn_post(bn(conv3x3) + conv1x1 + x +
    avgpool3x3(x)))``.

    The pool is a fixed 3x3 kernel of 1/9 on the channel diagonal (``avg_pool_kernel``): a zero-padded conv counts
    the padding exactly as ``AvgPool2d(3, 1, 1)`` does, so fusion stays exact at the borders too.
    """

    branch_names = (*QARepBlock.branch_names, "branch_avg")

    def __init__(self, c1: int, c2: int, s: int = 1, g: int = 1, act: str = "relu") -> None:
        super().__init__(c1, c2, s, g, act)
        self.branch_avg = nn.AvgPool2d(3, 1, 1) if self.has_identity else None

    def shortcut(self, x: Tensor) -> Tensor:
        return x + self.branch_avg(x)

    def shortcut_kernel(self, like: Tensor) -> Tensor:
        return self.identity(like) + avg_pool_kernel(self.c1, self.g, like)


@yaml_module
class ConvBNReLU(Reparameterizable):
    """Plain conv + BN + activation (YOLOv6's SimConv; ReLU unless ``act`` says otherwise): the 1x1 mixers of CSP
    stages, the SPP blocks and the neck's downsamplers."""

    branch_names = ("branch",)

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: str = "relu") -> None:
        super().__init__(act)
        check_conv_args(type(self).__name__, c1, c2, s, g)
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"ConvBNReLU: kernel size k must be a positive odd int, got {k!r}")
        self.branch = conv_bn(c1, c2, k, s, g)

    def forward_branches(self, x: Tensor) -> Tensor:
        return self.branch(x)

    def fused_kernel_bias(self) -> tuple[Tensor, Tensor]:
        return fold_conv_bn(self.branch)

    def branch_bns(self) -> dict[str, nn.BatchNorm2d]:
        return {} if self.fused else {"conv": self.branch[1]}

    def geometry(self) -> nn.Conv2d:
        return self.branch[0]
