"""Small ResNet- and VGG-style networks for tests (torchvision is not importable beside the CPU torch)."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + idt)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class TinyVGG(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, dilation=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2, padding_mode="reflect"),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Mixed(nn.Module):
    """Layers rankdown must refuse: grouped, depthwise, transposed conv, a Linear subclass, attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.depthwise(self.grouped(self.conv(x))))
        seq = x.flatten(2).transpose(1, 2)
        seq, _ = self.attn(seq, seq, seq)
        return self.head(seq.mean(1))


def tiny_resnet() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet()


def tiny_vgg() -> TinyVGG:
    torch.manual_seed(0)
    return TinyVGG()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial statistics, so that eval-mode tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def make_not_a_module() -> str:
    return "oops"


# Factories that misbehave, for the bad-input suite (tests/test_reliability.py).
def raises() -> nn.Module:
    raise ValueError("weights server unreachable")


def needs_args(width: int) -> nn.Module:
    return TinyVGG()


def exits() -> nn.Module:
    raise SystemExit(0)


def tiny_vgg_float64() -> TinyVGG:
    return tiny_vgg().double()


def tiny_vgg_bfloat16() -> TinyVGG:
    return tiny_vgg().to(torch.bfloat16)


def tiny_vgg_float16() -> TinyVGG:
    return tiny_vgg().half()


class TokenClassifier(nn.Module):
    """Keyword inputs (token ids and an attention mask) and a dict output, as text models have."""

    def __init__(self, vocab: int = 50, dim: int = 24, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 48)
        self.fc2 = nn.Linear(48, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = self.embed(input_ids) * attention_mask[..., None]
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1)
        return {"logits": self.fc2(torch.relu(self.fc1(pooled))), "pooled": pooled}


def token_classifier() -> TokenClassifier:
    torch.manual_seed(0)
    return TokenClassifier()


def tiny_vgg_loader():
    """A user's DataLoader factory (package.module:function)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def top1_metric(model: nn.Module, data) -> dict:
    """A user's own metric (--eval nets:top1_metric): mean of the max logit."""
    total = n = 0.0
    with torch.no_grad():
        for x, _ in data.batches(32):
            total += float(model(x).max(1).values.sum())
            n += x.shape[0]
    return {"mean_max_logit": total / n}


class WrappedConv(nn.Conv2d):
    """A ported conv subclass whose forward is the plain conv's (as ported code often has)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class ScaledLinear(nn.Linear):
    """A subclass that computes something else: rankdown must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def ported_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        WrappedConv(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        ScaledLinear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def mlp_classifier() -> nn.Module:
    """Outputs that depend on the input only (no biases): a rank-1 plan visibly wrecks it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(768, 64, bias=False), nn.ReLU(), nn.Linear(64, 10, bias=False))


class TokenTagger(nn.Module):
    """A per-token Linear on (batch, tokens, features): padding positions reach it."""

    def __init__(self, vocab: int = 50, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 32)
        self.out = nn.Linear(32, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(self.embed(input_ids))))
