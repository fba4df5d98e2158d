"""The bundled demo networks: a VGG-style CNN for Fashion-MNIST and Jaderberg's character CNN."""

from __future__ import annotations

import torch
from torch import nn


class FashionVGG(nn.Module):
    """A small VGG-style CNN for 28×28 grayscale images (Fashion-MNIST).

    Two blocks of two 3×3 convs with batch norm, then a two-layer classifier. Wide enough that
    its 3×3 convs carry most of the MACs, which is where low-rank factorization pays.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(2 * w * 7 * 7, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Maxout(nn.Module):
    """Element-wise max over ``pieces`` consecutive channels (cuda-convnet's ``eltmax``)."""

    def __init__(self, pieces: int) -> None:
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, c // self.pieces, self.pieces, h, w).amax(2)

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}"


class PatchNorm(nn.Module):
    """Each patch minus its mean, over its std (eps 1e-7), as Jaderberg's released code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = flat.mean(1).view(-1, 1, 1, 1)
        std = flat.std(1).view(-1, 1, 1, 1)
        return (x - mean) / (std + 1e-7)


class CharNet(nn.Module):
    """Jaderberg 2014's 4-layer maxout character classifier, for 24×24 grayscale patches.

    Verified from the released code: 24×24 input normalised per patch, maxout everywhere (no
    ReLU), an 8×8×64 map after two layers, 4-piece maxout in layers 3 and 4. Not found in any
    source and chosen here to fit those shapes with valid convolutions and no pooling: conv1
    9×9 1→48 (maxout 2), conv2 9×9 48→64 (maxout 2), conv3 8×8 64→128 (maxout 4), conv4 1×1
    128→classes (maxout 4). We drop the background class: the dataset has 36 classes only.
    conv2 then carries 88% of the MACs, conv2+conv3 94%, in line with "about 90%" in the paper.
    """

    def __init__(self, num_classes: int = 36, dropout: float = 0.3) -> None:
        super().__init__()
        self.norm = PatchNorm()
        self.conv1 = nn.Conv2d(1, 96, 9)
        self.act1 = Maxout(2)
        self.conv2 = nn.Conv2d(48, 128, 9)
        self.act2 = Maxout(2)
        self.drop2 = nn.Dropout(dropout)
        self.conv3 = nn.Conv2d(64, 512, 8)
        self.act3 = Maxout(4)
        self.drop3 = nn.Dropout(dropout)
        self.conv4 = nn.Conv2d(128, 4 * num_classes, 1)
        self.act4 = Maxout(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(self.norm(x)))
        x = self.drop2(self.act2(self.conv2(x)))
        x = self.drop3(self.act3(self.conv3(x)))
        return self.act4(self.conv4(x)).flatten(1)
