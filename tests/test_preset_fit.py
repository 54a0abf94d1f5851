"""The model follows the data: `default_preset_for` and `check_preset_fits`."""

from __future__ import annotations

import pytest

from data_utils.io import DatasetMetadata
from data_utils.synthetic import make_synthetic
from modeling_stil.presets import check_preset_fits, create_model, default_preset_for, fitting_presets
from tests._helpers import TOY_METADATA, TOY_SCHEMA

IMAGE_ONLY = DatasetMetadata(label_names=["cat", "dog", "bird"])
TABULAR_ONLY = DatasetMetadata(image_column=None, label_names=["cat", "dog", "bird"])
LANDMARKS = DatasetMetadata(task="landmarks", num_targets=10)


@pytest.fixture(scope="module")
def synthetic():
    """The three synthetic datasets' (schema, metadata), at their smallest."""
    out = {}
    for task, n in (("image", 100), ("landmarks", 100), ("multimodal", 200)):
        _, metadata, schema = make_synthetic(task, num_samples=n, image_size=16, seed=0)
        out[task] = (schema, metadata)
    return out


def test_default_follows_the_modalities():
    assert default_preset_for(TOY_SCHEMA, TOY_METADATA) == "multimodal-concat-tiny"
    assert default_preset_for(None, IMAGE_ONLY) == "image-tiny"
    assert default_preset_for(TOY_SCHEMA, TABULAR_ONLY) == "tabular-tiny"
    assert default_preset_for(None, LANDMARKS) == "tcdcnn"
    assert default_preset_for(None, IMAGE_ONLY, task="landmarks") == "tcdcnn"
    # RGB regression: TCDCNN is grayscale, the image classifier regresses too
    assert default_preset_for(None, DatasetMetadata(task="regression", num_targets=2)) == "image-tiny"
    assert default_preset_for(TOY_SCHEMA, TOY_METADATA, required_modalities=("image", "tabular")) == "multimodal-concat-tiny"
    assert default_preset_for(TOY_SCHEMA, TOY_METADATA, required_modalities=("tabular",)) == "multimodal-concat-tiny"


def test_default_on_synthetic_datasets_builds_a_model_that_passes_its_data_check(synthetic):
    expected = {"image": "image-tiny", "landmarks": "tcdcnn", "multimodal": "multimodal-concat-tiny"}
    for task, (schema, metadata) in synthetic.items():
        name = default_preset_for(schema, metadata)
        assert name == expected[task]
        check_preset_fits(name, schema, metadata)
        model = create_model(name, schema=schema, metadata=metadata)
        model.check_data_compatibility(schema, metadata)


def test_required_modalities_missing_from_the_data():
    with pytest.raises(ValueError, match=r"needs image and tabular input but the dataset is image-only .*no tabular"):
        default_preset_for(None, IMAGE_ONLY, required_modalities=("image", "tabular"))
    with pytest.raises(ValueError, match="unknown modalities"):
        default_preset_for(None, IMAGE_ONLY, required_modalities=("audio",))


def test_default_model_on_image_only_data_names_the_presets_that_fit(synthetic):
    schema, metadata = synthetic["image"]
    with pytest.raises(ValueError) as info:
        check_preset_fits("multimodal-concat-tiny", schema, metadata)
    message = str(info.value)
    assert "\n" not in message
    assert "image-only classification" in message and "no tabular schema" in message
    assert "use --model image-tiny or --model wrn-tiny" in message
    assert "multimodal" not in message.split("use ", 1)[1]  # only presets that fit are suggested


def test_check_names_the_reason_and_the_fits():
    with pytest.raises(ValueError, match=r"tcdcnn is built for landmarks/regression, not classification; use --model multimodal-concat-tiny"):
        check_preset_fits("tcdcnn", TOY_SCHEMA, TOY_METADATA)
    with pytest.raises(ValueError, match=r"needs tabular input, which image-tiny does not read; use --model multimodal-concat-tiny"):
        check_preset_fits("image-tiny", TOY_SCHEMA, TOY_METADATA, required_modalities=("image", "tabular"))
    with pytest.raises(ValueError, match=r"use --model tcdcnn or --model image-tiny"):
        check_preset_fits("stil-tiny", None, LANDMARKS)
    with pytest.raises(ValueError, match="this dataset has no tabular input"):
        check_preset_fits("stil-tiny", None, IMAGE_ONLY, required_modalities=("image", "tabular"))


def test_fitting_models_pass_and_non_presets_are_left_to_the_model_check(tmp_path):
    check_preset_fits("image-tiny", TOY_SCHEMA, TOY_METADATA)  # a model may ignore the table
    check_preset_fits("stil-tiny", TOY_SCHEMA, TOY_METADATA, required_modalities=("image", "tabular"))
    check_preset_fits("cotrain", TOY_SCHEMA, TOY_METADATA)  # aliases resolve
    check_preset_fits(str(tmp_path), None, IMAGE_ONLY)  # a folder: checked after loading
    fits = fitting_presets(None, IMAGE_ONLY)
    assert fits[0] == "image-tiny" and not any(n.startswith(("multimodal", "stil", "tip", "tabular", "mmatch")) for n in fits)
