"""The export: ``save_pretrained`` (safetensors) + processor + model card + eval_results.json, then a
reload with ``AutoModel.from_pretrained`` that must reproduce the reported metrics.

Every file is listed in the run's manifest (manifest.py) before it is moved into the output_dir, none
replaces a file stil did not write, and the weights get the umask's mode (safetensors writes 0600)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import manifest
from .provenance import library_versions


@dataclass(frozen=True)
class Selection:
    """How the exported weights were chosen: the best ``metric`` (``greater_is_better``) at ``best_step``
    of a run of ``steps`` optimizer steps."""

    metric: str
    greater_is_better: bool
    best_step: int | None
    steps: int

    def describe(self) -> str:
        return f"best {self.metric} ({'higher' if self.greater_is_better else 'lower'} is better) at step {self.best_step}"


def export_run(model, state_dict: dict[str, torch.Tensor], *, args, metadata, source: str, results: dict[str, Any],
               run_info: dict[str, Any], selection: Selection, accelerator, unlabeled_batch: int | None,
               evaluate: Callable[[str, torch.nn.Module], dict[str, float]], check_split: str) -> Path:
    """save_pretrained (safetensors) + processor + eval_results.json + model card, then reload and
    re-evaluate the export with ``AutoModel.from_pretrained`` to prove it is self-sufficient.

    ``model`` is the network to export (the method's evaluation model) and ``state_dict`` its weights,
    gathered on every process (collective under FSDP); ``run_info`` is what run_info.json records;
    ``unlabeled_batch`` the global unlabelled batch (None for a method without unlabelled views);
    ``evaluate(split, model)`` scores the reloaded export on ``check_split``, whose metrics in ``results``
    it must reproduce."""
    from transformers import AutoModel

    from ..processing_stil import StilProcessor
    from .model_card import build_model_card, card_recipe, example_row_from_schema, write_eval_results

    acc = accelerator
    targs = args.training
    out = Path(targs.output_dir)
    if acc.is_main_process:
        # written into a staging folder, then moved into place: the export's file names (shards, custom code)
        # are known only once written, and none may replace a file stil did not write
        stage = manifest.begin_staging(out, name=".export.partial")
        model.save_pretrained(stage, state_dict={k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, is_main_process=True)
        # the raw table's image column (what predict.py and users pass), not only the arrow column's name
        source_column = (getattr(metadata, "source", None) or {}).get("image_column")
        StilProcessor.from_model_config(model.config, image_column=source_column or metadata.image_column).save_pretrained(stage)
        labeled_description = f"{results.get('num_labeled', run_info.get('num_labeled', '?'))} labelled training rows"
        n_labeled = len(run_info.get("labeled_indices", []))
        n_train = run_info.get("split_sizes", {}).get("train")
        if n_train:
            labeled_description = f"{n_labeled}/{n_train} training rows labelled ({100.0 * n_labeled / n_train:.1f}%)"
        plots = [f"plots/{name}" for name in ("losses.png", "validation.png", "learning_rate.png", "pseudo_labels.png") if (out / "plots" / name).is_file()]
        local_dataset = Path(source).exists()
        dataset_name = Path(source).name if local_dataset else source
        card = build_model_card(
            model_name=targs.hub_model_id or out.name,
            model_type=model.config.model_type,
            method=targs.method,
            task=metadata.task,
            dataset=dataset_name,
            labeled_description=labeled_description,
            test_metrics=results.get("test", {}),
            validation_metrics=results.get("validation"),
            recipe=card_recipe(args),
            versions=run_info.get("versions", library_versions()),
            selection=selection.describe(),
            steps=selection.steps,
            best_step=selection.best_step,
            global_batch=targs.per_device_train_batch_size * acc.num_processes * targs.gradient_accumulation_steps,
            unlabeled_batch=unlabeled_batch,
            num_processes=acc.num_processes,
            plots=plots,
            repo_or_path=targs.hub_model_id or out.name,
            dataset_on_hub=not local_dataset,
            example_row=example_row_from_schema(model.config.to_dict().get("tabular_schema")),
            image_column=source_column or metadata.image_column,
            git_commit=run_info.get("git_commit"),
            mixed_precision=str(acc.mixed_precision),
            modalities=(["image"] if metadata.image_column else []) + (["tabular"] if model.config.to_dict().get("tabular_schema") else []),
        )
        card.save(str(stage / "README.md"))
        manifest.finish_staging(out, stage)
    acc.wait_for_everyone()

    reloaded = AutoModel.from_pretrained(str(out), dtype=torch.float32).to(acc.device)
    reloaded_metrics = evaluate(check_split, reloaded)
    expected = results.get(check_split) or results.get("validation", {})
    mismatched = {k: (expected.get(k), v) for k, v in reloaded_metrics.items() if k in expected and not math.isclose(v, expected[k], rel_tol=1e-4, abs_tol=1e-5)}
    if mismatched:
        raise RuntimeError(f"the exported model in {out} does not reproduce the {check_split} metrics after reloading: {mismatched}")
    results["reload_check"] = {"split": check_split, "metrics": reloaded_metrics, "matches": True}
    if acc.is_main_process:
        manifest.claim_all(out, ["eval_results.json", "eval_results.json.tmp"])
        write_eval_results(out / "eval_results.json", {
            "model": str(out), "dataset": source, "method": targs.method, "best_step": selection.best_step,
            "metric_for_best_model": selection.metric, "validation": results.get("validation"),
            "test": results.get("test"), "reload_check": results["reload_check"],
        })
        acc.print(f"exported to {out} and reloaded with AutoModel.from_pretrained: {check_split} metrics match")
    return out
