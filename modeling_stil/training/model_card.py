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

A `{{ model_type }}` model trained with the **{{ method }}** method of stil
(Hugging-Face-native semi-supervised learning for images and image+tabular data) on
`{{ dataset }}` ({{ task }}, {{ labeled_description }}).

```python
import modeling_stil  # registers the Auto classes (or pass trust_remote_code=True)
from transformers import AutoModel
model = AutoModel.from_pretrained("{{ repo_or_path }}")
```

## Results

The model selected on the validation split ({{ selection }}) was evaluated once on the test split.

| split | {{ metric_header }} |
|---|{{ metric_rule }}
{{ metric_rows }}

## Training

- method: `{{ method }}`; model: `{{ model_source }}`; seed: {{ seed }}
- steps: {{ steps }} (best at step {{ best_step }}); global batch: {{ global_batch }} labelled{{ unlabeled_batch }}
- optimizer: {{ optimizer }}, learning rate {{ learning_rate }}, schedule {{ schedule }}
- processes: {{ num_processes }}; mixed precision: {{ mixed_precision }}
- git commit: {{ git_commit }}

<details><summary>Resolved recipe</summary>

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
):
    """Return a ``huggingface_hub.ModelCard`` (call ``.save(path)``)."""
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
    tags = ["stil", "semi-supervised", method, task] + list(modalities or [])
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        model_name=model_name,
        tags=sorted(set(tags), key=tags.index),
        datasets=[dataset],
        metrics=sorted(numeric),
        eval_results=eval_results or None,
        base_model=base_model,
        pipeline_tag=task_type if task == "classification" else None,
    )
    metric_names = sorted(set(numeric) | set(k for k in (validation_metrics or {}) if k not in DIAGNOSTIC_KEYS))
    rows = []
    for split, metrics in (("validation (best)", validation_metrics or {}), ("test", test_metrics)):
        if metrics:
            rows.append("| " + split + " | " + " | ".join(_fmt(metrics.get(m)) for m in metric_names) + " |")
    plot_lines = "\n\n".join(f"![{Path(p).stem}]({p})" for p in plots) or "(no plots)"
    t = recipe
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        model_type=model_type,
        method=method,
        dataset=dataset,
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
        optimizer=t.get("optimizer"),
        learning_rate=t.get("learning_rate"),
        schedule=f"{t.get('lr_scheduler')} per {t.get('lr_scheduler_interval')}, warm-up {t.get('warmup')}",
        num_processes=num_processes,
        mixed_precision=mixed_precision or t.get("mixed_precision") or "no",
        git_commit=git_commit or "unknown",
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False).strip(),
        versions_json=json.dumps(versions, indent=2),
        plots=plot_lines,
    )
    return card


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
