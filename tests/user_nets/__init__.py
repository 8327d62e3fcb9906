"""A network of one's own, for model.name=tests.user_nets:tiny_net (tests/test_user_model.py):
defined outside imgcls, built from (num_classes, in_channels) plus model.kwargs."""
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def tiny_net(num_classes: int, in_channels: int, width: int = 8) -> nn.Module:
    return TinyNet(num_classes, in_channels, width)


def inf_grad_net(num_classes: int, in_channels: int, good_steps: int = 12) -> nn.Module:
    """TinyNet whose head gets an infinite gradient from backward pass good_steps + 1 on, while
    its loss stays finite: what a non-finite gradient norm check must catch."""
    model = TinyNet(num_classes, in_channels, 4)
    calls = [0]

    def poison(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] > good_steps else grad

    model.head.weight.register_hook(poison)
    return model
