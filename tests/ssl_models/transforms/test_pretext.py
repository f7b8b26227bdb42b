import torch

from ssl_models.transforms.pretext import split_columns


def test_split_columns_orders_views_by_index_and_names_targets():
    view_0, view_1, view_10 = (torch.full((2, 1), float(i)) for i in (0, 1, 10))
    labels = torch.tensor([3, 4])
    columns = {
        "view_1": view_1,
        "target_label": labels,
        "id": torch.tensor([7, 8]),  # not a view or a target: left out
        "view_10": view_10,
        "view_0": view_0,
        **{f"view_{i}": torch.full((2, 1), float(i)) for i in range(2, 10)},
    }
    views, targets = split_columns(columns)
    assert [int(v[0, 0]) for v in views] == list(range(11))
    assert views[0] is view_0 and views[10] is view_10
    assert targets.keys() == {"label"} and targets["label"] is labels


def test_split_columns_of_views_alone_has_no_targets():
    views, targets = split_columns({"view_0": torch.zeros(1)})
    assert len(views) == 1 and targets == {}
