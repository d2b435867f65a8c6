"""The box head, its losses and IoU on tensors (imgpipe.models.localize)."""

import pytest
import torch
from torch import nn

from imgpipe.data.boxes import iou
from imgpipe.models.localize import (
    ClassAndBoxHead,
    LocalizationLoss,
    add_box_head,
    box_head_like,
    box_iou,
    giou,
    split_outputs,
)
from imgpipe.models.networks import build_model


def test_box_iou_is_the_iou_of_the_box_geometry():
    pairs = [((0, 0, 10, 10), (5, 0, 15, 10)), ((0, 0, 4, 4), (1, 1, 3, 3)), ((0, 0, 1, 1), (2, 2, 3, 3)),
             ((0.1, 0.2, 0.5, 0.9), (0.3, 0.1, 0.7, 0.6))]
    predicted = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    target = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    assert box_iou(predicted, target).tolist() == pytest.approx([iou(a, b) for a, b in pairs])
    inverted = torch.tensor([[5.0, 5.0, 1.0, 1.0]])
    assert box_iou(inverted, torch.tensor([[0.0, 0.0, 6.0, 6.0]])).item() == 0.0


def test_giou_of_known_boxes():
    predicted = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    # same box: 1; apart by one width: IoU 0, enclosing 3 of which 2 covered: -1/3;
    # overlapping corners: IoU 1/7, enclosing 9, union 7: 1/7 - 2/9
    assert giou(predicted, target).tolist() == pytest.approx([1.0, -1 / 3, 1 / 7 - 2 / 9])


@pytest.mark.parametrize("arch, truncate", [("simple_cnn", None), ("resnet18", None), ("mobilenet_v3_small", None),
                                            ("squeezenet1_1", None), ("resnet18", "layer3")])
def test_any_classifier_gets_a_box_head_beside_its_class_head(arch, truncate):
    model = build_model(arch, 3, 1, image_size=64, truncate=truncate)
    add_box_head(model, 3)
    outputs = model.eval()(torch.rand(2, 1, 64, 64))
    logits, boxes = split_outputs(outputs, 3)
    assert outputs.shape == (2, 7) and logits.shape == (2, 3)
    assert ((boxes >= -0.5) & (boxes <= 1.5)).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all(), "always a proper box"


def test_the_box_head_is_a_fresh_twin_of_the_class_head():
    class_head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))
    box_head = box_head_like(class_head, 5)
    assert box_head[3].out_features == 4 and box_head[1].out_features == 8
    assert not torch.equal(box_head[1].weight, class_head[1].weight)  # not sharing, not a copy of trained weights
    with pytest.raises(ValueError, match="no final Linear or Conv2d layer with 6 outputs"):
        box_head_like(class_head, 6)


def test_the_loss_trains_the_box_where_there_is_one_and_only_there():
    torch.manual_seed(0)
    head = ClassAndBoxHead(nn.Linear(8, 2), 2)
    features = torch.rand(16, 8)
    labels = torch.randint(0, 2, (16,))
    boxes = torch.tensor([[0.2, 0.3, 0.6, 0.8]]).repeat(16, 1)
    has_box = torch.arange(16) < 8
    for kind in ("smooth_l1", "giou"):
        loss_of = LocalizationLoss(nn.CrossEntropyLoss(), 2, kind, box_weight=2.0)
        classification_only = nn.functional.cross_entropy(head(features)[:, :2], labels)
        assert loss_of(head(features), labels, boxes, torch.zeros(16, dtype=torch.bool)).item() == pytest.approx(
            classification_only.item())
        assert loss_of(head(features), labels, boxes, has_box).item() > classification_only.item()
    model = ClassAndBoxHead(nn.Linear(8, 2), 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_of = LocalizationLoss(nn.CrossEntropyLoss(), 2, "giou")
    for _ in range(200):
        optimizer.zero_grad()
        loss_of(model(features), labels, boxes, has_box).backward()
        optimizer.step()
    predicted = split_outputs(model(features), 2)[1]
    assert box_iou(predicted, boxes).mean().item() > 0.9
    with pytest.raises(ValueError, match="unknown box loss"):
        LocalizationLoss(nn.CrossEntropyLoss(), 2, "l2")


def test_a_batch_without_boxes_still_gives_the_box_head_a_gradient_and_squeezenet_boxes_reach_below_half():
    head = ClassAndBoxHead(nn.Linear(8, 2), 2)
    loss = LocalizationLoss(nn.CrossEntropyLoss(), 2, "smooth_l1")(
        head(torch.rand(4, 8)), torch.tensor([0, 1, 0, 1]), torch.rand(4, 4), torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert head.box.weight.grad is not None and torch.count_nonzero(head.box.weight.grad) == 0
    model = add_box_head(build_model("squeezenet1_1", 3, 1, image_size=64), 3)
    assert not any(isinstance(module, nn.ReLU) for module in list(model.classifier.box.children())[2:])


def test_init_from_carries_the_class_head_between_a_classifier_and_a_localising_model():
    from imgpipe.models.networks import load_matching_weights

    classifier = build_model("resnet18", 3, 1, image_size=32)
    localizer = build_model("resnet18", 3, 1, image_size=32, task="localize")
    load = load_matching_weights(localizer, classifier.state_dict(), "cnn")
    assert torch.equal(localizer.fc.classes.weight, classifier.fc.weight)
    assert sorted(load.fresh) == ["fc.box.bias", "fc.box.weight"]
    back = build_model("resnet18", 3, 1, image_size=32)
    load_matching_weights(back, localizer.state_dict(), "box")
    assert torch.equal(back.fc.weight, localizer.fc.classes.weight)


def test_boxes_required_says_which_classes_it_leaves_out(shapes_manifest, tmp_path, caplog):
    import pandas as pd
    from conftest import REPO

    from imgpipe.config.schema import load_schema
    from imgpipe.config.validation import validate_config
    from imgpipe.training.engine import TrainingJob, train_model

    manifest = pd.read_csv(shapes_manifest)
    bright = manifest["label"] == "bright"
    for column, value in zip(("box_x0", "box_y0", "box_x1", "box_y1"), (0.1, 0.1, 0.6, 0.7)):
        manifest[column] = [value if ok else "" for ok in bright]
    manifest["box_status"] = ["ok" if ok else "missing" for ok in bright]
    path = tmp_path / "manifest.csv"
    manifest.to_csv(path, index=False)
    config = {"experiment": "e", "classes": {"bright": {"sources": [{"synthetic": {"digit": 1}}]},
                                             "dark": {"sources": [{"digits": 2}]}},
              "crawl": {"min_size": 8}, "models": {"m": {"arch": "simple_cnn", "task": "localize", "boxes_required": True, "epochs": 1}}}
    settings = validate_config(config, load_schema(REPO / "workflow/schemas/config.schema.yaml"))["models"]["m"]
    image = {"size": 32, "color": "grayscale", "resize": "stretch", "pad_color": "black"}
    job = TrainingJob("m", settings, image, path, tmp_path / "m" / "resume", tmp_path / "m" / "model.pt",
                      torch.device("cpu"))
    history, summary = train_model(job)
    assert "boxes_required leaves no train image of class(es) dark" in caplog.text
    assert summary["n_train"] == int((bright & (manifest["split"] == "train")).sum())
