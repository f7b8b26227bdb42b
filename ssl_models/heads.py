"""MLP heads placed on top of the backbone features.

The same class serves as the SimCLR projector (Chen et al. 2020, arXiv:2002.05709: two
layers), the MoCo v2/v3 projector and the BYOL/SimSiam predictor. Following SimCLR v2 and
solo-learn, hidden layers are Linear -> BatchNorm -> ReLU.
"""

from torch import Tensor, nn

# The hidden layers' activations of the projection heads (ReLU) and of DINO's head (GELU).
ACTIVATIONS = (nn.ReLU, nn.GELU)


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


def through_first_layer(
    backbone: nn.Module, feature_dim: int, head: nn.Module
) -> tuple[nn.Module, int]:
    """The backbone followed by ``head``'s first hidden layer (its first Linear, any norm
    after it, and its activation), and that layer's width: where SimCLR v2 (Chen et al.
    2020b, arXiv:2006.10029, section 2) starts fine-tuning. A head without a hidden layer
    (one Linear) gives the backbone and ``feature_dim``. The modules are the method's own
    (shared, not copied)."""
    leaves = [module for module in head.modules() if not list(module.children())]
    activations = [i for i, module in enumerate(leaves) if isinstance(module, ACTIVATIONS)]
    if not activations:
        return backbone, feature_dim
    first_layer = leaves[: activations[0] + 1]
    width = next(module.out_features for module in first_layer if isinstance(module, nn.Linear))
    return nn.Sequential(backbone, *first_layer), width
