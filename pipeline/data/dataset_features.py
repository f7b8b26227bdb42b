"""Whole-dataset features inside training: what DeepCluster clusters at each epoch start.

Ray Data decodes the training images without augmentation (``ingest.decoded_dataset``);
each training worker reads an interleaved share of the shard files and embeds it with its
own backbone replica on its own device (in eval mode, so batch norm uses its running
statistics), then the workers all-gather, so every one holds the same (N, D) features and
dataset slots. Decoding stays on the CPU workers of the data stage; the encoder runs where
the model already lives, with no weights shipped anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.cluster import configure_data_context
from pipeline.data.ingest import ImageSpec, decoded_dataset, normalize
from ssl_models import dist


@dataclass
class DatasetFeatures:
    """Features (N, D) and dataset slots (N,) of the N training images that decoded, the
    same on every worker; ``expected`` is how many there are (the rest were rejected)."""

    features: Tensor
    slots: Tensor
    expected: int

    @property
    def missing(self) -> int:
        """How many training images were rejected, so have no features."""
        return self.expected - len(self.slots)


@torch.no_grad()
def dataset_features(
    backbone: nn.Module,
    feature_dim: int,
    shard_dir: str,
    spec: ImageSpec,
    slots: dict[str, int],
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    *,
    limit: int | None = None,
    decode_tasks: int = 2,
    batch_size: int = 256,
) -> DatasetFeatures:
    """``backbone``'s (N, ``feature_dim``) features of the first ``limit`` images of
    ``shard_dir``, whose ids ``slots`` maps to dataset slots. A collective: every worker
    calls it together and receives the lot."""
    configure_data_context()  # this process is a Train worker: keep Ray Data quiet here too
    was_training = backbone.training
    backbone.eval()
    features, found = [], []
    share = decoded_dataset(
        shard_dir,
        spec,
        part=(dist.rank(), dist.world_size()),
        limit=limit,
        decode_tasks=decode_tasks,
        batch_size=batch_size,
    )
    for batch in share.iter_batches(batch_size=batch_size, batch_format="numpy"):
        images = torch.from_numpy(batch["image"]).to(device, non_blocking=True)
        features.append(backbone(normalize(images, mean, std)).float())
        found.append(torch.tensor([slots[str(i)] for i in batch["id"]], device=device))
    backbone.train(was_training)
    mine = torch.cat(features) if features else torch.zeros(0, feature_dim, device=device)
    ids = torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=device)
    return DatasetFeatures(dist.gather_uneven(mine), dist.gather_uneven(ids), len(slots))
