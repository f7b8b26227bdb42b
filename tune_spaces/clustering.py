"""Clustering methods.

SwAV: the softmax temperature and Sinkhorn entropy epsilon (Caron et al. 2020 use 0.1 and
0.05; lower epsilon gives sharper codes and, too low, collapse), the number of prototypes
(their ablation finds little sensitivity across an order of magnitude), and the number of
multi-crop local views, the paper's largest single gain.

DeepCluster: the number of k-means clusters, the one knob Caron et al. 2018 ablate (10000
on ImageNet's 1000 classes did best: over-segmentation helps); 3x to 30x the 10 classes of
the small datasets here brackets the default's tenfold.
"""

from tune_spaces.common import COMMON, Space

SWAV: Space = {
    **COMMON,
    "method.temperature": {"loguniform": [0.05, 0.2]},
    "method.epsilon": {"uniform": [0.02, 0.08]},
    "method.num_prototypes": {"choice": [30, 100, 300]},
    "augment.local_crops": {"choice": [0, 2, 6]},
}

DEEPCLUSTER: Space = {
    **COMMON,
    "method.num_clusters": {"choice": [30, 100, 300]},
}
