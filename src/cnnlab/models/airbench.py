"""The airbench94 network (Keller Jordan, cifar10-airbench): a frozen patch-whitening layer and three conv blocks.

whiten (2x2, frozen) + GELU -> 3 x [conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU] -> global max pool
-> linear without bias -> logits x 1/9. With its training recipe (9.9 epochs, batch 1024, Nesterov SGD with
BatchNorm biases at 64x the rate, label smoothing 0.2, Lookahead, flip and translate test-time augmentation)
airbench94 reports 94.01% mean CIFAR-10 test accuracy over 1000 runs in 3.83 s on one A100.

The whitening layer's filters are not learned: init_whitening sets them from training images, so the first layer
maps every 2x2 patch to decorrelated coordinates of unit variance, which lets the rest train at a high rate.
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cnnlab.models.resnet9 import GlobalMaxPool2d


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 convolution without bias whose first filters start as the identity on the input channels.

    airbench94 initializes its convolutions this way (torch's default, then Dirac filters on the first in_channels
    outputs), so at the start each block passes its input through beside the random features.
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    return conv


def batch_norm(channels: int, momentum: float, eps: float, weight_trainable: bool) -> nn.BatchNorm2d:
    """BatchNorm2d whose weight (scale) trains or stays at 1; its bias always trains."""
    bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    bn.weight.requires_grad_(weight_trainable)
    return bn


class AirbenchBlock(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU: halves the size, sets the width."""

    def __init__(
        self, in_channels: int, out_channels: int, bn_momentum: float, bn_eps: float, bn_weight_trainable: bool
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = batch_norm(out_channels, bn_momentum, bn_eps, bn_weight_trainable)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = batch_norm(out_channels, bn_momentum, bn_eps, bn_weight_trainable)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, C_in, H, W) -> (B, C_out, H, W)
        x = self.pool(x)  # -> (B, C_out, H/2, W/2), rounded down
        x = self.act(self.bn1(x))
        x = self.conv2(x)
        return self.act(self.bn2(x))


class AirbenchNet(nn.Module):
    """airbench94's CIFAR-10 network for any channel and class count (inputs of at least 16x16 pixels).

    Args:
        widths: channels of layer1, layer2 and layer3.
        whiten_kernel_size: side of the patches the whitening layer decorrelates; it has 2 x C x k x k filters, the
            eigenvectors of the patch covariance and their negatives (so that GELU keeps both signs).
        bn_momentum: torch's BatchNorm momentum, the weight of the newest batch in the running statistics
            (airbench94 writes 0.6 for the weight of the old statistics, i.e. 0.4 here).
        bn_eps: BatchNorm's epsilon.
        bn_weight_trainable: False keeps every BatchNorm weight at 1 (airbench94); the biases train either way.
        logit_scale: the logits are multiplied by this; a small scale makes the untrained network less confident.
        head_std: None keeps torch's initialization of the head; a number rescales the head's weights to this
            standard deviation (airbench94_muon: 1, with logit_scale 1/256).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: list[int] = (64, 256, 256),
        whiten_kernel_size: int = 2,
        bn_momentum: float = 0.4,
        bn_eps: float = 1e-12,
        bn_weight_trainable: bool = False,
        logit_scale: float = 1 / 9,
        head_std: float | None = None,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        k = whiten_kernel_size
        whiten_width = 2 * in_channels * k * k
        bn = {"bn_momentum": bn_momentum, "bn_eps": bn_eps, "bn_weight_trainable": bn_weight_trainable}
        self.whiten = nn.Conv2d(in_channels, whiten_width, kernel_size=k, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by init_whitening, never by the optimizer
        nn.init.zeros_(self.whiten.bias)
        self.act = nn.GELU()
        self.layer1 = AirbenchBlock(whiten_width, w1, **bn)
        self.layer2 = AirbenchBlock(w1, w2, **bn)
        self.layer3 = AirbenchBlock(w2, w3, **bn)
        self.pool = GlobalMaxPool2d()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w3, num_classes, bias=False)
        if head_std is not None:
            with torch.no_grad():
                self.fc.weight.mul_(head_std / self.fc.weight.std())
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from images (N x C x H x W, normalized as the training batches are).

        The filters are the eigenvectors of the second-moment matrix of all k x k patches of the images (their
        covariance about zero, as the images are normalized to zero mean), each divided by the square root of its
        eigenvalue plus eps, followed by their negatives; largest eigenvalue first. eps bounds the gain of the
        directions in which the patches hardly vary.
        """
        c, k = self.whiten.in_channels, self.whiten.kernel_size[0]
        d = c * k * k
        second_moment = torch.zeros(d, d, dtype=torch.float64, device=images.device)
        count = 0
        for chunk in images.split(1000):  # bounds the memory of the unfolded patches
            patches = F.unfold(chunk.float(), k)  # (n, C, H, W) -> (n, C*k*k, L), channel-major like the weight
            patches = patches.transpose(1, 2).reshape(-1, d).double()  # -> (n*L, C*k*k)
            second_moment += patches.T @ patches
            count += len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(second_moment / count)  # ascending eigenvalues
        filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0)  # row i: i-th largest direction, scaled
        filters = filters.reshape(d, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.whiten(x))  # (B, C, 32, 32) -> (B, 2*C*k*k, 31, 31) for k = 2
        x = self.layer1(x)  # -> (B, 64, 15, 15)
        x = self.layer2(x)  # -> (B, 256, 7, 7)
        x = self.layer3(x)  # -> (B, 256, 3, 3)
        x = self.flatten(self.pool(x))  # -> (B, 256)
        return self.fc(x) * self.logit_scale  # -> (B, num_classes)
