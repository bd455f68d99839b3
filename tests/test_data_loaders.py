"""Real-format loaders, end to end through the SyntheticCXR exporters and by hand-made files."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from csr_widgets.data import ISIC2018, TBX11K, ConceptCSV, SyntheticCXR, VinDrCXR
from csr_widgets.data.exporters import TBX11K_FROM_SYNTHETIC, VINDR_FROM_SYNTHETIC

SIZE = 64


@pytest.fixture(scope="module")
def data():
    return SyntheticCXR(n=10, seed=21, image_size=SIZE, masks=True)


@pytest.fixture(scope="module")
def vindr_root(tmp_path_factory, data):
    """Kaggle layout, 3 readers that never miss or move a box, MONOCHROME1 on odd images."""
    root = tmp_path_factory.mktemp("vindr")
    data.export_vindr(root, readers=3, image_size=SIZE, miss_rate=0.0, jitter=0.0, photometric="mixed")
    return root


def test_tbx11k_round_trip(tmp_path, data):
    json_path = data.export_tbx11k(tmp_path, image_size=SIZE)
    coco = json.loads(json_path.read_text())
    assert [c["name"] for c in coco["categories"]][:2] == ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"]
    loaded = TBX11K(tmp_path, "train")
    assert loaded.concepts == ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis"]
    assert loaded.classes == ["healthy", "sick", "tb"] and len(loaded) == len(data)
    tb_seen = 0
    for index in range(len(data)):
        truth, item = data[index], loaded[index]
        assert item["label"] == truth["label"]
        assert (item["image"] - truth["image"]).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
        expected = [] if truth["label"] != 2 else [(TBX11K_FROM_SYNTHETIC[n], *c) for n, *c in truth["boxes"] if n in TBX11K_FROM_SYNTHETIC]
        assert item["boxes"] == expected
        assert item["concepts"].tolist() == [float(any(b[0] == n for b in expected)) for n in loaded.concepts]
        tb_seen += truth["label"] == 2
    assert tb_seen > 0
    half = TBX11K(tmp_path, "train", image_size=SIZE // 2)
    index = next(i for i in range(len(data)) if loaded[i]["boxes"])
    assert half[index]["image"].shape == (1, 32, 32)
    assert half[index]["boxes"] == [(n, x0 / 2, y0 / 2, x1 / 2, y1 / 2) for n, x0, y0, x1, y1 in loaded[index]["boxes"]]


def _tbx11k_by_hand(root, bbox):
    (root / "imgs" / "tb").mkdir(parents=True)
    (root / "imgs" / "test").mkdir(parents=True)
    grey = np.full((40, 50), 100, np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(root / "imgs" / "tb" / "tb0001.png")  # RGB, as TBX11K ships
    Image.fromarray(grey).save(root / "imgs" / "test" / "t0001.png")
    coco = {
        "images": [{"id": 1, "file_name": "tb/tb0001.png", "width": 50, "height": 40},
                   {"id": 2, "file_name": "test/t0001.png", "width": 50, "height": 40}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 2, "bbox": bbox}],
        "categories": [{"id": 2, "name": "ObsoletePulmonaryTuberculosis"}, {"id": 1, "name": "ActiveTuberculosis"}],
    }
    (root / "annotations" / "json").mkdir(parents=True)
    (root / "annotations" / "json" / "TBX11K_val.json").write_text(json.dumps(coco))


def test_tbx11k_by_hand(tmp_path):
    _tbx11k_by_hand(tmp_path, [10, 5, 20, 8.5])
    loaded = TBX11K(tmp_path, "val")
    assert loaded.concepts == ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"]  # by category id
    item = loaded[0]
    assert item["boxes"] == [("ObsoletePulmonaryTuberculosis", 10.0, 5.0, 30.0, 13.5)]
    assert item["concepts"].tolist() == [0.0, 1.0] and item["label"] == 2
    assert item["image"].shape == (1, 40, 50) and item["image"][0, 0, 0].item() == pytest.approx(100 / 255)
    assert loaded[1]["label"] == -1 and loaded[1]["boxes"] == []  # the unlabeled test folder


def test_tbx11k_box_outside_its_image(tmp_path):
    _tbx11k_by_hand(tmp_path, [40, 5, 20, 8])  # x1 = 60 > width 50
    with pytest.raises(ValueError, match=r"annotation id 7.*tb0001.png.*outside the image of 50x40"):
        TBX11K(tmp_path, "val")


def _vindr_truth(box_name):
    return {"Other lesion" if n == "cavity" else VINDR_FROM_SYNTHETIC[n] for n in box_name}


def test_vindr_kaggle_dicom_round_trip(vindr_root, data):
    csv = pd.read_csv(vindr_root / "train.csv")
    assert list(csv.columns) == ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    assert csv.groupby("image_id")["rad_id"].nunique().eq(3).all()
    no_finding = csv[csv.class_name == "No finding"]
    assert no_finding[["x_min", "y_min", "x_max", "y_max"]].isna().all().all() and (no_finding.class_id == 14).all()
    for presence in ("any", "majority", 3):
        loaded = VinDrCXR(vindr_root, "train", presence=presence)
        assert loaded.classes == ["No finding", "Finding"] and len(loaded.concepts) == 14
        for index in range(len(data)):
            truth, item = data[index], loaded[index]
            names = _vindr_truth(n for n, *_ in truth["boxes"])
            assert {c for c, flag in zip(loaded.concepts, item["concepts"]) if flag} == names
            assert item["label"] == int(bool(names))
            # every reader drew every box: three copies of each
            expected = sorted((("Other lesion" if n == "cavity" else VINDR_FROM_SYNTHETIC[n]), *c) for n, *c in truth["boxes"])
            assert sorted(item["boxes"]) == sorted(expected * 3)
    loaded = VinDrCXR(vindr_root, "train")
    for index in (0, 1):  # 0 is MONOCHROME2, 1 MONOCHROME1 (stored inverted): both read back
        assert (loaded[index]["image"] - data[index]["image"]).abs().max() <= 0.5 / 4095 + 1e-6


def test_vindr_presence_rule_by_hand(vindr_root, tmp_path):
    root = tmp_path / "hand"
    (root / "train").mkdir(parents=True)
    for name in ("train_21_00000", "train_21_00001"):
        (root / "train" / f"{name}.dicom").write_bytes((vindr_root / "train" / f"{name}.dicom").read_bytes())
    rows = [
        # image 0: nodule by two of three readers, effusion by one
        ("train_21_00000", "Nodule/Mass", 8, "R1", 10, 10, 14, 15),
        ("train_21_00000", "Nodule/Mass", 8, "R2", 11, 10, 15, 14),
        ("train_21_00000", "Pleural effusion", 10, "R2", 5, 40, 30, 60),
        ("train_21_00000", "No finding", 14, "R3", None, None, None, None),
        # image 1: four readers, pneumothorax by two (not a majority of four)
        ("train_21_00001", "Pneumothorax", 12, "R4", 40, 5, 60, 30),
        ("train_21_00001", "Pneumothorax", 12, "R5", 41, 5, 60, 31),
        ("train_21_00001", "No finding", 14, "R6", None, None, None, None),
        ("train_21_00001", "No finding", 14, "R7", None, None, None, None),
    ]
    pd.DataFrame(rows, columns=["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]).to_csv(root / "train.csv", index=False)
    expected = {
        "any": ({"Nodule/Mass", "Pleural effusion"}, {"Pneumothorax"}),
        "majority": ({"Nodule/Mass"}, set()),
        2: ({"Nodule/Mass"}, {"Pneumothorax"}),
        3: (set(), set()),
    }
    for presence, per_image in expected.items():
        loaded = VinDrCXR(root, presence=presence)
        for index, names in enumerate(per_image):
            item = loaded[index]
            assert {c for c, f in zip(loaded.concepts, item["concepts"]) if f} == names
            assert {b[0] for b in item["boxes"]} == names and item["label"] == int(bool(names))
    boxes = VinDrCXR(root, presence="majority")[0]["boxes"]
    assert boxes == [("Nodule/Mass", 10.0, 10.0, 14.0, 15.0), ("Nodule/Mass", 11.0, 10.0, 15.0, 14.0)]
    with pytest.raises(ValueError, match="presence"):
        VinDrCXR(root, presence="most")


def test_vindr_readers_that_miss_only_remove_findings(tmp_path, data):
    data.export_vindr(tmp_path, image_size=SIZE, miss_rate=0.5, jitter=0.05)
    rules = [VinDrCXR(tmp_path, presence=p) for p in ("any", "majority", 3)]
    for index in range(len(data)):
        truth = _vindr_truth(n for n, *_ in data[index]["boxes"])
        found = [{c for c, f in zip(r.concepts, r[index]["concepts"]) if f} for r in rules]
        assert truth >= found[0] >= found[1] >= found[2]
        for _, x0, y0, x1, y1 in rules[0][index]["boxes"]:
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE


def test_vindr_physionet_layout_and_png(tmp_path, data):
    data.export_vindr(tmp_path, layout="physionet", format="png", image_size=SIZE, miss_rate=0.0, jitter=0.0)
    labels = pd.read_csv(tmp_path / "annotations" / "image_labels_train.csv")
    assert list(labels.columns[:3]) == ["image_id", "rad_ID", "Aortic enlargement"] and len(labels) == 3 * len(data)
    loaded = VinDrCXR(tmp_path, presence="majority", image_size=SIZE // 2)
    assert loaded.layout == "physionet" and "Lung cavity" in loaded.concepts
    assert loaded.classes == ["COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]
    for index in range(len(data)):
        truth, item = data[index], loaded[index]
        names = {VINDR_FROM_SYNTHETIC[n] for n, *_ in truth["boxes"]}
        assert {c for c, f in zip(loaded.concepts, item["concepts"]) if f} == names
        assert item["label"] == {0: 5, 1: 4, 2: 3}[truth["label"]]
        expected = [(VINDR_FROM_SYNTHETIC[n], x0 / 2, y0 / 2, x1 / 2, y1 / 2) for n, x0, y0, x1, y1 in truth["boxes"]]
        assert sorted(item["boxes"]) == sorted(expected * 3)
    full = VinDrCXR(tmp_path)
    assert (full[3]["image"] - data[3]["image"]).abs().max() <= 0.5 / 65535 + 1e-6  # 16-bit PNG


def test_isic_masks_round_trip(tmp_path, data):
    data.export_isic(tmp_path, image_size=SIZE)
    loaded = ISIC2018(tmp_path, "train", masks=True)
    assert loaded.concepts == ["globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks"]
    assert loaded.classes == ["healthy", "sick", "tb"]
    for index in range(len(data)):
        truth, item = data[index], loaded[index]
        assert item["image"].shape == (3, SIZE, SIZE) and item["label"] == truth["label"]
        assert (item["image"][0] - truth["image"][0]).abs().mean() < 0.01  # JPEG
        assert torch.equal(item["masks"], truth["masks"][:5])
        assert item["concepts"].tolist() == truth["concepts"][:5].tolist()
        for attribute, synthetic in zip(loaded.concepts, data.concepts[:5]):
            own = [b[1:] for b in truth["boxes"] if b[0] == synthetic]
            found = [b[1:] for b in item["boxes"] if b[0] == attribute]
            # one box per attribute: the union of the instances' boxes
            union = [tuple(f(c[i] for c in own) for i, f in enumerate((min, min, max, max)))] if own else []
            assert found == union


def test_concept_csv_round_trip(tmp_path, data):
    labels_csv = data.export_csv(tmp_path)
    loaded = ConceptCSV(labels_csv, boxes=tmp_path / "boxes.csv", classes=data.classes)
    assert loaded.concepts == data.concepts
    for index in range(len(data)):
        truth, item = data[index], loaded[index]
        assert item["label"] == truth["label"] and torch.equal(item["concepts"], truth["concepts"])
        assert item["boxes"] == truth["boxes"]
        assert (item["image"] - truth["image"]).abs().max() <= 0.5 / 255 + 1e-6


def _own_csv(tmp_path, boxes_rows="images/a.png,nodule,2,3,6,7\n"):
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "labels.csv").write_text("image,label,nodule,effusion\nimages/a.png,1,1,0\nimages/b.png,0,0,0\n")
    (tmp_path / "boxes.csv").write_text("image,concept,x0,y0,x1,y1\n" + boxes_rows)
    return tmp_path / "labels.csv"


def test_concept_csv_by_hand(tmp_path):
    loaded = ConceptCSV(_own_csv(tmp_path), boxes=tmp_path / "boxes.csv", image_size=8)
    assert loaded.concepts == ["nodule", "effusion"] and loaded.classes == ["0", "1"]
    item = loaded[0]
    assert item["label"] == 1 and item["concepts"].tolist() == [1.0, 0.0]
    assert item["boxes"] == [("nodule", 2 * 8 / 20, 3 * 8 / 16, 6 * 8 / 20, 7 * 8 / 16)]  # x and y scale apart
    assert item["image"].shape == (1, 8, 8) and item["id"] == "a"


# -- bad inputs: the error names the file and the line -------------------------------------


def test_missing_image_names_file_and_line(tmp_path):
    labels = _own_csv(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    loaded = ConceptCSV(labels)
    with pytest.raises(FileNotFoundError, match=r"b\.png.*labels\.csv line 3"):
        loaded[1]


def test_missing_dicom_names_file_and_line(tmp_path, data):
    data.replace(n=3).export_vindr(tmp_path, image_size=SIZE, miss_rate=0.0, jitter=0.0)
    (tmp_path / "train" / "train_21_00002.dicom").unlink()
    loaded = VinDrCXR(tmp_path)
    first_line = int(pd.read_csv(tmp_path / "train.csv").image_id.eq("train_21_00002").idxmax()) + 2
    with pytest.raises(FileNotFoundError, match=rf"train_21_00002\.dicom.*train\.csv line {first_line}\b"):
        loaded[2]


def test_unreadable_image_names_file_and_line(tmp_path):
    labels = _own_csv(tmp_path)
    (tmp_path / "images" / "a.png").write_bytes(b"garbage, not a PNG")
    with pytest.raises(ValueError, match=r"a\.png.*labels\.csv line 2"):
        ConceptCSV(labels)[0]


def test_missing_columns(tmp_path, vindr_root):
    labels = _own_csv(tmp_path)
    labels.write_text("image,nodule\nimages/a.png,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv.*missing column.*'label'"):
        ConceptCSV(labels)
    root = tmp_path / "vindr"
    root.mkdir()
    pd.read_csv(vindr_root / "train.csv").drop(columns="rad_id").to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match=r"train\.csv.*missing column.*'rad_id'"):
        VinDrCXR(root)
    isic = tmp_path / "isic"
    (isic / "ISIC2018_Task2_Training_GroundTruth_v3").mkdir(parents=True)
    (isic / "labels.csv").write_text("name,MEL\nISIC_0000000,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv.*missing column.*'image'"):
        ISIC2018(isic, labels=isic / "labels.csv")


def test_box_outside_its_image_names_image_and_line(tmp_path):
    labels = _own_csv(tmp_path, boxes_rows="images/a.png,nodule,2,3,6,7\nimages/a.png,nodule,12,3,21.5,9\n")
    loaded = ConceptCSV(labels, boxes=tmp_path / "boxes.csv")
    with pytest.raises(ValueError, match=r"boxes\.csv line 3 for image .*a\.png: outside the image of 20x16"):
        loaded[0]


def test_vindr_box_outside_and_inconsistent_rows(tmp_path, vindr_root):
    root = tmp_path / "v"
    (root / "train").mkdir(parents=True)
    (root / "train" / "train_21_00000.dicom").write_bytes((vindr_root / "train" / "train_21_00000.dicom").read_bytes())
    header = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
    (root / "train.csv").write_text(header + "train_21_00000,Cardiomegaly,3,R1,10,10,70,30\n")
    with pytest.raises(ValueError, match=r"train\.csv line 2 for image .*train_21_00000\.dicom: outside the image of 64x64"):
        VinDrCXR(root)[0]
    (root / "train.csv").write_text(header + "train_21_00000,Cardiomegaly,3,R1,,,,\n")
    with pytest.raises(ValueError, match=r"train\.csv line 2: finding 'Cardiomegaly' without a box"):
        VinDrCXR(root)
    (root / "train.csv").write_text(header + "train_21_00000,Heartburn,3,R1,1,1,2,2\n")
    with pytest.raises(ValueError, match=r"train\.csv line 2: unknown class_name 'Heartburn'"):
        VinDrCXR(root)


def test_concept_csv_inconsistent_rows(tmp_path):
    labels = _own_csv(tmp_path, boxes_rows="images/a.png,effusion,2,3,6,7\n")
    with pytest.raises(ValueError, match=r"boxes\.csv line 2: a box of 'effusion' but labels\.csv line 2 marks it absent"):
        ConceptCSV(labels, boxes=tmp_path / "boxes.csv")
    labels.write_text("image,label,nodule\nimages/a.png,1,2\n")
    with pytest.raises(ValueError, match=r"labels\.csv line 2: concept 'nodule' must be 0 or 1, got 2$"):  # 2, not np.int64(2)
        ConceptCSV(labels)
    labels.write_text("image,label,nodule\nimages/a.png,flu,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv line 2: label 'flu' is not one of"):
        ConceptCSV(labels, classes=["healthy", "sick"])


def test_missing_annotation_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv"):
        VinDrCXR(tmp_path)
    with pytest.raises(FileNotFoundError, match="TBX11K_train.json"):
        TBX11K(tmp_path)
    with pytest.raises(FileNotFoundError, match="GroundTruth"):
        ISIC2018(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        ConceptCSV(tmp_path / "nothing.csv")


def test_isic_missing_mask_names_it(tmp_path, data):
    data.replace(n=2).export_isic(tmp_path, image_size=SIZE)
    (tmp_path / "ISIC2018_Task2_Training_GroundTruth_v3" / "ISIC_0000001_attribute_streaks.png").unlink()
    loaded = ISIC2018(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ISIC_0000001_attribute_streaks\.png.*line 3"):
        loaded[1]
