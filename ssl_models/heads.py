"""MLP heads placed on top of the backbone features.

The same class serves as the SimCLR projector (Chen et al. 2020, arXiv:2002.05709: two
layers), the MoCo v2/v3 projector and the BYOL/SimSiam predictor. Following SimCLR v2 and
solo-learn, hidden layers are Linear -> BatchNorm -> ReLU.
"""

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``num_layers`` linear layers: (Linear-BN-ReLU) x (num_layers - 1), then Linear.

    Args:
        in_dim: input (backbone feature) dimension.
        hidden_dim: width of the hidden layers (unused when ``num_layers == 1``).
        out_dim: output dimension.
        num_layers: number of linear layers, >= 1.
        last_bn: end with a BatchNorm without affine parameters, as MoCo v3's projector does.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            # No bias: the BatchNorm right after it would cancel it anyway.
            layers += [
                nn.Linear(dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Features (N, in_dim) -> (N, out_dim)."""
        return self.layers(x)
