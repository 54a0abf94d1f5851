"""StilProcessor, presets/create_model, scripts/predict.py end to end, scripts/benchmark_models.py."""

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import modeling_stil  # noqa: F401
from data_utils.io import DatasetMetadata
from modeling_stil.configuration_baselines import DataCompatibilityError
from modeling_stil.presets import PRESETS, create_model, list_presets
from modeling_stil.processing_stil import PROCESSOR_FILENAME, SchemaError, StilProcessor
from tests._helpers import TOY_METADATA, TOY_SCHEMA, load_script

ROOT = Path(__file__).resolve().parents[1]
SCHEMA, META = TOY_SCHEMA, TOY_METADATA


def _image(seed, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def test_processor_images_match_resize_and_normalise(tmp_path):
    processor = StilProcessor(image_size=24, num_channels=3, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    images = [_image(0), _image(1, size=(24, 24))]
    out = processor(images=images)
    assert set(out) == {"pixel_values"} and out["pixel_values"].shape == (2, 3, 24, 24)
    for image, pixels in zip(images, out["pixel_values"]):
        raw = TF.resize(TF.pil_to_tensor(image), [24, 24], antialias=True).float() / 255.0
        expected = (raw - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
        torch.testing.assert_close(pixels, expected, rtol=1e-5, atol=1e-5)
    path = tmp_path / "x.png"
    images[0].save(path)
    torch.testing.assert_close(processor(images=str(path))["pixel_values"], out["pixel_values"][:1])
    gray = StilProcessor(image_size=16, num_channels=1)
    assert gray(images=_image(2))["pixel_values"].shape == (1, 1, 16, 16)  # RGB input converted to L


def test_processor_tabular_raw_rows_and_errors():
    processor = StilProcessor(tabular_schema=SCHEMA, image_size=None)
    rows = [
        {"color": "green", "make": "b", "age": 7, "km": "150", "price": 4.0},
        {"color": None, "make": "a", "age": "", "price": float("nan")},  # km absent
    ]
    out = processor(tabular=rows)
    assert out["categorical_values"].tolist() == [[2, 1], [0, 0]]
    torch.testing.assert_close(out["continuous_values"][0], torch.tensor([1.0, 1.0, -2.0]))
    assert out["missing_mask"].tolist() == [[False] * 5, [True, False, True, True, True]]
    assert torch.all(out["continuous_values"][1] == 0)
    with pytest.raises(SchemaError) as error:
        processor(tabular={"color": "purple", "make": "a"})
    assert "'color'" in str(error.value) and "purple" in str(error.value) and "red" in str(error.value)
    with pytest.raises(ValueError, match="'age' has the non-numeric value 'old'"):
        processor(tabular={"color": "red", "age": "old"})
    with pytest.raises(ValueError, match="no image settings"):
        processor(images=_image(0))


def test_processor_gives_the_tensors_and_errors_of_the_training_pipeline():
    """The processor is shipped as remote code, so it writes data_utils' three rules again (raw-row
    encoding, the 16-bit rule, the eval view + normalize_batch); both must agree, errors included."""
    from data_utils import schema as training_schema
    from data_utils.images import to_8bit
    from data_utils.views import ViewConfig, build_image_view, normalize_batch

    fields = [*TOY_SCHEMA.to_dict()["fields"], {"name": "flat", "kind": "continuous", "categories": None, "mean": None, "std": 0.0}]
    for allow_missing in (True, False):
        schema = {"allow_missing": allow_missing, "fields": fields}
        processor = StilProcessor(tabular_schema=schema, image_size=None)
        reference = training_schema.TabularSchema.from_dict(schema)
        batches = [
            [{"color": "green", "make": 2.0, "age": 7, "km": 150.0, "price": 4.0, "flat": 3.0}, {"color": "red", "make": "d", "age": -1.5, "km": 0, "price": 1e6, "flat": -2}],
            [{"color": None, "make": "", "age": float("nan"), "price": None}, {"color": 2, "make": "a"}],  # 2 is no category name
            [{"color": "blue", "make": "a", "age": float("inf"), "km": 1.0, "price": 2.0, "flat": 0.0}],
            [{"color": "blue", "make": "e", "age": 1.0, "km": 1.0, "price": 2.0, "flat": 0.0}],
        ]
        for rows in batches:
            try:
                expected = reference.encode_raw_rows(rows)
            except training_schema.SchemaError as error:
                with pytest.raises(SchemaError) as raised:
                    processor(tabular=rows)
                assert str(raised.value) == str(error)
                continue
            out = processor(tabular=rows)
            for key, value in expected.items():
                assert out[key].dtype == torch.from_numpy(value).dtype and torch.equal(out[key], torch.from_numpy(value)), key

    sixteen = Image.fromarray(np.random.default_rng(4).integers(0, 65535, (20, 30)).astype(np.uint16))
    for channels, mean, std, resize, image in ((3, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], None, _image(5, size=(50, 37))),
                                              (1, [0.1], [0.7], 40, _image(6, size=(33, 45), mode="L")),
                                              (1, None, None, None, sixteen), (3, None, None, 32, _image(7, size=(32, 32)))):
        processor = StilProcessor(image_size=32, num_channels=channels, image_mean=mean, image_std=std, resize_size=resize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 16-bit notice
            pixels = processor(images=image)["pixel_values"]
            decoded, _ = to_8bit(image)
        tensor = TF.pil_to_tensor(decoded.convert("RGB" if channels == 3 else "L"))
        if resize:
            tensor = TF.center_crop(TF.resize(tensor, [resize, resize], antialias=True), [32, 32])
        cfg = ViewConfig(image_size=32, num_channels=channels, image_mean=mean, image_std=std)
        expected = normalize_batch(build_image_view("eval", cfg)(tensor)[0][None], cfg)
        assert torch.equal(pixels, expected)


def test_processor_save_load_and_from_model(tmp_path):
    model = create_model("multimodal-concat-tiny", schema=SCHEMA, metadata=META)
    processor = StilProcessor.from_model_config(model.config)
    assert processor.tabular_schema == SCHEMA.to_dict() and processor.image_size == 32
    assert processor.id2label == {0: "cat", 1: "dog", 2: "bird"}
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / PROCESSOR_FILENAME).read_text())["image_size"] == 32
    loaded = StilProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    rows = [{"color": "red", "make": "c", "age": 1.0}]
    a, b = processor(images=[_image(3)], tabular=rows), loaded(images=[_image(3)], tabular=rows)
    for key in a:
        assert torch.equal(a[key], b[key])
    model.eval()
    logits = model(**a).logits
    predictions = processor.postprocess(logits, top_k=2)
    assert [p["label"] for p in predictions[0]] == [model.config.id2label[i] for i in logits[0].topk(2).indices.tolist()]
    with pytest.raises(ValueError, match="batch size"):
        processor(images=[_image(3)], tabular=rows * 2)


def test_presets_cover_every_family_and_fill_fields_from_data():
    names = set(list_presets())
    required = {
        "stil-dvm", "stil-cardiac", "stil-tiny", "tip-dvm", "tip-tiny", "image-resnet50", "image-tiny",
        "tabular-transformer", "tabular-tiny", "multimodal-concat", "multimodal-concat-tiny",
        "multimodal-tip-tiny", "mmatch-tiny", "wrn-28-2", "tcdcnn",
    }
    assert required <= names
    model = create_model("tabular-tiny", schema=SCHEMA, metadata=META)
    assert model.config.tabular_schema == SCHEMA.to_dict() and model.config.num_labels == 3
    assert model.config.id2label[2] == "bird" and model.config.problem_type == "single_label_classification"
    landmarks = DatasetMetadata(task="landmarks", num_targets=10)
    tcdcnn = create_model("tcdcnn", metadata=landmarks)
    assert tcdcnn.config.problem_type == "regression" and tcdcnn.config.num_channels == 1
    regression = create_model("image-tiny", metadata=DatasetMetadata(task="regression", num_targets=2), image_size=48)
    assert regression.config.problem_type == "regression" and regression.config.num_labels == 2
    assert regression.config.image_size == 48
    gray = create_model("image-tiny", metadata=landmarks)  # grayscale data: mean/std shrink to 1 channel
    assert gray.config.num_channels == 1 and len(gray.config.image_mean) == 1
    assert gray(pixel_values=torch.randn(2, 1, 32, 32)).logits.shape == (2, 10)
    for name in ("stil-tiny", "tip-tiny"):  # the other families' configs get the schema too
        other = create_model(name, schema=SCHEMA, metadata=META, image_size=32)
        assert other.config.tabular_schema["fields"] == SCHEMA.to_dict()["fields"]
        assert other.config.num_labels == 3
    assert PRESETS["mmatch"].name == "mmatch" and create_model  # aliases resolve
    from modeling_stil.presets import preset_config

    assert preset_config("multimodal-heads", schema=SCHEMA, metadata=META).unimodal_heads is True
    assert preset_config("wrn-28-2").depth == 28


def test_unknown_names_and_loading_from_a_folder(tmp_path):
    with pytest.raises(ValueError) as error:
        create_model("mmatch-tiyn")
    assert "mmatch-tiny" in str(error.value) and "wrn-28-2" in str(error.value)
    model = create_model("mmatch-tiny", schema=SCHEMA, metadata=META)
    model.save_pretrained(tmp_path)
    loaded = create_model(str(tmp_path), schema=SCHEMA, metadata=META)
    assert type(loaded) is type(model) and loaded.config.unimodal_heads
    with pytest.raises(DataCompatibilityError, match="label count"):
        create_model(str(tmp_path), schema=SCHEMA, metadata=DatasetMetadata(label_names=["a", "b"]))


@pytest.fixture(scope="module")
def saved_multimodal(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = create_model("multimodal-tip-tiny", schema=SCHEMA, metadata=META).eval()
    model.save_pretrained(folder)
    StilProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder, model


def test_predict_script_end_to_end(tmp_path, saved_multimodal):
    folder, model = saved_multimodal
    images = tmp_path / "imgs"
    images.mkdir()
    _image(10).save(images / "a.png")
    _image(11).save(images / "b.png")
    table = tmp_path / "rows.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "color", "make", "age", "km", "price"])
        writer.writeheader()
        writer.writerow({"id": 1, "image": "a.png", "color": "blue", "make": "d", "age": "3.5", "km": "", "price": "12"})
        writer.writerow({"id": 2, "image": "b.png", "color": "", "make": "a", "age": "9", "km": "80", "price": "7.5"})
    output = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), "--model", str(folder), "--table", str(table),
         "--images-root", str(images), "--top-k", "2", "--output", str(output)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("row ")]
    assert len(lines) == 2
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["row"] for r in records] == [0, 1]
    processor = StilProcessor.from_pretrained(folder)
    raw = [
        {"color": "blue", "make": "d", "age": 3.5, "km": None, "price": 12},
        {"color": None, "make": "a", "age": 9, "km": 80, "price": 7.5},
    ]
    with torch.no_grad():
        probs = model(**processor(images=[_image(10), _image(11)], tabular=raw)).logits.softmax(-1)
    for record, p, line in zip(records, probs, lines):
        top = record["predictions"]
        assert len(top) == 2 and top[0]["score"] >= top[1]["score"]
        assert top[0]["label"] == ["cat", "dog", "bird"][int(p.argmax())]
        assert abs(top[0]["score"] - float(p.max())) < 1e-5
        assert top[0]["label"] in line


def test_predict_script_regression(tmp_path):
    folder = tmp_path / "tcdcnn"
    model = create_model("tcdcnn", metadata=DatasetMetadata(task="landmarks", num_targets=10))
    model.save_pretrained(folder)  # no processor file: settings come from config.json
    _image(5, size=(80, 70)).save(tmp_path / "face.jpg")
    (tmp_path / "rows.csv").write_text("image\nface.jpg\n")
    predict = load_script("predict")
    out = tmp_path / "pred.jsonl"
    assert predict.main(["--model", str(folder), "--table", str(tmp_path / "rows.csv"), "--output", str(out)]) == 0
    values = json.loads(out.read_text())["values"]
    pixels = StilProcessor.from_model_config(model.config)(images=Image.open(tmp_path / "face.jpg"))["pixel_values"]
    assert pixels.shape == (1, 1, 60, 60)
    with torch.no_grad():
        np.testing.assert_allclose(values, model.eval()(pixels).logits[0].numpy(), rtol=1e-5, atol=1e-6)


def test_benchmark_script_runs(tmp_path):
    benchmark_models = load_script("benchmark_models")
    out = tmp_path / "bench.jsonl"
    code = benchmark_models.main(
        ["--model", "mmatch-tiny", "--batch", "2", "--warmup", "0", "--iters", "1", "--device", "cpu", "--json", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["class"] == "MultimodalClassifier" and result["batch"] == 2 and result["image_size"] == 32
    assert result["forward_s"] > 0 and result["train_step_s"] > 0 and result["train_step_peak_mib"] > 0
