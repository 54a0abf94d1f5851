"""Model card (README.md with YAML metadata) for an exported run, built offline.

Metadata: library, tags (semi-supervised, method, modality, task), datasets, metrics and a
``model-index`` with the test (and validation) results; the body states the recipe, seed,
labelled split, library versions, the selection rule, and embeds the run's PNG plots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .metrics import DIAGNOSTIC_KEYS

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

<!-- stil:repo_id={{ repo_or_path }} -->

A `{{ model_type }}` model trained with the **{{ method }}** method of stil
(Hugging-Face-native semi-supervised learning for images and image+tabular data) on
{{ dataset_text }} ({{ task }}, {{ labeled_description }}).

## Use

The model and its processor load with transformers alone (their code ships with the weights):

```bash
pip install torch transformers timm
```

```python
{{ usage_snippet }}
```

`transformers.pipeline(...)` does not apply to this model (it reads {{ modalities_text }} through
its own processor, which no pipeline knows): build the inputs with the processor as above.
With stil installed, `scripts/predict.py --model {{ repo_or_path }} --table rows.csv` predicts a whole
table of raw rows.

## Results

The model selected on the validation split ({{ selection }}) was evaluated once on the test split.

| split | {{ metric_header }} |
|---|{{ metric_rule }}
{{ metric_rows }}

## Training

- method: `{{ method }}`; model: `{{ model_source }}`; seed: {{ seed }}
- steps: {{ steps }} (best at step {{ best_step }}); global batch: {{ global_batch }} labelled{{ unlabeled_batch }}
- optimizer: {{ optimizer }}, learning rate {{ learning_rate }}, schedule {{ schedule }}, warm-up {{ warmup }}
- processes: {{ num_processes }}; mixed precision: {{ mixed_precision }}
- git commit: {{ git_commit }}

<details><summary>Recipe (the settings that differ from stil's defaults, plus the essentials)</summary>

```yaml
{{ recipe_yaml }}
```
</details>

<details><summary>Library versions</summary>

```json
{{ versions_json }}
```
</details>

## Training curves

{{ plots }}
"""


def build_model_card(
    *,
    model_name: str,
    model_type: str,
    method: str,
    task: str,
    dataset: str,
    labeled_description: str,
    test_metrics: dict[str, float],
    validation_metrics: dict[str, float] | None,
    recipe: dict[str, Any],
    versions: dict[str, str],
    selection: str,
    steps: int,
    best_step: int | None,
    global_batch: int,
    unlabeled_batch: int | None,
    num_processes: int,
    plots: list[str],
    repo_or_path: str,
    git_commit: str | None = None,
    base_model: str | None = None,
    modalities: list[str] | None = None,
    mixed_precision: str | None = None,
    dataset_on_hub: bool = False,
    example_row: dict[str, Any] | None = None,
    image_column: str | None = "image",
):
    """Return a ``huggingface_hub.ModelCard`` (call ``.save(path)``).

    ``repo_or_path`` is what the usage snippet loads: the Hub repository id when known (push_folder
    rewrites it to the repository it uploads to). ``dataset_on_hub``: list ``dataset`` in the metadata
    (a local folder name is not a Hub dataset). ``example_row``: a raw tabular row for the snippet.
    No ``pipeline_tag`` is declared: no transformers pipeline builds this model's inputs."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    task_type = {"classification": "image-classification", "regression": "tabular-regression", "landmarks": "keypoint-detection"}.get(task, task)
    numeric = {k: v for k, v in test_metrics.items() if isinstance(v, (int, float)) and k not in DIAGNOSTIC_KEYS}
    eval_results = [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset,
            dataset_name=f"{dataset} ({labeled_description})",
            dataset_split="test",
            metric_type=name,
            metric_name=name,
            metric_value=round(float(value), 6),
        )
        for name, value in numeric.items()
    ]
    modalities = list(modalities or [])
    tags = ["stil", "semi-supervised", method, task] + modalities + (["multimodal"] if len(modalities) > 1 else [])
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        model_name=model_name,
        tags=sorted(set(tags), key=tags.index),
        datasets=[dataset] if dataset_on_hub else None,
        metrics=sorted(numeric),
        eval_results=eval_results or None,
        base_model=base_model,
        pipeline_tag=None,  # no transformers pipeline builds this model's inputs (see the card's "Use")
    )
    metric_names = sorted(set(numeric) | set(k for k in (validation_metrics or {}) if k not in DIAGNOSTIC_KEYS))
    rows = []
    for split, metrics in (("validation (best)", validation_metrics or {}), ("test", test_metrics)):
        if metrics:
            rows.append("| " + split + " | " + " | ".join(_fmt(metrics.get(m)) for m in metric_names) + " |")
    plot_lines = "\n\n".join(f"![{Path(p).stem}]({p})" for p in plots) or "(no plots)"
    t = resolved_settings(recipe)
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        model_type=model_type,
        method=method,
        dataset=dataset,
        dataset_text=f"[`{dataset}`](https://huggingface.co/datasets/{dataset})" if dataset_on_hub else f"the local dataset `{dataset}`",
        usage_snippet=usage_snippet(repo_or_path, modalities, example_row, image_column, task),
        modalities_text=" + ".join(modalities) or "its inputs",
        task=task,
        labeled_description=labeled_description,
        repo_or_path=repo_or_path,
        selection=selection,
        metric_header=" | ".join(metric_names),
        metric_rule="---|" * len(metric_names),
        metric_rows="\n".join(rows),
        model_source=t.get("model"),
        seed=t.get("seed"),
        steps=steps,
        best_step=best_step,
        global_batch=global_batch,
        unlabeled_batch=f" + {unlabeled_batch} unlabelled" if unlabeled_batch else "",
        optimizer=optimizer_text(t),
        learning_rate=t.get("learning_rate"),
        schedule=schedule_text(t),
        warmup=warmup_text(t, steps),
        num_processes=num_processes,
        mixed_precision=mixed_precision or t.get("mixed_precision") or "no",
        git_commit=git_commit or "unknown",
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False).strip(),
        versions_json=json.dumps(versions, indent=2),
        plots=plot_lines,
    )
    return card


def resolved_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """The values the run used: `card_recipe` leaves out every setting at its default, so a key it lacks
    is the argument default (what run_config.yaml records)."""
    import dataclasses

    from .arguments import ARGUMENT_CLASSES

    defaults: dict[str, Any] = {}
    for cls in ARGUMENT_CLASSES:
        defaults.update(dataclasses.asdict(cls()))
    return {**defaults, **recipe}


def optimizer_text(t: dict[str, Any]) -> str:
    text = f"{t.get('optimizer')} (weight decay {t.get('weight_decay')}"
    if t.get("optimizer") == "sgd":
        text += f", momentum {t.get('momentum')}{', nesterov' if t.get('nesterov') else ''}"
    return text + ")"


def schedule_text(t: dict[str, Any]) -> str:
    text = f"{t.get('lr_scheduler')} per {t.get('lr_scheduler_interval')}"
    if t.get("lr_scheduler") == "multistep":
        text += f" (times {t.get('lr_gamma')} at {t.get('lr_milestones')})"
    return text


def warmup_text(t: dict[str, Any], steps: int | None = None) -> str:
    """As the trainer reads it: warmup_epochs wins; a warmup below 1 is a fraction of the schedule's
    steps (max_steps, or ``steps`` trained when the schedule ran in epochs)."""
    if t.get("warmup_epochs") is not None:
        return f"{t['warmup_epochs']} epochs"
    warmup, total = t.get("warmup") or 0, t.get("max_steps")
    if not (isinstance(total, int) and total > 0):
        total = steps
    if warmup < 1:
        return f"{warmup} of the steps" + (f" ({int(round(warmup * total))} steps)" if total else "")
    return f"{int(warmup)} steps"


def usage_snippet(repo: str, modalities: list[str], example_row: dict[str, Any] | None, image_column: str | None,
                  task: str) -> str:
    """Python that loads the model and its processor with transformers alone (``trust_remote_code``: the
    export ships their code) and predicts one raw example (image file + raw row)."""
    lines = [
        "import torch",
        "from transformers import AutoModel, AutoProcessor",
        "",
        f'model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()',
        f'processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)',
    ]
    call = []
    if "image" in modalities:
        lines += ["", "from PIL import Image", f'image = Image.open("example.jpg")  # the file your table\'s {image_column or "image"!r} column names']
        call.append("images=image")
    if "tabular" in modalities:
        row = json.dumps(example_row or {}, indent=4).replace("null", "None").replace("NaN", "None")
        lines += ["", "# one raw row: category strings and raw numbers as in the training table; None = missing", f"row = {row}"]
        call.append("tabular=row")
    lines += [
        "",
        f"inputs = processor({', '.join(call)})",
        "with torch.no_grad():",
        "    logits = model(**inputs).logits",
    ]
    if task == "classification":
        lines.append("print(processor.postprocess(logits, top_k=3))  # [[{'label': ..., 'score': ...}, ...]]")
    else:
        lines.append("print(processor.postprocess(logits))  # values in the training targets' units")
    return "\n".join(lines)


def example_row_from_schema(tabular_schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A plausible raw row for the card: the first category of each categorical field, the mean of each
    continuous one."""
    if not tabular_schema:
        return None
    row = {}
    for f in tabular_schema.get("fields", []):
        if f.get("kind") == "categorical":
            row[f["name"]] = (f.get("categories") or [None])[0]
        else:
            mean = f.get("mean")
            row[f["name"]] = round(float(mean), 3) if mean is not None else None
    return row


NOT_TRAINING_SETTINGS = {
    "output_dir", "overwrite_output_dir", "allow_foreign_files", "resume_from_checkpoint", "stop_after_steps",
    "logging_steps", "report_to", "run_name", "disable_tqdm", "plots", "export", "push_to_hub", "hub_model_id",
    "hub_private", "hub_token", "dataloader_num_workers", "dataset_cache_dir", "bad_images",
}
ESSENTIAL_SETTINGS = ("method", "model", "seed", "max_steps", "learning_rate", "per_device_train_batch_size")


def card_recipe(args) -> dict[str, Any]:
    """The settings that mattered for the model: non-default training settings plus the essentials; no
    output/logging/Hub settings (never the token), no synthetic-data settings when a dataset was given."""
    import dataclasses

    mattered: dict[str, Any] = {}
    for obj in args.groups().values():
        try:
            defaults = dataclasses.asdict(type(obj)())
        except TypeError:
            defaults = {}
        for key, value in dataclasses.asdict(obj).items():
            if key in NOT_TRAINING_SETTINGS:
                continue
            if args.data.dataset is not None and key.startswith("synthetic_"):
                continue
            if key in ESSENTIAL_SETTINGS or key not in defaults or defaults[key] != value:
                if key in ("dataset", "init_from") and isinstance(value, str) and Path(value).exists():
                    value = Path(value).name  # a local folder: its name, not this machine's path
                mattered[key] = value
    return mattered


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_eval_results(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)
    return path
